"""PACT: prune with EUTI, cluster the survivors with DBDPC, retrieve close pruned tokens, merge.

The ablations are the same function with a step switched off:
- EUTI only:        pact_reduce(..., cluster=False)
- DBDPC only:       pact_reduce(..., prune=False)      (every visual token is clustered)
- no retrieval:     pact_reduce(..., retrieval=False)
"""

from __future__ import annotations

import torch

from pact.ops.dbdpc import MATRIX_MAX_POINTS, dbdpc, retrieve
from pact.ops.merge import reduction_from_clusters, reduction_from_keep
from pact.ops.reduction import Reduction
from pact.ops.scoring import euti_scores, keep_topk


def pact_reduce(
    hidden: torch.Tensor,
    queries: torch.Tensor | None,
    keys: torch.Tensor | None,
    features: torch.Tensor,
    visual_mask: torch.Tensor,
    *,
    keep_ratio: float = 0.55,
    cutoff: float = 0.21,
    retrieval: bool = True,
    retrieval_coef: float = 1.5,
    dn: float = 2.0,
    kernel: str = "gaussian",
    matrix_max_points: int = MATRIX_MAX_POINTS,
    merge_mean: bool = True,
    prune: bool = True,
    cluster: bool = True,
    support: str = "prefix",
    query_from: str = "prefix",
    multiply_by_norm: bool = True,
    norm_order: float = 2.0,
    scale: float | None = None,
) -> Reduction:
    """The full PACT reduction of one sample's N visual tokens at one layer.

    Args:
        hidden: (T, D) residual stream entering the layer; merged tokens are means of its rows.
        queries: (T, H, d) and keys: (T, H_kv, d) the layer's projections before RoPE (read by EUTI
            only: may be None when prune=False).
        features: (T, F) clustering vectors (the reference: post-RoPE keys, KV heads concatenated).
        visual_mask: (T,) bool, the candidate visual tokens.
        keep_ratio: EUTI keeps exactly int(N * keep_ratio) tokens.
        cutoff: DBDPC cutoff d_c.
        retrieval: give pruned tokens within retrieval_coef * cutoff (<=) back to their nearest center.
        dn, kernel: DBDPC density bandwidth and kernel (see `pact.ops.dbdpc`).
        matrix_max_points: DBDPC stores its N x N distance matrix up to this many kept tokens and
            keeps only within-cutoff distance entries above (same result, no N x N buffer).
        merge_mean: merged token = unweighted mean of all members (kept + retrieved), else the
            center keeps its own hidden state.
        prune / cluster: switch EUTI / DBDPC off for the ablations (see the module docstring).
        support, query_from, multiply_by_norm, norm_order, scale: EUTI options (see `euti_scores`).

    Returns:
        Reduction over the N visual tokens (scores = EUTI scores when pruning, else None).

    Memory is linear in N above `matrix_max_points` (EUTI: one (H, T) logit row per head; DBDPC:
    tiles of distance rows; retrieval: ~32 MiB chunks). The choices (EUTI's top-k, DBDPC,
    retrieval) are discrete and computed without autograd; the merged hidden states are means of
    `hidden`'s rows and keep their gradients.
    """
    if features.dim() != 2 or features.shape[0] != hidden.shape[0]:
        raise ValueError(f"features must be (T={hidden.shape[0]}, F), got {tuple(features.shape)}")
    vis = visual_mask.nonzero().squeeze(1) if visual_mask.dim() == 1 else None
    scores = None
    if prune:
        if queries is None or keys is None:
            raise ValueError("EUTI pruning needs the layer's queries and keys (got None)")
        scores = euti_scores(
            hidden,
            queries,
            keys,
            visual_mask,
            support=support,
            query_from=query_from,
            multiply_by_norm=multiply_by_norm,
            norm_order=norm_order,
            scale=scale,
        )
        n = scores.numel()
        keep = keep_topk(scores, keep_ratio)
    else:
        if vis is None or visual_mask.dtype != torch.bool or visual_mask.numel() != hidden.shape[0]:
            raise ValueError(f"visual_mask must be a bool tensor of shape ({hidden.shape[0]},)")
        n = vis.numel()
        keep = torch.arange(n, device=hidden.device)
    if not cluster:
        return reduction_from_keep(keep, n, scores=scores)

    vis_features = features[vis]
    centers_local, labels_local = dbdpc(
        vis_features[keep], cutoff, dn, kernel=kernel, matrix_max_points=matrix_max_points
    )
    centers = keep[centers_local]  # visual-token indices
    labels = torch.full((n,), -1, dtype=torch.long, device=hidden.device)
    labels[keep] = keep[labels_local]
    if retrieval and keep.numel() < n and centers.numel():
        pruned = torch.ones(n, dtype=torch.bool, device=hidden.device)
        pruned[keep] = False
        pruned_idx = pruned.nonzero().squeeze(1)
        near = retrieve(vis_features[pruned_idx], vis_features[centers], retrieval_coef * cutoff)
        labels[pruned_idx] = torch.where(near >= 0, centers[near.clamp(min=0)], near)
    return reduction_from_clusters(hidden[vis], centers, labels, merge_mean=merge_mean, scores=scores)
