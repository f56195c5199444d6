"""Pure tensor algorithms of the video methods (EVS, HoliTom): no transformers import, no model
knowledge. A video here is a (F, S, D) tensor: F frames of S tokens each (a frame's row-major grid
flattened), D features; every score and similarity is computed in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pact.ops.scoring import topk_indices

__all__ = [
    "EVS_FIRST_FRAME_SCORE",
    "HolitomVideo",
    "blend_clusters",
    "dpc_knn_centers",
    "evs_dissimilarity",
    "evs_keep",
    "evs_retained_count",
    "frame_similarity",
    "holitom_video",
    "sequential_pair_merge",
    "static_windows",
]

EVS_FIRST_FRAME_SCORE = 255.0
"""EVS score of every first-frame token: above any cosine dissimilarity (at most 2), so the first
frame is always kept (the value vLLM's ``compute_retention_mask`` uses)."""


def evs_dissimilarity(frames: torch.Tensor) -> torch.Tensor:
    """EVS score of every token of one video: 1 - cosine similarity with the token at the same
    spatial position in the previous frame; first-frame tokens get ``EVS_FIRST_FRAME_SCORE``.

    Args:
        frames: (F, S, D) the video's token features, frame by frame (any float dtype).
    Returns:
        float32 (F, S).
    """
    if frames.dim() != 3:
        raise ValueError(f"frames must be (F, S, D), got shape {tuple(frames.shape)}")
    x = frames.detach().float()
    first = torch.full_like(x[:1, :, 0], EVS_FIRST_FRAME_SCORE)
    if x.shape[0] < 2:
        return first
    # torch's cosine_similarity clamps the norms at eps = 1e-8 (as vLLM's call does): a zero
    # vector has similarity 0, dissimilarity 1.
    dissimilarity = 1.0 - F.cosine_similarity(x[1:], x[:-1], dim=-1)
    return torch.cat([first, dissimilarity], dim=0)


def evs_retained_count(tokens_per_frame: int, num_frames: int, pruning_rate: float) -> int:
    """Tokens EVS keeps of a video: ``int(F * S * (1 - q))``, but never fewer than one frame's S
    (the first frame is always kept whatever the rate q)."""
    if not 0.0 <= pruning_rate < 1.0:
        raise ValueError(f"pruning_rate must be in [0, 1), got {pruning_rate}")
    return max(int(tokens_per_frame), int(tokens_per_frame * num_frames * (1.0 - pruning_rate)))


def evs_keep(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Ascending flat indices (frame-major) of the ``count`` highest EVS scores of one video.

    Ties go to the lower flat index (earlier frame, then earlier position), the order of vLLM's
    stable descending argsort.

    Args:
        scores: (F, S) from ``evs_dissimilarity``. count: in [0, F * S].
    Returns:
        LongTensor (count,).
    """
    return topk_indices(scores.reshape(-1), int(count))


# ---------------------------------------------------------------------------------------------------
# HoliTom (Shao et al., NeurIPS 2025; official code cokeshao/HoliTom, holitom/llava_arch.py)


def frame_similarity(frames: torch.Tensor) -> torch.Tensor:
    """float32 (F - 1, S): cosine similarity of every token with the token at the same position in
    the next frame (HoliTom's ``feature_sim``)."""
    if frames.dim() != 3:
        raise ValueError(f"frames must be (F, S, D), got shape {tuple(frames.shape)}")
    x = F.normalize(frames.detach().float(), p=2, dim=-1)
    return F.cosine_similarity(x[:-1], x[1:], dim=-1)


def static_windows(
    similarity: torch.Tensor, num_frames: int, tau: float, max_window: int
) -> tuple[list[tuple[int, int]], int]:
    """HoliTom's temporal segmentation: the partition of the frames into windows [s, e] that
    maximises the tokens saved by merging the tokens static over a window into one.

    A position is static over [s, e] when its similarity to the next frame exceeds ``tau`` at every
    step s..e-1; merging it saves e - s tokens. Dynamic programming over the frames (a loop over
    frames and window lengths, not tokens): frame i either closes a window of 2..``max_window``
    frames ending at i (the first one found strictly better wins, shorter windows first) or stands
    alone (preferred on a tie), as the official ``select_static_windows``.

    Args:
        similarity: (F - 1, S) from ``frame_similarity``. num_frames: F. tau: similarity threshold.
        max_window: longest window, in frames.
    Returns:
        (windows, saved): the (start, end) frame pairs in order, covering 0..F-1, and the tokens
        saved by the static merge (the official ``total_reduced``).
    """
    n = int(num_frames)
    if n == 0:
        return [], 0
    above = (similarity.float() > tau).to(torch.float32)  # (F - 1, S)
    # saved[s][e]: static positions over [s, e] times (e - s); cumprod over the steps from s on
    saved = [[0.0] * n for _ in range(n)]
    for s in range(n - 1):
        counts = torch.cumprod(above[s:], dim=0).sum(dim=1).tolist()  # e = s + 1 ..
        for j, c in enumerate(counts):
            saved[s][s + 1 + j] = c * (1 + j)
    dp = [0.0] * n
    prev = [0] * n
    for i in range(n):
        best, best_j = (dp[i - 1] if i > 0 else 0.0), i
        for size in range(2, min(i + 1, int(max_window)) + 1):
            j = i - size
            value = (dp[j] if j >= 0 else 0.0) + saved[j + 1][i]
            if value > best:
                best, best_j = value, j + 1
        dp[i], prev[i] = best, best_j
    windows = []
    i = n - 1
    while i >= 0:
        windows.append((prev[i], i))
        i = prev[i] - 1
    return windows[::-1], round(dp[-1])


def dpc_knn_centers(x: torch.Tensor, count: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-KNN cluster centers (HoliTom's ``cluster_dpc_knn``, after TCFormer).

    Distances ``cdist(x, x) / sqrt(D)``; density ``exp(-mean of the squared distances to the k
    nearest points)`` (the point itself included); delta = distance to the nearest denser point (the
    largest distance for the densest); centers: the ``count`` largest ``delta * density``. Ties in
    density go to the lower index (the official code adds 1e-6 uniform noise instead), ties in the
    score too.

    Args:
        x: (N, D) points. count: centers wanted, in [0, N]. k: neighbours of the density, in [1, N].
    Returns:
        (centers ascending LongTensor (count,), distances float32 (N, N)).
    """
    pts = x.detach().float()
    n, d = pts.shape
    dist = torch.cdist(pts, pts) / math.sqrt(d)
    if n == 0 or count == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device), dist
    nearest = torch.topk(dist, min(int(k), n), dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    idx = torch.arange(n, device=x.device)
    # j is denser than i: higher density, or equal density and a lower index (deterministic ties)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None])
    )
    delta = torch.where(denser, dist, dist.max()).min(dim=-1).values
    return topk_indices(delta * density, int(count)), dist


def blend_clusters(
    x: torch.Tensor, centers: torch.Tensor, dist: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign every non-center point to its nearest center and blend (HoliTom's
    ``merge_tokens_by_clustering``): a center with members becomes ``beta * center + (1 - beta) *
    mean(members)``, one without stays itself.

    Args:
        x: (N, D) points (kept in their dtype for the blend; accumulated in float32).
        centers: (C,) ascending indices. dist: (N, N) distances (``dpc_knn_centers``). beta: weight.
    Returns:
        (labels LongTensor (N,): index into ``centers`` of each point's cluster, blended (C, D) float32).
    """
    n = x.shape[0]
    labels = dist[:, centers].argmin(dim=-1)  # first (lowest) center on a tie, as torch.argmin
    labels[centers] = torch.arange(centers.numel(), device=x.device)
    xf = x.float()
    is_member = torch.ones(n, dtype=torch.bool, device=x.device)
    is_member[centers] = False
    total = torch.zeros(centers.numel(), x.shape[1], dtype=torch.float32, device=x.device)
    total.index_add_(0, labels[is_member], xf[is_member])
    members = torch.bincount(labels[is_member], minlength=centers.numel()).float()
    mean = total / members.clamp(min=1)[:, None]
    blended = torch.where(members[:, None] > 0, beta * xf[centers] + (1 - beta) * mean, xf[centers])
    return labels, blended


@dataclass
class HolitomVideo:
    """HoliTom's output for one video of F frames of S tokens, in the official order.

    placed: LongTensor (R,) flat index f * S + p of the original token each output token sits at (a
        merged static token: its center at the window's first frame; a contextual token: its center).
    hidden: (R, D) float32 features of the output tokens.
    labels: LongTensor (F * S,) index into ``placed`` of the output token each original token went
        into, -1 if it was dropped.
    windows: the temporal segmentation (``static_windows``).
    """

    placed: torch.Tensor
    hidden: torch.Tensor
    labels: torch.Tensor
    windows: list[tuple[int, int]]


def _frame_dynamic(
    feat: torch.Tensor, attn: torch.Tensor, ratio: float, dominant_share: float, beta: float, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One frame's dynamic tokens (``merge_tokens_by_attention_density``): the ``(1 - D)`` dominant
    share of ``ceil(S_dyn * ratio)`` by attention, the rest contextual DPC-KNN centers of the others,
    blended. Returns (placed indices into feat, features (R, D) float32, labels (S_dyn,) into placed)."""
    n = feat.shape[0]
    dev = feat.device
    total = math.ceil(n * ratio)
    dominant_num = round(total * (1 - dominant_share))
    contextual_num = total - dominant_num
    dominant = topk_indices(attn.float(), dominant_num)  # ascending (the official masked_select)
    labels = torch.full((n,), -1, dtype=torch.long, device=dev)
    labels[dominant] = torch.arange(dominant.numel(), device=dev)
    placed, hidden = [dominant], [feat[dominant].float()]
    if contextual_num > 0:
        rest = torch.ones(n, dtype=torch.bool, device=dev)
        rest[dominant] = False
        others = rest.nonzero().squeeze(1)
        centers, dist = dpc_knn_centers(feat[others], contextual_num, min(k, contextual_num))
        sub_labels, blended = blend_clusters(feat[others], centers, dist, beta)
        labels[others] = sub_labels + dominant.numel()
        placed.append(others[centers])
        hidden.append(blended)
    return torch.cat(placed), torch.cat(hidden), labels


def holitom_video(
    frames: torch.Tensor,
    attention: torch.Tensor,
    *,
    retain_ratio: float,
    tau: float,
    beta: float,
    k: int,
    dominant_share: float = 0.0,
    max_window: int = 1024,
) -> HolitomVideo:
    """HoliTom's outer-LLM merging of one video (the official LLaVA-OneVision path, ``one_token``
    newline layout):

    1. segment the frames (``static_windows`` on ``frame_similarity``) and raise the retain ratio to
       ``min(r / ((F S - saved) / (F S)), 1)``;
    2. per window of several frames, the positions static over it are averaged over its frames and
       clustered (DPC-KNN, ``round(S_static * r)`` centers, ``blend_clusters``);
    3. per frame, the dynamic positions (all of a one-frame window) keep ``ceil(S_dyn * r)`` tokens:
       the top-attention dominant ones (share ``1 - dominant_share``) and contextual centers;
    4. output: per window, its static tokens then each frame's dynamic tokens (ascending positions,
       dominant before contextual).

    Args:
        frames: (F, S, D) the video's LLM input features. attention: (F, S) per-token attention
            signal (the official: mean attention received in the vision encoder's last used layer,
            pooled like the features).
        retain_ratio: r. tau: static threshold T. beta: blend weight. k: DPC-KNN neighbours.
        dominant_share: D (0: every dynamic token kept by attention). max_window: longest window.
    Returns:
        HolitomVideo.
    """
    if frames.dim() != 3 or attention.shape != frames.shape[:2]:
        raise ValueError(
            f"frames must be (F, S, D) and attention (F, S); got {tuple(frames.shape)} and "
            f"{tuple(attention.shape)}"
        )
    n_frames, per_frame, _ = frames.shape
    dev = frames.device
    similarity = frame_similarity(frames)
    windows, saved = static_windows(similarity, n_frames, tau, max_window)
    total = n_frames * per_frame
    ratio = min(retain_ratio / ((total - saved) / total), 1.0) if total else 1.0
    positions = torch.arange(per_frame, device=dev)
    labels = torch.full((total,), -1, dtype=torch.long, device=dev)
    placed: list[torch.Tensor] = []
    hidden: list[torch.Tensor] = []
    count = 0
    for start, end in windows:  # a loop over windows and frames, not tokens
        if start == end:
            static = torch.zeros(per_frame, dtype=torch.bool, device=dev)
        else:
            static = (similarity[start:end] > tau).all(dim=0)
            static_pos = positions[static]
            feat = frames[start : end + 1][:, static].float().mean(dim=0)  # (S_static, D)
            clusters = round(static_pos.numel() * ratio)
            if clusters > 0:
                centers, dist = dpc_knn_centers(feat, clusters, min(k, clusters))
                sub_labels, blended = blend_clusters(feat, centers, dist, beta)
                for f in range(start, end + 1):
                    labels[f * per_frame + static_pos] = sub_labels + count
                placed.append(start * per_frame + static_pos[centers])
                hidden.append(blended)
                count += centers.numel()
        dynamic_pos = positions[~static]
        for f in range(start, end + 1):
            if dynamic_pos.numel() == 0:
                continue
            sub_placed, sub_hidden, sub_labels = _frame_dynamic(
                frames[f, dynamic_pos], attention[f, dynamic_pos], ratio, dominant_share, beta, k
            )
            flat = f * per_frame + dynamic_pos
            kept = sub_labels >= 0
            labels[flat[kept]] = sub_labels[kept] + count
            placed.append(flat[sub_placed])
            hidden.append(sub_hidden)
            count += sub_placed.numel()
    d = frames.shape[2]
    return HolitomVideo(
        placed=torch.cat(placed) if placed else torch.zeros(0, dtype=torch.long, device=dev),
        hidden=torch.cat(hidden) if hidden else torch.zeros(0, d, dtype=torch.float32, device=dev),
        labels=labels,
        windows=windows,
    )


def sequential_pair_merge(
    hidden: torch.Tensor, keep: torch.Tensor, others: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """HoliTom's inner-LLM merge: every token of ``others`` goes into its most similar (cosine) token
    of ``keep``, in ascending order, each time averaging: ``h_t <- (h_t + h_o) / 2``. A kept token
    with members o_1 < ... < o_n becomes ``h_t / 2^n + sum_i h_{o_i} / 2^(n - i + 1)``; the
    similarities are those of the unmerged states (the official code computes them first).

    Args:
        hidden: (N, D) states. keep: (K,) ascending indices. others: (M,) ascending, disjoint from keep.
    Returns:
        (labels LongTensor (M,): index into ``keep`` of each other token's target, merged (K, D) float32).
    """
    h = hidden.float()
    kept_h = h[keep]
    dev = hidden.device
    if others.numel() == 0 or keep.numel() == 0:
        return torch.zeros(others.numel(), dtype=torch.long, device=dev), kept_h
    sim = F.normalize(h[others], dim=-1) @ F.normalize(kept_h, dim=-1).T
    target = sim.argmax(dim=-1)  # (M,) first maximum on a tie, as torch.max
    # members merged after each one into the same target: a stable sort by target keeps the
    # ascending order inside each target's run
    by_target = torch.sort(target, stable=True).indices
    n_members = torch.bincount(target, minlength=keep.numel())
    run_start = torch.cumsum(n_members, 0) - n_members
    rank = torch.empty_like(target)
    rank[by_target] = torch.arange(target.numel(), device=dev) - run_start[target[by_target]]
    from_last = n_members[target] - 1 - rank
    weight = 0.5 ** (from_last + 1).float()
    n_members = n_members.float()
    merged = kept_h * (0.5**n_members)[:, None]
    merged.index_add_(0, target, h[others] * weight[:, None])
    return target, merged
