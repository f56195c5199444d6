"""ToMe (bipartite soft matching) inside a causal LLM, as the PACT reference runs it, and the
layer-equivalence formulas that put ToMe and VTW on the same budget as a single-layer method.

The reference (``utils.py::bipartite_soft_matching`` / ``merge_connected_components`` / ``TOME``)
applies ToMe progressively at every decoder layer from layer 0: at layer i the current visual tokens
are split alternately into A (even positions) and B (odd positions) in their current order, every A
token finds its most cosine-similar B token, and the ``r_i`` A tokens with the highest similarity are
merged into their B token (several A tokens may join the same B: the merge groups are stars).
A merged token is the size-weighted mean of its members, stays at the B token's slot and position,
and carries the summed size into proportional attention in the following layers.
"""

from __future__ import annotations

import math

import torch

from pact.ops.dbdpc import normalize_rows
from pact.ops.merge import cluster_sizes, reduction_from_clusters
from pact.ops.reduction import Reduction
from pact.ops.scoring import check_finite

__all__ = [
    "bipartite_merge",
    "merge_reduction",
    "tome_clamp",
    "tome_reduce",
    "tome_schedule",
    "vtw_layer",
]


def _effective_keep(num_layers: int, keep_ratio: float, equivalent_layer: int) -> float:
    """p_eff = 1 - (1 - p)(n - L_eq)/n: the keep fraction that, applied from layer 0 for all n
    layers, costs as much as keeping p from layer L_eq on."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in [0, 1], got {keep_ratio}")
    if not 0 <= equivalent_layer <= num_layers:
        raise ValueError(f"equivalent_layer must be in [0, {num_layers}], got {equivalent_layer}")
    n = num_layers
    return 1.0 - (1.0 - keep_ratio) * (n - equivalent_layer) / n


def tome_schedule(num_layers: int, n_visual: int, keep_ratio: float, equivalent_layer: int = 4) -> list[int]:
    """Per-layer merge counts r_i of the reference's ToMe schedule (before the run-time clamp).

    With n = num_layers, p = keep_ratio, L_eq = equivalent_layer, N = n_visual:
    ``p_eff = 1 - (1-p)(n-L_eq)/n``, ``r_0 = 6 n (1-p_eff) N / ((n+1)(2n+1))``,
    ``r_i = floor(r_0 (n-i)/n) + 1`` for i = 0..n-1. The linearly decaying schedule makes the
    layer-averaged number of visual tokens equal to that of a single-layer method keeping p from
    layer L_eq (sum_j r_j (n-j) = r_0 (n+1)(2n+1)/6 up to the floors and the +1).
    Clamp each r_i at run time with `tome_clamp`.

    Args:
        num_layers: decoder layers n. n_visual: visual tokens N before layer 0.
        keep_ratio: p (``perc_tokeep_tome_total``). equivalent_layer: L_eq
            (``tome_equivalant_layer_for_reduction``, 4).
    Returns:
        list of n ints, r_i for layer i.
    """
    n = num_layers
    p_eff = _effective_keep(n, keep_ratio, equivalent_layer)
    r0 = 6.0 * n * (1.0 - p_eff) * n_visual / ((n + 1) * (2 * n + 1))
    return [math.floor(r0 * (n - i) / n) + 1 for i in range(n)]


def tome_clamp(r: int, n_current: int) -> int:
    """The reference's run-time clamp of a ToMe merge count: ``max(0, min(r, floor(N_cur/2) - 2))``."""
    return max(0, min(int(r), n_current // 2 - 2))


def vtw_layer(num_layers: int, keep_ratio: float, equivalent_layer: int = 4) -> int:
    """Layer at which VTW withdraws all visual tokens to match a single-layer budget.

    ``L_vtw = round(n (1 - (1-p)(n-L_eq)/n))`` (Python's round, half to even), e.g. n=28, L_eq=4,
    p=0.353 -> 12.
    """
    return round(num_layers * _effective_keep(num_layers, keep_ratio, equivalent_layer))


def bipartite_merge(
    metric: torch.Tensor, r: int, sizes: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ToMe bipartite soft-matching step over N tokens in their current order.

    A = tokens at even positions, B = odd positions. Cosine similarity (float32) of each A token to
    every B token; each A token's best B (ties -> lower B); the r A tokens with the highest best
    similarity (ties -> lower A) are merged into their B token. ``r`` is only clamped to what is
    feasible (``<= |A|``, 0 if B is empty); apply `tome_clamp` first to reproduce the reference.

    Args:
        metric: (N, F) matching features (the reference: post-RoPE keys of the layer), any float dtype.
        r: number of A tokens to merge.
        sizes: (N,) current sizes (default all ones).
    Returns:
        kept: LongTensor[N - r] ascending (all B tokens and the unmerged A tokens).
        labels: LongTensor[N], index into ``kept`` of each token's representative.
        sizes: float32 [N - r], summed sizes of the merged groups.
    """
    if metric.dim() != 2:
        raise ValueError(f"metric must have shape (N, F), got {tuple(metric.shape)}")
    check_finite(metric=metric)
    n = metric.shape[0]
    device = metric.device
    sizes = torch.ones(n, device=device) if sizes is None else sizes.detach().to(torch.float32)
    if sizes.shape != (n,):
        raise ValueError(f"sizes must have shape ({n},), got {tuple(sizes.shape)}")
    idx = torch.arange(n, device=device)
    a_idx, b_idx = idx[0::2], idx[1::2]
    r = max(0, min(int(r), a_idx.numel() if b_idx.numel() else 0))
    target = torch.arange(n, device=device)  # point index of each token's representative
    if r:
        x = normalize_rows(metric.detach())
        sim = x[a_idx] @ x[b_idx].T
        best_b = sim.argmax(dim=1)
        best_sim = sim.gather(1, best_b[:, None]).squeeze(1)
        merged = torch.sort(best_sim, descending=True, stable=True).indices[:r]
        target[a_idx[merged]] = b_idx[best_b[merged]]
    keep_mask = target == torch.arange(n, device=device)
    kept = keep_mask.nonzero().squeeze(1)
    slot = torch.cumsum(keep_mask.long(), 0) - 1  # slot of a kept token in `kept`
    labels = slot[target]
    return kept, labels, cluster_sizes(labels, kept.numel(), sizes)


def merge_reduction(
    hidden: torch.Tensor,
    kept: torch.Tensor,
    labels: torch.Tensor,
    sizes: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
) -> Reduction:
    """Build a `Reduction` whose kept tokens are the size-weighted means of their groups.

    ``hidden_r = sum_{labels_j = r} s_j h_j / sum_{labels_j = r} s_j`` (float32), new size
    ``sum_{labels_j = r} s_j``. Tokens with label -1 are dropped. With all sizes 1 this is the plain
    cluster mean every clustering method uses. This is `pact.ops.merge.reduction_from_clusters` for
    labels given as indices into ``kept`` (the `Reduction` convention) instead of point indices.

    Args:
        hidden: (N, D) hidden states of the current visual tokens, any float dtype.
        kept: LongTensor[R] ascending. labels: LongTensor[N] index into kept or -1 (labels[kept[r]] == r).
        sizes: (N,) current sizes (default ones).
        scores: optional (N,) scores to attach.
    Returns:
        Reduction with float32 hidden (R, D) and sizes (R,).
    """
    if kept.numel():
        point_labels = torch.where(labels >= 0, kept[labels.clamp_min(0)], labels)
    else:
        point_labels = torch.full_like(labels, -1)
    weights = None if sizes is None else sizes.detach().float()
    # hidden is not detached: gradients must reach the merged tokens (losses under reduction)
    return reduction_from_clusters(hidden, kept, point_labels, weights=weights, scores=scores)


def tome_reduce(
    hidden: torch.Tensor, metric: torch.Tensor, r: int, sizes: torch.Tensor | None = None
) -> Reduction:
    """One reference ToMe layer step: clamp r like the reference, match on `metric`, merge `hidden`.

    Args:
        hidden: (N, D) hidden states entering the layer. metric: (N, F) matching features.
        r: scheduled merge count (`tome_schedule`), clamped with `tome_clamp(r, N)`.
        sizes: (N,) sizes carried from the previous layer (default ones).
    Returns:
        Reduction (size-weighted means, summed sizes).
    """
    n = hidden.shape[0]
    kept, labels, _ = bipartite_merge(metric, tome_clamp(r, n), sizes)
    return merge_reduction(hidden, kept, labels, sizes)
