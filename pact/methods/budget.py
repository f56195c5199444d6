"""Token budgets shared by every method of the zoo: how many visual tokens a sample keeps, and the
selection and threshold-search rules that meet that number.

A budget is given by ``target_tokens`` (VisPruner's "remaining visual tokens") or ``target_ratio``
(the reduction ratio to reach); without one, each method uses its own parameter (``keep_ratio``,
``cluster_ratio``, ``cutoff``, ``dbscan_eps`` ...). The rules, per sample with N visual tokens:

* ``target_tokens = T``  -> keep ``min(T, N)`` tokens.
* ``target_ratio = r``   -> keep ``floor(N * (1 - r))`` tokens, so the achieved reduction ratio is
  at least r (a tiny epsilon absorbs float error: N=10, r=0.3 keeps 7, not 6).
* score methods (FastV, random, norm, custom scores, VisPruner, HiRED) keep exactly that many (top-k,
  ties to the lower index); cluster-count methods (k-means, agglomerative, DPC) use it as their
  number of clusters; threshold methods (DBSCAN's eps, DBDPC's cutoff) search their threshold with
  ``search_threshold`` (the count closest to the target; on a tie the count not above it).
* a method that prunes AND clusters keeps its pruning ratio and meets the budget with its clustering
  (as PACT keeps ``keep_ratio`` and searches ``cutoff``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from pact.ops.clustering import find_threshold
from pact.ops.merge import reduction_from_clusters, reduction_from_keep
from pact.ops.reduction import Reduction
from pact.ops.scoring import keep_count, topk_indices

__all__ = [
    "cluster_reduction",
    "dbdpc_cutoff_for",
    "has_budget",
    "prune_count",
    "pruned_reduction",
    "search_threshold",
    "select_by_scores",
    "target_count",
]


def has_budget(cfg: Any) -> bool:
    """True when the config sets ``target_tokens`` or ``target_ratio``."""
    return getattr(cfg, "target_tokens", None) is not None or getattr(cfg, "target_ratio", None) is not None


def target_count(cfg: Any, n: int) -> int | None:
    """Visual tokens a sample with ``n`` visual tokens keeps under the config's budget (None: no budget).

    ``target_tokens`` T -> min(T, n); ``target_ratio`` r -> floor(n * (1 - r)).
    """
    tokens = getattr(cfg, "target_tokens", None)
    if tokens is not None:
        return max(0, min(int(tokens), n))
    ratio = getattr(cfg, "target_ratio", None)
    if ratio is not None:
        return max(0, min(n, math.floor(n * (1.0 - float(ratio)) + 1e-9)))
    return None


def prune_count(cfg: Any, n: int, *, alone: bool = True) -> int:
    """Tokens a score-based pruning keeps out of ``n``.

    ``alone``: the pruning is the whole method, so a budget (if any) decides; otherwise (pruning
    followed by clustering) the pruning keeps ``int(n * keep_ratio)`` and the clustering meets the budget.
    """
    budget = target_count(cfg, n) if alone else None
    return keep_count(n, float(cfg.keep_ratio)) if budget is None else budget


def _iqr_keep(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """Ascending indices of the scores above ``q1 + alpha * (q3 - q1)`` (the reference's IQR rule,
    which crashed there on an undefined name). Linear-interpolated quartiles, float32."""
    if scores.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    s = scores.float()
    q1, q3 = torch.quantile(s, torch.tensor([0.25, 0.75], device=s.device))
    return (s > q1 + alpha * (q3 - q1)).nonzero().squeeze(1)


def select_by_scores(scores: torch.Tensor, cfg: Any, *, alone: bool = True) -> torch.Tensor:
    """Ascending indices of the visual tokens a score-based pruning keeps.

    ``pruning_selection="ratio"``: the top ``prune_count(cfg, N, alone=alone)`` scores (ties -> lower
    index); ``"iqr"``: every score above ``q1 + iqr_alpha * (q3 - q1)``.
    """
    if getattr(cfg, "pruning_selection", "ratio") == "iqr":
        return _iqr_keep(scores, float(cfg.iqr_alpha))
    return topk_indices(scores, prune_count(cfg, scores.numel(), alone=alone))


def search_threshold(
    run: Callable[[float], int], target: int, lo: float, hi: float, iters: int = 24
) -> tuple[float, int]:
    """Threshold whose kept count is closest to ``target`` (on a tie, the count not above it).

    A thin wrapper over ``pact.ops.clustering.find_threshold`` (bisection between ``lo`` and
    ``hi``; ``run`` maps a threshold to a kept count and must be monotone, in either direction).
    """
    return find_threshold(run, int(target), float(lo), float(hi), iters=iters)


def dbdpc_cutoff_for(
    x: torch.Tensor,
    target: int,
    dn: float = 2.0,
    kernel: str = "gaussian",
    iters: int = 24,
    matrix_max_points: int | None = None,
) -> float:
    """DBDPC cutoff whose number of centers over the points ``x`` (S, F) is closest to ``target``
    (ties: the count not above it). The count only falls as the cutoff grows; cosine distances lie in
    [0, 2], so the search runs over [1e-6, 2]. For PACT with a budget: keep ``keep_ratio``, cluster the
    kept tokens with this cutoff. ``matrix_max_points``: DBDPC's memory form (None: the op's default)."""
    from pact.ops.dbdpc import MATRIX_MAX_POINTS, dbdpc

    if x.shape[0] == 0:
        return 2.0
    limit = MATRIX_MAX_POINTS if matrix_max_points is None else matrix_max_points
    return search_threshold(
        lambda c: int(dbdpc(x, c, dn, kernel=kernel, matrix_max_points=limit)[0].numel()),
        target,
        1e-6,
        2.0,
        iters,
    )[0]


def cluster_reduction(
    hidden: torch.Tensor,
    sizes: torch.Tensor,
    n: int,
    subset: torch.Tensor,
    centers: torch.Tensor,
    labels: torch.Tensor,
    *,
    merge_mean: bool,
    scores: torch.Tensor | None = None,
    extra_labels: torch.Tensor | None = None,
) -> Reduction:
    """Turn a clustering of a subset of the visual tokens into a ``Reduction`` over all N of them.

    Args:
        hidden: (N, D) hidden states of the N visual tokens. sizes: (N,) their current sizes (the
            size-weighted mean of a cluster equals the plain mean at the first reduction).
        n: N. subset: LongTensor[S] ascending visual indices that were clustered (e.g. the tokens a
            pruning kept; ``arange(N)`` without pruning).
        centers: LongTensor[C] indices INTO ``subset`` of the cluster representatives.
        labels: LongTensor[S] index into ``subset`` of each clustered point's representative, -1 = dropped.
        merge_mean: merged token = size-weighted mean of its members (else the center keeps its own).
        scores: optional (N,) pruning scores to record.
        extra_labels: optional LongTensor[N] for tokens OUTSIDE the subset (e.g. retrieved pruned
            tokens): index into ``subset`` of their representative, or -1; entries of subset members
            are ignored.
    Returns:
        Reduction (kept = the centers' visual indices, ascending).
    """
    dev = hidden.device
    full = torch.full((n,), -1, dtype=torch.long, device=dev)
    if extra_labels is not None:
        full = torch.where(extra_labels >= 0, subset[extra_labels.clamp(min=0)], full)
    full[subset] = torch.where(labels >= 0, subset[labels.clamp(min=0)], torch.full_like(labels, -1))
    if centers.numel() == 0:
        return reduction_from_keep(torch.zeros(0, dtype=torch.long, device=dev), n, scores=scores)
    return reduction_from_clusters(
        hidden, subset[centers], full, weights=sizes.float(), merge_mean=merge_mean, scores=scores
    )


def pruned_reduction(
    kept: torch.Tensor, n: int, sizes: torch.Tensor | None = None, scores: torch.Tensor | None = None
) -> Reduction:
    """Pure pruning record: ``kept`` (any order) stay with their own hidden state, the rest go.

    ``sizes`` (N,): the tokens' current sizes, carried over (a token merged at an earlier layer keeps
    standing for its members); default 1.
    """
    red = reduction_from_keep(kept, n, scores=scores)
    if sizes is not None:
        red.sizes = sizes[red.kept].float()
    return red


def split_budget(total: int, shares: list[float]) -> list[int]:
    """Integers summing to ``total`` proportional to ``shares`` (largest remainder, ties -> first):
    one budget split over a sample's images, crops or grids."""
    if not shares:
        return []
    ideal = [total * s for s in shares]
    base = [math.floor(x) for x in ideal]
    left = total - sum(base)
    order = sorted(range(len(shares)), key=lambda i: (-(ideal[i] - base[i]), i))
    for i in order[:left]:
        base[i] += 1
    return base
