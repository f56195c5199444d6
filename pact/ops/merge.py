"""Cluster sizes and means, and the builders of the `Reduction` record every method returns.

Cluster vocabulary used here: `labels` (N,) holds, for each visual token, the POINT index of the
token that represents it (a cluster's center, or the token itself), or -1 if it is dropped. This is
what `dbdpc` returns; `reduction_from_clusters` turns it into the `Reduction` convention (indices
into the kept list).
"""

from __future__ import annotations

import torch

from pact.ops.reduction import Reduction
from pact.ops.scoring import check_finite


def _member_weights(labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return torch.ones(labels.shape[0], dtype=torch.float32, device=labels.device)
    if weights.shape != labels.shape:
        raise ValueError(f"weights shape {tuple(weights.shape)} != labels shape {tuple(labels.shape)}")
    return weights.float()


def cluster_sizes(
    labels: torch.Tensor, num_clusters: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Total member weight of each cluster (member count when `weights` is None).

    labels: Long (N,) cluster index in [0, num_clusters) or -1 (member of no cluster).
    weights: optional (N,) per-member weights, e.g. the sizes of already-merged tokens.
    Returns float32 (num_clusters,).
    """
    w = _member_weights(labels, weights)
    valid = labels >= 0
    sizes = torch.zeros(num_clusters, dtype=torch.float32, device=labels.device)
    return sizes.index_add_(0, labels[valid], w[valid])


def cluster_means(
    x: torch.Tensor, labels: torch.Tensor, num_clusters: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """(Weighted) mean of the members of each cluster, accumulated in float32.

    x: (N, D) any float dtype; labels: Long (N,) in [0, num_clusters) or -1; weights: optional (N,).
    Returns float32 (num_clusters, D); an empty cluster gives zeros.
    """
    w = _member_weights(labels, weights)
    valid = labels >= 0
    lab, w = labels[valid], w[valid]
    sums = torch.zeros(num_clusters, x.shape[1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, lab, x[valid].float() * w[:, None])
    total = torch.zeros(num_clusters, dtype=torch.float32, device=x.device).index_add_(0, lab, w)
    return sums / total.clamp_min(torch.finfo(torch.float32).tiny)[:, None]


def reduction_from_keep(kept: torch.Tensor, num_visual: int, scores: torch.Tensor | None = None) -> Reduction:
    """Pure pruning: the tokens in `kept` stay with their own hidden state (size 1), the rest go.

    kept: Long (R,) indices in [0, num_visual), any order, no duplicates.
    """
    kept = kept.long().flatten().sort().values
    if kept.numel() and (int(kept[0]) < 0 or int(kept[-1]) >= num_visual):
        raise ValueError(f"kept indices must be in [0, {num_visual})")
    if kept.numel() > 1 and not bool((kept[1:] > kept[:-1]).all()):
        raise ValueError("kept indices must be unique")
    labels = torch.full((num_visual,), -1, dtype=torch.long, device=kept.device)
    labels[kept] = torch.arange(kept.numel(), device=kept.device)
    sizes = torch.ones(kept.numel(), dtype=torch.float32, device=kept.device)
    return Reduction(kept=kept, sizes=sizes, hidden=None, labels=labels, scores=scores)


def reduction_from_clusters(
    hidden: torch.Tensor | None,
    centers: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    merge_mean: bool = True,
    *,
    scores: torch.Tensor | None = None,
) -> Reduction:
    """One token per cluster, at its center's slot (and so with its center's position id).

    Args:
        hidden: (N, D) hidden states of the N visual tokens (needed when merge_mean).
        centers: Long (C,) point indices of the cluster centers, any order, no duplicates.
        labels: Long (N,) point index of each token's center (labels[c] == c), or -1 for tokens
            that belong to no cluster (dropped).
        weights: optional (N,) member weights for size-weighted merging (e.g. tokens that already
            stand for several originals); default 1 each.
        merge_mean: True: the merged token is the (weighted) mean of its members, in float32.
            False: the center keeps its own hidden state (Reduction.hidden is None).
        scores: optional (N,) scores stored in the record.

    Returns:
        Reduction with kept = sorted centers, sizes = total member weight per cluster.
    """
    n = labels.shape[0]
    kept = centers.long().flatten().sort().values
    slot = torch.full((n,), -1, dtype=torch.long, device=labels.device)  # point index -> kept index
    slot[kept] = torch.arange(kept.numel(), device=labels.device)
    member = labels >= 0
    new_labels = torch.where(member, slot[labels.clamp(min=0)], torch.full_like(labels, -1))
    # One synchronisation validates the whole clustering: labels of members point at centers,
    # centers label themselves, no duplicate centers.
    bad = (member & (new_labels < 0)).any()
    if kept.numel():
        bad = bad | (labels[kept] != kept).any()
        if kept.numel() > 1:
            bad = bad | (kept[1:] == kept[:-1]).any()
    if bool(bad):
        raise ValueError(
            "inconsistent clustering: every label must be -1 or a center's point index, centers must be "
            "unique and label themselves"
        )
    sizes = cluster_sizes(new_labels, kept.numel(), weights)
    merged = None
    if merge_mean:
        if hidden is None or hidden.shape[0] != n:
            raise ValueError(f"merge_mean needs hidden states of shape ({n}, D)")
        check_finite(hidden=hidden)
        merged = cluster_means(hidden, new_labels, kept.numel(), weights)
    return Reduction(kept=kept, sizes=sizes, hidden=merged, labels=new_labels, scores=scores)
