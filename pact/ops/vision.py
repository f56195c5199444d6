"""Vision-side token selection baselines: VisPruner, PruMerge / PruMerge+, HiRED, and the attention
signals they need.

These methods decide from the vision encoder which patch tokens reach the LLM. They all start from a
[CLS]-attention vector over the N patch tokens of one image (or crop): `cls_attention` computes it
from the encoder's queries and keys. Encoders without a [CLS] token (SigLIP in LLaVA-OneVision,
Qwen2-VL's ViT) get a substitute, `mean_received_attention`: the mean attention each patch receives
from all patches (column mean of one layer's attention matrix), i.e. the same "how much does the
image attend to this token" reading, averaged over every query instead of taken from one [CLS]
query. It is our choice, not part of any of these papers: results with it are not the papers'
numbers. Everything is float32 and deterministic (ties -> lower index).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from pact.ops.dbdpc import normalize_rows
from pact.ops.merge import cluster_sizes
from pact.ops.reduction import Reduction
from pact.ops.scoring import check_finite, topk_indices

__all__ = [
    "cls_attention",
    "hired_budgets",
    "hired_crop_scores",
    "hired_image_rows",
    "hired_select",
    "iqr_outliers",
    "mean_received_attention",
    "prumerge",
    "vispruner_crops",
    "vispruner_select",
]


def _vector(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D (N,), got {tuple(x.shape)}")
    check_finite(**{name: x})
    return x.detach().float()


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores (ties -> lower index), in score order."""
    return torch.sort(scores, descending=True, stable=True).indices[:k]


# --------------------------------------------------------------------------------------------------
# attention signals


def cls_attention(
    q_cls: torch.Tensor,
    k: torch.Tensor,
    k_cls: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    heads: Literal["mean", "sum"] = "mean",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Softmax attention of the [CLS] query over the N patch keys, reduced over heads.

    ``a_n = (1/H) sum_h softmax_j(q_cls,h . k_j,h * scale)_n`` (``heads="mean"``: VisPruner, the
    encoders' ``attentions[...].mean(1)``; ``heads="sum"``: HiRED sums over heads). If ``k_cls`` is
    given the [CLS] key takes part in the softmax (as in the encoder, where [CLS] attends to itself
    too) and its column is dropped afterwards, so the result sums to less than 1; otherwise the
    softmax runs over the patches only. PruMerge's attention (one head over the full width C, scale
    C^-1/2, [CLS] inside the softmax) is ``H = 1, d = C`` with ``k_cls`` given.

    Args:
        q_cls: (H, d) [CLS] query per head. k: (N, H, d) patch keys. k_cls: optional (H, d).
        scale: logit scale, default 1/sqrt(d).
        heads: "mean" or "sum" over heads.
        dtype: compute dtype of logits, softmax and head reduction: float32 (default), or the model
            dtype to reproduce an official implementation that computes there (the query is scaled
            before the product, as CLIP's eager attention does).
    Returns:
        (N,) float32 (values computed in ``dtype``).
    """
    if q_cls.dim() != 2 or k.dim() != 3 or k.shape[1:] != q_cls.shape:
        raise ValueError(f"expected q_cls (H, d) and k (N, H, d), got {tuple(q_cls.shape)}, {tuple(k.shape)}")
    if heads not in ("mean", "sum"):
        raise ValueError(f"heads must be 'mean' or 'sum', got {heads!r}")
    d = q_cls.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q = q_cls.detach().to(dtype) * scale
    logits = torch.einsum("hd,nhd->hn", q, k.detach().to(dtype))  # (H, N)
    if k_cls is not None:
        self_logit = (q * k_cls.detach().to(dtype)).sum(-1, keepdim=True)  # (H, 1)
        logits = torch.cat([self_logit, logits], dim=1)
    probs = torch.softmax(logits, dim=-1)
    if k_cls is not None:
        probs = probs[:, 1:]
    reduced = probs.mean(dim=0) if heads == "mean" else probs.sum(dim=0)
    return reduced.float()


def mean_received_attention(
    q: torch.Tensor, k: torch.Tensor, chunk: int | None = None, scale: float | None = None
) -> torch.Tensor:
    """Substitute [CLS] signal for encoders without [CLS]: mean attention each patch receives.

    ``a_n = (1/(H N)) sum_h sum_i softmax_j(q_i,h . k_j,h * scale)_n`` -- the column mean of the
    (full, bidirectional) attention matrix of one encoder layer (use the last one), averaged over
    heads. It sums to 1 like a [CLS] distribution. Queries are processed in chunks of ``chunk`` rows so
    memory is O(chunk * H * N); the default picks the chunk so that one block of logits stays under
    64 MiB (Qwen2-VL's ViT sees up to 16k patches per image). For encoders whose patches are merged
    before the LLM (Qwen2-VL's 2x2 merger) sum the signal over each merged group.

    Args:
        q: (N, H, d) queries, k: (N, H, d) keys of the same N patch tokens (pass keys with their KV
            heads repeated for GQA encoders). chunk: query rows per block (default: automatic).
            scale: default 1/sqrt(d).
    Returns:
        float32 (N,).
    """
    if q.dim() != 3 or k.dim() != 3 or q.shape[1:] != k.shape[1:]:
        raise ValueError(f"expected q (N, H, d) and k (N, H, d), got {tuple(q.shape)}, {tuple(k.shape)}")
    n_q, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if chunk is None:
        chunk = max(1, (1 << 24) // max(1, h * k.shape[0]))
    kf = k.detach().to(torch.float32)
    total = torch.zeros(k.shape[0], dtype=torch.float32, device=k.device)
    for start in range(0, n_q, chunk):
        qs = q[start : start + chunk].detach().to(torch.float32)
        probs = torch.softmax(torch.einsum("qhd,khd->hqk", qs, kf) * scale, dim=-1)
        total += probs.sum(dim=(0, 1))
    return total / max(1, h * n_q)


# --------------------------------------------------------------------------------------------------
# VisPruner


def vispruner_select(
    cls_attn: torch.Tensor,
    features: torch.Tensor,
    n_keep: int,
    important_ratio: float,
    step: int = 8,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """VisPruner (ICCV'25): keep important tokens by [CLS] attention, then diverse ones by similarity.

    * Important: the ``floor(n_keep * important_ratio)`` tokens with the highest [CLS] attention
      (floor as in the official code's ``int()``).
    * Diverse: the remaining tokens, in decreasing-attention order, are thinned by repeated
      ToMe-style bipartite passes: A = even positions, B = odd positions of the current list; each A
      token's score is its highest cosine similarity to a B token; the ``min(step, excess)`` A tokens
      with the highest score (the most redundant) are removed; the list becomes [surviving A in
      decreasing-score order] + B (the official ordering). Passes repeat until
      ``n_keep - n_important`` tokens remain.

    Cost: about N^3 / 100 gathered similarities for N tokens (each pass reads an A x B block); the
    official code runs it per image / per anyres crop (N = 576 for CLIP-L/336), not on all crops at once.

    Args:
        cls_attn: (N,) [CLS] attention (head mean). features: (N, F) patch features used for the
            similarity (the official code: the encoder's selected-layer outputs).
        n_keep: tokens to keep T (clamped to [0, N]). important_ratio: r in [0, 1].
        step: tokens removed per pass (8 in the official code).
        dtype: dtype of the normalised features and their similarities: float32 (default) or the
            model dtype, as the official code computes (``x / x.norm()`` and the products in the
            encoder's dtype; rounding there can turn close similarities into ties).
    Returns:
        LongTensor[min(n_keep, N)] ascending kept indices.
    """
    a = _vector(cls_attn, "cls_attn")
    n = a.numel()
    if features.dim() != 2 or features.shape[0] != n:
        raise ValueError(f"features must have shape ({n}, F), got {tuple(features.shape)}")
    check_finite(features=features)
    if not 0.0 <= important_ratio <= 1.0:
        raise ValueError(f"important_ratio must be in [0, 1], got {important_ratio}")
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    n_keep = max(0, min(int(n_keep), n))
    if n_keep == n:
        return torch.arange(n, device=a.device)
    n_important = int(n_keep * important_ratio)
    n_diverse = n_keep - n_important
    order = _top(a, n)
    important, residual = order[:n_important], order[n_important:]
    if dtype == torch.float32:
        xr = normalize_rows(features[residual])
    else:
        xr = features[residual].detach().to(dtype)
        xr = xr / torch.linalg.vector_norm(xr, dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    sim = (xr @ xr.T).float()  # one (R0, R0) matrix; each pass gathers its A x B block
    pos = torch.arange(residual.numel(), device=a.device)  # current list, as rows of `sim`
    while True:
        excess = pos.numel() - n_diverse
        if excess <= 0:
            break
        pa, pb = pos[0::2], pos[1::2]
        r = min(step, excess, pa.numel())
        if pb.numel():
            score = sim.index_select(0, pa).index_select(1, pb).amax(dim=1)
        else:
            score = torch.full((pa.numel(),), float("inf"), device=a.device)
        by_score = torch.sort(score, descending=True, stable=True).indices
        pos = torch.cat([pa[by_score[r:]], pb])
    kept = torch.cat([important, residual[pos]])
    return torch.sort(kept).values


# --------------------------------------------------------------------------------------------------
# PruMerge / PruMerge+


def iqr_outliers(scores: torch.Tensor, coef: float = 1.5) -> torch.Tensor:
    """Upper IQR outliers: ``scores > Q3 + coef * (Q3 - Q1)`` (linear-interpolated quartiles, numpy's
    default, as PruMerge computes them). Returns a bool (N,) mask."""
    s = _vector(scores, "scores")
    if s.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=s.device)
    q1, q3 = torch.quantile(s, torch.tensor([0.25, 0.75], device=s.device))
    return s > q3 + coef * (q3 - q1)


def _evenly_spaced(candidates: torch.Tensor, count: int) -> torch.Tensor:
    """`count` elements of the ascending `candidates` at evenly spaced positions (window centres)."""
    m = candidates.numel()
    count = min(count, m)
    if count <= 0:
        return candidates[:0]
    pos = ((torch.arange(count, device=candidates.device) * 2 + 1) * m) // (2 * count)
    return candidates[pos]


def prumerge(
    cls_attn: torch.Tensor,
    keys: torch.Tensor,
    hidden: torch.Tensor,
    plus: bool = False,
    *,
    n_keep: int | None = None,
    k_neighbors: int = 32,
    iqr_coef: float = 1.5,
    normalize: bool = False,
    grid_shape: tuple[int, int] | None = None,
    plus_attention_share: float = 0.25,
    extra_token: bool = True,
) -> Reduction:
    """PruMerge / PruMerge+ (LLaVA-PruMerge): adaptive selection by [CLS]-attention outliers, then
    each kept token absorbs its most key-similar tokens.

    Selection, in the official output order (``Reduction.order``):

    * adaptive (``n_keep=None``): the m IQR outliers of the [CLS] attention (`iqr_outliers`), most
      attended first (the official ``topk(cls_attn, int(N * m / N))``). With no outlier the single
      most-attended token is kept (the official code keeps none and, for PruMerge+, divides by zero).
    * PruMerge+ (``plus=True``) then appends the spatially uniform samples that are not outliers, in
      ascending raster order: with ``ratio = m / N`` (a float, as the official code), stride
      ``s = max(1, int(int(1 / ratio) / 3))`` and the flat indices ``arange(0, N - 1, s)`` (the
      official ``arange(0, 575, s)`` for N = 576; it crashes when s would be 0, here s >= 1). With
      ``grid_shape=(rows, cols)`` the samples are instead a 2-D lattice with the real-valued stride
      ``sqrt(s)`` on both axes (rows and columns ``floor(i * sqrt(s))``: about as many tokens,
      uniform in 2-D rather than along the raster; not the official rule).
    * budget (``n_keep`` given, for equal-budget tables): exactly ``min(n_keep, N)`` tokens -- the top
      ``n_keep`` by attention, or with ``plus`` the top ``max(1, round(plus_attention_share * n_keep))``
      by attention then evenly spaced raster samples among the others (PruMerge+ keeps about one
      outlier for three uniform samples, hence the default share 0.25); same output order.

    Merge (as the official code): each kept token i takes its ``k_neighbors`` (32) most key-similar
    other tokens J_i (cosine, among all N tokens, kept ones included) and becomes
    ``h_i + sum_{j in J_i} a_j h_j`` with ``a`` the [CLS] attention and ``h`` the ORIGINAL features;
    ``normalize=True`` gives the weighted mean ``(a_i h_i + sum a_j h_j) / (a_i + sum a_j)`` instead.
    ``extra_token``: one more token, ``sum_{j not kept} a_j h_j`` over every pruned token, placed
    after the kept ones (``Reduction.extra``, as the official code appends it last).

    Bookkeeping: neighbourhoods overlap, but a Reduction needs a partition. Every pruned token that
    was absorbed by at least one kept token is labelled with the most similar of those (ties -> lower
    kept index); pruned tokens absorbed by nobody are dropped (-1). ``sizes = 1 + number of pruned
    tokens labelled to the kept token``. PruMerge itself has no proportional attention: disable it in
    the method config to reproduce the original.

    Args:
        cls_attn: (N,) [CLS] attention. keys: (N, F) encoder keys (the original: layer-23 keys, all
            heads). hidden: (N, D) features to merge (the original: encoder outputs at the select layer).
        plus: PruMerge+. n_keep: budget mode. k_neighbors: tokens absorbed per kept token.
        iqr_coef: IQR multiplier (1.5). normalize: weighted mean instead of the original update.
        grid_shape: (rows, cols) with rows * cols = N for 2-D uniform samples (plus mode only).
        plus_attention_share: attention share of the budget in budget + plus mode.
        extra_token: add the attention-weighted sum of the pruned tokens as ``extra`` (1, D).
    Returns:
        Reduction with float32 hidden, sizes, labels (index into kept), scores = cls_attn,
        order (LongTensor[R], the official order as a permutation of ``kept``) and extra (float32
        (1, D) or None).
    """
    a = _vector(cls_attn, "cls_attn")
    n = a.numel()
    device = a.device
    if keys.dim() != 2 or keys.shape[0] != n or hidden.dim() != 2 or hidden.shape[0] != n:
        raise ValueError(
            f"keys and hidden must have shape ({n}, F), got {tuple(keys.shape)} and {tuple(hidden.shape)}"
        )
    check_finite(keys=keys, hidden=hidden)
    h = hidden.to(torch.float32)  # merged tokens stay differentiable (losses under reduction)
    if n == 0:
        e = torch.zeros(0, dtype=torch.long, device=device)
        return Reduction(
            kept=e, sizes=torch.zeros(0, device=device), hidden=h, labels=e.clone(), scores=a, order=e.clone()
        )  # no token, nothing pruned: no extra token either

    if n_keep is None:
        outliers = iqr_outliers(a, iqr_coef)
        m = max(1, int(outliers.sum()))  # no outlier: the most-attended token
        chosen = _top(a, m)  # attention descending (the official topk order)
        if plus:
            ratio = m / n  # the official float arithmetic: int(1 / ratio), then / 3
            stride = max(1, int(int(1 / ratio) / 3))
            if grid_shape is not None:
                rows, cols = grid_shape
                if rows * cols != n:
                    raise ValueError(f"grid_shape {grid_shape} does not match N={n}")
                s2 = math.sqrt(stride)  # real-valued, so small strides still thin the grid

                def lattice(size: int) -> torch.Tensor:
                    steps = torch.arange(math.ceil(size / s2), device=device, dtype=torch.float64)
                    return torch.floor(steps * s2).long()

                r_idx, c_idx = lattice(rows), lattice(cols)
                samples = (r_idx[:, None] * cols + c_idx[None, :]).reshape(-1).sort().values
            else:
                samples = torch.arange(0, n - 1, stride, device=device)
            is_chosen = torch.zeros(n, dtype=torch.bool, device=device)
            is_chosen[chosen] = True
            chosen = torch.cat([chosen, samples[~is_chosen[samples]]])
    else:
        budget = max(0, min(int(n_keep), n))
        n_att = budget if not plus else min(budget, max(1, round(plus_attention_share * budget)))
        chosen = _top(a, n_att)
        if budget > n_att:
            rest = torch.ones(n, dtype=torch.bool, device=device)
            rest[chosen] = False
            chosen = torch.cat([chosen, _evenly_spaced(rest.nonzero().squeeze(1), budget - n_att)])
    kept, pos = torch.sort(chosen)  # kept[j] = chosen[pos[j]]
    r = kept.numel()
    order = torch.empty_like(pos)
    order[pos] = torch.arange(r, device=device)  # kept[order[i]] = chosen[i]: the official order

    kn = normalize_rows(keys)
    sim = kn[kept] @ kn.T  # (R, N)
    rows = torch.arange(r, device=device)
    sim[rows, kept] = float("-inf")  # a token does not absorb itself
    k_eff = min(int(k_neighbors), n - 1)
    absorbed = torch.zeros(r, n, dtype=torch.bool, device=device)
    weights = torch.zeros(r, n, device=device)
    if k_eff > 0 and r > 0:
        nb = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k_eff]
        absorbed.scatter_(1, nb, True)
        weights.scatter_(1, nb, a[nb])
    if normalize:
        w_self = a[kept]
        total = (w_self + weights.sum(1)).clamp_min(1e-12)
        merged = (w_self[:, None] * h[kept] + weights @ h) / total[:, None]
    else:
        merged = h[kept] + weights @ h
    extra = None
    if extra_token:
        pruned = torch.ones(n, dtype=torch.bool, device=device)
        pruned[kept] = False
        extra = (a[pruned][None, :] @ h[pruned]).reshape(1, -1)

    absorbed[:, kept] = False  # kept tokens represent themselves
    labels = torch.full((n,), -1, dtype=torch.long, device=device)
    if r > 0:
        best = torch.where(absorbed, sim, float("-inf")).argmax(dim=0)
        labels = torch.where(absorbed.any(dim=0), best, labels)
    labels[kept] = rows
    sizes = cluster_sizes(labels, r)
    return Reduction(kept=kept, sizes=sizes, hidden=merged, labels=labels, scores=a, order=order, extra=extra)


# --------------------------------------------------------------------------------------------------
# HiRED


def hired_crop_scores(
    base_cls_attn: torch.Tensor,
    base_grid: tuple[int, int],
    crop_grid: tuple[int, int],
    alpha: float,
    layout: Literal["spatial", "raster"] = "spatial",
) -> torch.Tensor:
    """HiRED's per-crop share signal: how many of the base image's most-attended tokens fall in each crop.

    HiRED marks the top ``int(V (1 - alpha))`` tokens of the base (full) image by [CLS] attention
    (V = base tokens) and gives every sub-image (crop) a budget share proportional to the number of
    marked tokens inside its region. ``layout="spatial"`` maps base token (y, x) on the
    ``base_grid = (h, w)`` to crop ``(y * rows // h, x * cols // w)`` of the ``crop_grid = (rows, cols)``
    (the crop that covers it). ``layout="raster"`` reproduces the official code, which reshapes the
    raster-ordered base tokens to (rows, cols, -1), i.e. gives crop c (row-major) the c-th contiguous
    chunk of V / (rows * cols) raster tokens (horizontal bands rather than the crop's region). When
    V is not a multiple of the crop count n (the official reshape fails) chunk c is the raster range
    ``[ceil(c V / n), ceil((c + 1) V / n))``, the same chunks whenever they divide evenly.

    Args:
        base_cls_attn: (V,) [CLS] attention of the base image, V = h * w.
        base_grid: (h, w). crop_grid: (rows, cols) crops in row-major order.
        alpha: HiRED's alpha in [0, 1] (share of the budget given to the base image).
        layout: "spatial" or "raster".
    Returns:
        float32 (rows * cols,) marked-token counts.
    """
    a = _vector(base_cls_attn, "base_cls_attn")
    h, w = base_grid
    rows, cols = crop_grid
    if h * w != a.numel():
        raise ValueError(f"base_grid {base_grid} does not match {a.numel()} base tokens")
    if rows < 1 or cols < 1:
        raise ValueError(f"crop_grid must be positive, got {crop_grid}")
    if layout not in ("spatial", "raster"):
        raise ValueError(f"layout must be 'spatial' or 'raster', got {layout!r}")
    v = a.numel()
    marked = torch.zeros(v, dtype=torch.bool, device=a.device)
    marked[_top(a, int(v * (1.0 - alpha)))] = True
    n_crops = rows * cols
    if layout == "raster":
        chunk = torch.arange(v, device=a.device) * n_crops // v  # c for raster index in chunk c
        return torch.zeros(n_crops, device=a.device).index_add_(0, chunk, marked.to(torch.float32))
    y = torch.arange(h, device=a.device)[:, None].expand(h, w).reshape(-1)
    x = torch.arange(w, device=a.device)[None, :].expand(h, w).reshape(-1)
    crop = (y * rows // h) * cols + (x * cols // w)
    return torch.zeros(n_crops, device=a.device).index_add_(0, crop, marked.to(torch.float32))


def hired_budgets(
    crop_scores: torch.Tensor,
    total_budget: int,
    alpha: float,
    tokens_per_crop: int,
    base_tokens: int | None = None,
    exact: bool = False,
) -> torch.Tensor:
    """HiRED's budget split between the base image and its crops.

    Rule (the official ``HiRED_token_selection`` / ``HiRED_sub_img_budgets``): with total budget T,
    ``base = min(int(T * alpha), V_base)``, ``rest = min(T - base, n_crops * V_crop)``, and crop i gets
    ``min(floor(share_i * rest), V_crop)`` with ``share_i = crop_scores_i / sum(crop_scores)``
    (uniform shares if every score is 0). Note that HiRED's alpha is the fraction of the budget given
    to the base image; the crops' split is entirely attention-driven. The shares are computed as the
    official code does, ``(share_i * rest).int()`` with ``share_i`` a float32 ratio (so an exact
    integer share can come out one token lower); the floors can leave up to n_crops tokens unspent,
    as in the original. ``exact=True`` computes the ideal shares in float64 and hands the remainder
    out one token per crop by largest fractional part (ties -> lower crop), then to the base image, so exactly
    ``min(T, capacity)`` tokens are kept (use it for equal-budget tables). Without crops the base
    image gets ``min(T, V_base)``.

    Args:
        crop_scores: (n_crops,) non-negative share signal (`hired_crop_scores`).
        total_budget: T, e.g. ``int(n_images_incl_base * V * token_budget_rate)`` as in HiRED.
        alpha: in [0, 1]. tokens_per_crop: V_crop. base_tokens: V_base (default V_crop).
        exact: spend the whole budget.
    Returns:
        LongTensor[1 + n_crops]: entry 0 is the base image's budget, then one per crop.
    """
    s = _vector(crop_scores, "crop_scores")
    if bool((s < 0).any()):
        raise ValueError("crop_scores must be non-negative")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    total = max(0, int(total_budget))
    v_base = tokens_per_crop if base_tokens is None else int(base_tokens)
    n_crops = s.numel()
    out = torch.zeros(1 + n_crops, dtype=torch.long, device=s.device)
    if n_crops == 0:
        out[0] = min(total, v_base)
        return out
    base = min(int(total * alpha), v_base)
    rest = min(total - base, n_crops * tokens_per_crop)
    if exact:  # float64, multiply before divide: an exact integer share stays exact
        sd = s.double() if float(s.sum()) > 0 else torch.ones_like(s, dtype=torch.float64)
        ideal = sd * rest / sd.sum()
    else:  # the official float32 `budget_ratio = counts / counts.sum(); (budget_ratio * rest).int()`
        sf = s.float() if float(s.sum()) > 0 else torch.ones_like(s, dtype=torch.float32)
        ideal = (sf / sf.sum()) * rest
    crops = torch.clamp(torch.floor(ideal).long(), max=tokens_per_crop)
    if exact:
        left = rest - int(crops.sum())
        frac = ideal - torch.floor(ideal)
        while left > 0:  # at most a few rounds over the (few) crops
            room = (crops < tokens_per_crop).nonzero().squeeze(1)
            if room.numel() == 0:
                break
            give = room[torch.sort(frac[room], descending=True, stable=True).indices[:left]]
            crops[give] += 1
            left -= give.numel()
        base = min(v_base, base + max(0, total - base - int(crops.sum())))
    out[0] = base
    out[1:] = crops
    return out


def hired_select(
    cls_attn_per_crop: Sequence[torch.Tensor], budgets: torch.Tensor | Sequence[int], flat: bool = False
) -> list[torch.Tensor] | torch.Tensor:
    """Keep the top-``budgets[i]`` tokens of image i by its own [CLS] attention (HiRED's second stage).

    Args:
        cls_attn_per_crop: one (V_i,) attention vector per image (base image first, then the crops,
            matching `hired_budgets`'s order). HiRED uses a late encoder layer here.
        budgets: one int per image.
        flat: return one ascending LongTensor of indices into the concatenation of all images'
            tokens instead of one list entry per image.
    Returns:
        list of ascending LongTensor (kept indices within each image), or the flat tensor.
    """
    budgets = [int(b) for b in budgets]
    if len(budgets) != len(cls_attn_per_crop):
        raise ValueError(f"{len(budgets)} budgets for {len(cls_attn_per_crop)} images")
    kept: list[torch.Tensor] = []
    for attn, b in zip(cls_attn_per_crop, budgets, strict=True):
        kept.append(topk_indices(_vector(attn, "cls_attn"), min(max(0, b), attn.numel())))
    if not flat:
        return kept
    offsets = [0]
    for attn in cls_attn_per_crop[:-1]:
        offsets.append(offsets[-1] + attn.numel())
    if not kept:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([k + off for k, off in zip(kept, offsets, strict=True)])


def hired_image_rows(
    late_attn: torch.Tensor,
    early_base_attn: torch.Tensor,
    rate: float,
    alpha: float,
    layout: Literal["spatial", "raster"] = "raster",
    base_grid: tuple[int, int] | None = None,
    crop_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """HiRED's official selection for ONE image over its encoder crops, before any unpadding.

    The official ``HiRED_token_selection`` with P crops of V tokens (crop 0 = the base image, then
    the sub-images in row-major order): total budget ``int(P * V * rate)``, base budget
    ``min(int(total * alpha), V)``, the rest split over the sub-images by `hired_crop_scores` (the
    base image's top ``int(V (1 - alpha))`` early-layer tokens counted per raster chunk) and
    `hired_budgets` (float32 ratio, floored, capped at V); each crop then keeps its top tokens by the
    late-layer attention. With P = 1 (LLaVA-1.5) the image keeps its top ``min(V, int(V * rate))``.
    Tokens a model later removes (LLaVA-NeXT's unpadding) are simply lost, as in the official code.

    Args:
        late_attn: (P, V) [CLS] attention of each crop at the selection layer (official: layer 22,
            summed over heads). early_base_attn: (V,) the base image's layer-0 [CLS] attention.
        rate: token budget rate in [0, 1]. alpha: HiRED's alpha in [0, 1].
        layout: share layout of `hired_crop_scores`; "spatial" needs ``base_grid`` and ``crop_grid``.
        base_grid: (h, w) with h * w = V (default: square). crop_grid: (rows, cols) of the P - 1
            sub-images (default: one row).
    Returns:
        BoolTensor (P, V), True at the selected tokens of each crop.
    """
    if late_attn.dim() != 2:
        raise ValueError(f"late_attn must be (P, V), got {tuple(late_attn.shape)}")
    check_finite(late_attn=late_attn)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    p, v = late_attn.shape
    late = late_attn.detach().float()
    chosen = torch.zeros(p, v, dtype=torch.bool, device=late.device)
    if p == 0:
        return chosen
    if p == 1:
        chosen[0, _top(late[0], min(v, int(v * rate)))] = True
        return chosen
    if base_grid is None:
        side = math.isqrt(v)
        base_grid = (side, v // side) if side * side == v else (1, v)
    if crop_grid is None:
        crop_grid = (1, p - 1)
    shares = hired_crop_scores(early_base_attn, base_grid, crop_grid, alpha, layout=layout)
    total = int(p * v * rate)
    budgets = hired_budgets(shares, total, alpha, v).tolist()
    for c, b in enumerate(budgets):
        chosen[c, _top(late[c], min(int(b), v))] = True
    return chosen


def vispruner_crops(
    cls_attn: torch.Tensor,
    features: torch.Tensor,
    crop: torch.Tensor,
    keep_ratio: float,
    important_ratio: float,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """VisPruner's official per-image budget: every encoder image (a LLaVA-1.5 image, each
    LLaVA-NeXT crop, base included) keeps ``T = int(V_c * keep_ratio)`` of its own V_c tokens by
    `vispruner_select` ("32 x 5 = 160" tokens for a 5-crop LLaVA-NeXT image at T = 32).

    Args:
        cls_attn: (R,) [CLS] attention of every encoder token. features: (R, F) their features (the
            encoder's selected-layer outputs). crop: (R,) the encoder image of each token.
        keep_ratio: T / V_c in [0, 1]. important_ratio: VisPruner's r. dtype: similarity dtype.
    Returns:
        BoolTensor (R,), True at the selected tokens.
    """
    a = _vector(cls_attn, "cls_attn")
    if crop.shape != a.shape:
        raise ValueError(f"crop must have shape {tuple(a.shape)}, got {tuple(crop.shape)}")
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in [0, 1], got {keep_ratio}")
    chosen = torch.zeros(a.numel(), dtype=torch.bool, device=a.device)
    for c in torch.unique(crop).tolist():
        members = (crop == c).nonzero().squeeze(1)
        t = int(members.numel() * keep_ratio)
        sel = vispruner_select(a[members], features[members], t, important_ratio, dtype=dtype)
        chosen[members[sel]] = True
    return chosen
