"""Diversity- and duplication-based selection of visual tokens (DivPrune, DART).

Pure tensor functions: no transformers import, no model knowledge. Every distance and similarity is
computed in float32 whatever the input dtype; ties go to the lower index. No N x N buffer is held:
the rows a rule needs are computed in chunks (``_ROW_BUDGET`` float32 items) or one at a time.

* ``farthest_point_selection``: DivPrune's greedy max-min diversity (cosine distance ``1 - cos``).
  The first point is the one whose nearest neighbour is farthest (the official code's second-smallest
  entry of its distance column, the smallest being its own 0); each next point maximises its
  distance to the nearest already-selected point.
* ``least_similar_to_pivots``: DART's duplication rule: pivots in turn each take the ``count``
  remaining candidates least cosine-similar to them (greedy, without replacement).
"""

from __future__ import annotations

import torch

from pact.ops.scoring import check_finite

__all__ = ["farthest_point_selection", "least_similar_to_pivots", "unit_rows"]

_ROW_BUDGET = 1 << 22  # float32 items of one chunk of distance rows (16 MiB)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> float32 (N, D) rows scaled to unit L2 norm (a zero row stays zero: cosine 0 to all)."""
    if x.dim() != 2:
        raise ValueError(f"features must be (N, D), got {tuple(x.shape)}")
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _nearest_neighbour_distance(unit: torch.Tensor) -> torch.Tensor:
    """float32 (N,): per point, the second-smallest cosine distance of its row (the smallest is its
    own, 0), computed over row chunks of about ``_ROW_BUDGET`` items."""
    n = unit.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=unit.device)
    rows = max(1, min(n, _ROW_BUDGET // max(1, n)))
    for start in range(0, n, rows):
        dist = 1.0 - unit[start : start + rows] @ unit.T  # (r, N)
        out[start : start + rows] = dist.topk(2, dim=1, largest=False).values[:, 1]
    return out


def farthest_point_selection(features: torch.Tensor, count: int) -> torch.Tensor:
    """DivPrune's greedy max-min diversity selection of ``count`` of the N rows of ``features``.

    Rule (official ``DivPrune``): with ``D = 1 - cos(x_i, x_j)``, the first pick maximises the
    second-smallest entry of its distance column (its nearest neighbour's distance); pick t > 0
    maximises ``min_{s selected} D[s, j]`` over the points not yet selected. Ties: the lower index
    (``argmax``'s first maximum, as the official ``torch.argmax``).

    Args:
        features: (N, D) any float dtype (compared in float32).
        count: points to select, in [0, N].
    Returns:
        LongTensor (count,): the selected row indices in SELECTION order (sort them for sequence order).

    Memory: O(N D) plus one chunk of distance rows for the first pick, then one distance row per
    step (the running minimum is updated incrementally, which gives exactly the official minimum over
    the selected rows). The greedy is sequential by nature: ``count`` steps of one (D,) x (D, N)
    product each, no host synchronisation.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be (N, D), got {tuple(features.shape)}")
    n = features.shape[0]
    if not 0 <= count <= n:
        raise ValueError(f"count must be in [0, {n}], got {count}")
    check_finite(features=features)
    dev = features.device
    selected = torch.empty(count, dtype=torch.long, device=dev)
    if count == 0:
        return selected
    unit = unit_rows(features)
    if n == 1:
        selected[0] = 0
        return selected
    first = torch.argmax(_nearest_neighbour_distance(unit))
    selected[0] = first
    nearest = 1.0 - unit @ unit[first]  # (N,) distance to the nearest selected point
    taken = torch.zeros(n, dtype=torch.bool, device=dev)
    taken[first] = True
    for t in range(1, count):
        # A selected point is never chosen again (the official rule relies on its own distance
        # 0 for that and would repeat a point once only exact duplicates of selected ones remain).
        pick = torch.argmax(nearest.masked_fill(taken, -float("inf")))
        selected[t] = pick
        taken[pick] = True
        nearest = torch.minimum(nearest, 1.0 - unit @ unit[pick])
    return selected


def least_similar_to_pivots(
    features: torch.Tensor, pivots: list[int], candidates: torch.Tensor, count: int
) -> torch.Tensor:
    """DART's duplication-aware selection: each pivot, in the given order, takes the ``count``
    remaining candidates least cosine-similar to it; a taken candidate is no longer available.

    Args:
        features: (T, D) any float dtype (float32 cosine similarities).
        pivots: row indices of the pivots, in processing order (a pivot may also be a candidate row;
            the caller removes it from ``candidates`` if it must not be taken).
        candidates: LongTensor (M,) ascending row indices that may be taken.
        count: candidates each pivot takes (a pivot takes what is left when fewer remain).
    Returns:
        LongTensor (K,): the taken row indices, ascending. Ties: the lower row index.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be (T, D), got {tuple(features.shape)}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    check_finite(features=features)
    dev = features.device
    if candidates.numel() == 0 or count == 0 or not pivots:
        return torch.zeros(0, dtype=torch.long, device=dev)
    cand_unit = unit_rows(features[candidates])  # (M, D)
    pivot_unit = unit_rows(features[torch.tensor(pivots, dtype=torch.long, device=dev)])  # (P, D)
    sims = pivot_unit @ cand_unit.T  # (P, M): P is a handful of pivots
    available = torch.ones(candidates.numel(), dtype=torch.bool, device=dev)
    taken: list[torch.Tensor] = []
    left = candidates.numel()
    for p in range(len(pivots)):
        k = min(count, left)
        if k == 0:
            break
        # Least similar first; a stable ascending sort keeps equal similarities in index order.
        order = torch.sort(sims[p].masked_fill(~available, float("inf")), stable=True).indices[:k]
        available[order] = False
        taken.append(order)
        left -= k
    if not taken:
        return torch.zeros(0, dtype=torch.long, device=dev)
    return candidates[torch.cat(taken)].sort().values
