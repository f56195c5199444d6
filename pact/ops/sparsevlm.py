"""SparseVLM (ICML'25, ``Gumpest/SparseVLMs``): text raters, their attention to the visual tokens,
the per-stage kept counts, and the DPC-KNN recycling of pruned tokens.

Official rules (``llava/model/language_model/modelling_sparse_llama.py``, ``score.py``, ``utils.py``):

* **Text raters** (once, from the LLM input embeddings): ``m = softmax_t(V T^T).mean_v`` over the
  M text tokens after the image (raw dot products, softmax over the text tokens, mean over the
  visual tokens); the raters are the text tokens with ``m > mean(m)``.
* **Score** at a pruning layer: that layer's attention probabilities, averaged over heads, rows =
  the raters, columns = the visual tokens, averaged over the raters.
* **Kept count**: the fixed per-stage schedule of the budget (``sparse_token_dict``: 64 tokens ->
  66, 30, 17 at layers 2, 6, 15; 128 -> 303, 110, 36; 192 -> 300, 200, 110; 96 -> 238, 48, 26),
  or (the first release) ``int(rank(P) * scale + bias)`` with P the raters x visual attention; both
  capped at ``N - 1``; top-k of the score.
* **Recycling**: among the pruned tokens, the top ``int(0.3 P) + 1`` by score are clustered by
  DPC-KNN into ``int(that / 10) + 1`` tokens (plain means), placed after the kept visual tokens.
"""

from __future__ import annotations

import math

import torch

from pact.ops.attention import Visibility
from pact.ops.scoring import check_finite, check_scale

__all__ = [
    "SPARSEVLM_SCHEDULES",
    "dpc_knn",
    "rank_count",
    "rater_attention",
    "recycle_count",
    "text_raters",
]

SPARSEVLM_SCHEDULES: dict[int, tuple[int, int, int]] = {
    192: (300, 200, 110),
    128: (303, 110, 36),
    96: (238, 48, 26),
    64: (66, 30, 17),
}
"""Official kept visual tokens per stage (of 576) for each budget label (``score.py``, version 1.0)."""


def text_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """BoolTensor[M]: the text tokens that rate the visual ones.

    Args:
        visual: (N, D) visual input embeddings. text: (M, D) embeddings of the text after the image.
    """
    if visual.dim() != 2 or text.dim() != 2 or visual.shape[1] != text.shape[1]:
        raise ValueError(
            f"expected visual (N, D) and text (M, D), got {tuple(visual.shape)}, {tuple(text.shape)}"
        )
    check_finite(visual=visual, text=text)
    if text.shape[0] == 0 or visual.shape[0] == 0:
        return torch.zeros(text.shape[0], dtype=torch.bool, device=text.device)
    m = torch.softmax(visual.detach().float() @ text.detach().float().T, dim=1).mean(dim=0)
    return m > m.mean()


def rater_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    rows: torch.Tensor,
    key_bias: torch.Tensor | None = None,
    scale: float | None = None,
    chunk: int = 64,
    visibility: Visibility | None = None,
) -> torch.Tensor:
    """Causal softmax attention of a few query rows over every key, averaged over heads (float32).

    Args:
        queries: (T, H, d) post-RoPE queries. keys: (T, H_kv, d) post-RoPE keys (GQA repeated here).
        rows: LongTensor[R] query positions. key_bias: optional (T,) added to every logit on a key
            (the engine's log(size) under proportional attention). scale: the layer's softmax scale
            (``ModelAdapter.attention_scale``); None: d^-1/2.
        chunk: query rows per block (memory O(chunk * H * T)).
        visibility: the layer's own mask rule for the T tokens (``Signals.attention_visibility``):
            each row then sees exactly the keys the layer lets it see (Gemma 3: its window, its
            image block); None or plain causal: causal.
    Returns:
        (R, T) float32; a key the row does not see (j > row, when causal) gets 0.
    """
    t, h, d = queries.shape
    if keys.dim() != 3 or keys.shape[0] != t or h % keys.shape[1]:
        raise ValueError(
            f"expected keys (T, H_kv, d) matching queries {tuple(queries.shape)}, got {tuple(keys.shape)}"
        )
    check_scale(scale)
    scale = d**-0.5 if scale is None else scale
    k = keys.detach().float().repeat_interleave(h // keys.shape[1], dim=1)  # (T, H, d)
    pos = torch.arange(t, device=queries.device)
    rule = None if visibility is None or visibility.is_causal else visibility
    for name in ("blocks", "positions"):
        given = None if rule is None else getattr(rule, name)
        if given is not None and given.numel() != t:
            raise ValueError(f"visibility.{name} has {given.numel()} entries; queries have T={t} rows")
    out = []
    for start in range(0, rows.numel(), chunk):
        r = rows[start : start + chunk]
        q = queries.detach()[r].float()  # (c, H, d)
        logits = torch.einsum("chd,thd->cht", q, k) * scale
        if key_bias is not None:
            logits = logits + key_bias.float()[None, None, :]
        hidden_keys = pos[None, :] > r[:, None] if rule is None else ~rule.rows(r, pos)  # (c, T)
        logits = logits.masked_fill(hidden_keys[:, None, :], float("-inf"))
        out.append(torch.softmax(logits, dim=-1).mean(dim=1))
    if not out:
        return torch.zeros(0, t, device=queries.device)
    return torch.cat(out)


def rank_count(relation: torch.Tensor, scale: float, bias: float = 0.0) -> tuple[int, int]:
    """(kept count ``int(rank * scale + bias)``, rank) of the (R, N) raters x visual attention (the
    first release's adaptive count; float32 ``matrix_rank``)."""
    rank = int(torch.linalg.matrix_rank(relation.detach().float())) if relation.numel() else 0
    return int(rank * scale + bias), rank


def recycle_count(pruned: int) -> tuple[int, int]:
    """(candidates, clusters) of the recycling: ``int(0.3 P) + 1`` best pruned tokens (at most P)
    merged into ``int(candidates / 10) + 1`` tokens (at most the candidates)."""
    if pruned <= 0:
        return 0, 0
    candidates = min(pruned, int(pruned * 0.3) + 1)
    return candidates, min(candidates, int(candidates / 10) + 1)


def dpc_knn(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseVLM's ``cluster_and_merge`` clustering (DPC-KNN) of M points into k clusters.

    Distances ``||x_i - x_j|| / sqrt(C)``; density ``exp(-mean of the squared distances to the k
    nearest points, itself included)``; each point's distance to the nearest denser point (the
    densest: the largest distance overall); centers = the k largest ``distance * density``; every
    point joins its nearest center (centers themselves). Ties: the official code adds 1e-6 uniform
    noise to the densities; here equal densities are ordered by index (the lower index counts as
    denser), so the result is deterministic.

    Args:
        x: (M, C) features. k: clusters (clamped to [1, M]).
    Returns:
        (centers LongTensor[k] in decreasing score order, labels LongTensor[M] index into centers).
    """
    if x.dim() != 2:
        raise ValueError(f"x must be (M, C), got {tuple(x.shape)}")
    check_finite(x=x)
    m, c = x.shape
    if m == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device), torch.zeros(
            0, dtype=torch.long, device=x.device
        )
    k = max(1, min(int(k), m))
    xf = x.detach().float()
    dist = torch.cdist(xf, xf) / math.sqrt(c)
    near = torch.topk(dist, k=k, dim=1, largest=False).values
    density = torch.exp(-(near**2).mean(dim=1))
    idx = torch.arange(m, device=x.device)
    # j is denser than i: higher density, or equal density and a lower index
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None])
    )
    parent = torch.where(denser, dist, dist.max()).min(dim=1).values
    score = parent * density
    centers = torch.sort(score, descending=True, stable=True).indices[:k]
    labels = dist[:, centers].argmin(dim=1)
    labels[centers] = torch.arange(k, device=x.device)
    return centers, labels
