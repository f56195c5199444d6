"""DBDPC (distance-bounded density-peak clustering) and the retrieval of pruned tokens.

Definitions (paper §3.2 / reference `DBDPC.fit_variant`, all in float32 whatever the input dtype):

- distance: d_ij = max(0, 1 - cos(x_i, x_j)) with d_ii = 0. Cosine uses norms clamped at 1e-12, so a
  zero vector has cosine 0 with everything: it is at distance 1 from every other point (another
  zero vector included) and at distance 0 from itself.
- density: rho_i = sum_j k(d_ij) with k(d) = exp(-(d/dn)^2) ("gaussian", the reference code) or
  exp(-d/dn) ("exponential", paper eq. 6). The sum includes the self term 1.
- density order: decreasing rho; exact ties go to the LOWER index first (a strict total order, so
  the result never depends on the sort implementation).
- centers (the paper's sequential rule): visit points in density order; a point becomes a center
  iff every center chosen before it is farther than `cutoff` (d > cutoff). Centers are therefore
  pairwise farther than `cutoff` and every other point has a denser center within `cutoff`.
- labels: every point takes its nearest center; equidistant nearest centers go to the DENSER one
  (earlier in density order). Labels hold the point index of the center, so labels[c] == c.

Comparisons with the cutoff are made in float32 (the cutoff is rounded to float32), `<=` meaning
"within". Only the "center row" d[c, p] of the distance matrix is read when deciding whether center
c excludes point p or how far p is from c, so the result is exactly the sequential rule on that
matrix even if floating-point rounding made it very slightly asymmetric. (Densities are float32
sums, so two points in symmetric positions can still differ in the last bit: the tie rule only
applies to exactly equal values.)

Speed: the N x N distance matrix is the only N x N buffer. It is built with row-chunked matmuls
written in place, and 1 - cos, the density and each row's nearest other point are computed on ~1 MiB
slices while they are hot in cache. Center selection uses the principle of the paper's appendix D
(a point none of whose denser, still undecided points is within the cutoff is certainly a center;
the points within the cutoff of a center are certainly not) on blocks of the density order:
- the next block is the first `block_size` still-undecided points in density order;
- inside it, vectorised rounds on its small adjacency matrix resolve the sequential rule (each round
  decides every point whose denser neighbours are all decided, so the number of rounds is the
  longest chain of denser neighbours in the block, not its size);
- one vectorised pass over the new centers' rows then removes the points they exclude from all
  later blocks and keeps a running nearest center, so no separate assignment pass is needed.
Centers whose row has no other point within the cutoff (on data without cluster structure, nearly
all of them) exclude nobody and are nobody's nearest center: their rows are never read. Host
synchronisations: a few per block plus one per round, never one per point.
"""

from __future__ import annotations

import torch

from pact.ops.scoring import check_finite

_NORM_EPS = 1e-12
_KERNELS = ("gaussian", "exponential")
_ELEMENTWISE_ITEMS = 1 << 18  # rows of this many floats (1 MiB) stay in cache for the density passes
_MATMUL_ITEMS = 1 << 23  # 32 MiB of the distance matrix per matmul call


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, D) any float dtype -> float32 (N, D) unit rows; zero rows stay zero (norm clamped at 1e-12)."""
    x = x.float()
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(_NORM_EPS)


def _check_points(x: torch.Tensor, name: str = "x") -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    check_finite(**{name: x})


def _check_cutoff(cutoff: float, dn: float, kernel: str) -> None:
    if not cutoff >= 0.0:
        raise ValueError(f"cutoff must be >= 0, got {cutoff}")
    if not dn > 0.0:
        raise ValueError(f"dn (density bandwidth) must be > 0, got {dn}")
    if kernel not in _KERNELS:
        raise ValueError(f"kernel must be one of {_KERNELS}, got {kernel!r}")


def _kernel_row_sums(dist_rows: torch.Tensor, dn: float, kernel: str, tmp: torch.Tensor) -> torch.Tensor:
    """sum_j k(d_ij) for a (r, N) block of distances, using `tmp` (>= r rows) as scratch."""
    t = tmp[: dist_rows.shape[0]]
    if kernel == "gaussian":
        torch.mul(dist_rows, -1.0 / (dn * dn), out=t).mul_(dist_rows)
    else:
        torch.mul(dist_rows, -1.0 / dn, out=t)
    return t.exp_().sum(1)


def _elementwise_rows(n: int) -> int:
    return max(1, _ELEMENTWISE_ITEMS // max(1, n))


@torch.no_grad()  # discrete decisions only; the in-place `out=` matmuls cannot be differentiated
def _distance_pass(
    x: torch.Tensor, dn: float, kernel: str, cutoff: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distance matrix, densities and "has a neighbour" flags in one chunked pass.

    Returns dist float32 (N, N), rho float32 (N,) and row_near bool (N,): whether some OTHER point
    is within `cutoff` in that row of dist.
    """
    xn = normalize_rows(x)
    n = xn.shape[0]
    dist = torch.empty(n, n, dtype=torch.float32, device=xn.device)
    rho = torch.empty(n, dtype=torch.float32, device=xn.device)
    nearest_other = torch.empty(n, dtype=torch.float32, device=xn.device)
    mm_rows = max(1, _MATMUL_ITEMS // max(1, n))
    ew_rows = _elementwise_rows(n)
    tmp = torch.empty(min(ew_rows, n), n, dtype=torch.float32, device=xn.device)
    xt = xn.T
    one = torch.ones((), dtype=torch.float32, device=xn.device)
    for a in range(0, n, mm_rows):
        b = min(n, a + mm_rows)
        torch.mm(xn[a:b], xt, out=dist[a:b])  # cosines, written in place: no second N x N buffer
        for s in range(a, b, ew_rows):  # ~1 MiB of rows at a time, so the passes below hit the cache
            e = min(b, s + ew_rows)
            rows = torch.sub(one, dist[s:e], out=dist[s:e]).clamp_(min=0.0)  # rounding can push cos > 1
            diagonal = rows[:, s:e].diagonal()
            diagonal.fill_(float("inf"))
            nearest_other[s:e] = rows.amin(1)
            diagonal.zero_()
            rho[s:e] = _kernel_row_sums(rows, dn, kernel, tmp)
    return dist, rho, nearest_other <= cutoff


def cosine_distances(x: torch.Tensor) -> torch.Tensor:
    """(N, D) any float dtype -> float32 (N, N) matrix max(0, 1 - cos) with a zero diagonal.

    Bit-identical to the matrix `dbdpc` works on.
    """
    _check_points(x)
    return _distance_pass(x, 2.0, "gaussian", 0.0)[0]


def density(dist: torch.Tensor, dn: float = 2.0, kernel: str = "gaussian") -> torch.Tensor:
    """rho_i = sum_j k(d_ij) over a (N, N) distance matrix -> float32 (N,) (self term included).

    Bit-identical to the densities `dbdpc` computes from the same matrix.
    """
    _check_cutoff(0.0, dn, kernel)
    n = dist.shape[0]
    dist = dist.float()
    rows = _elementwise_rows(n)
    tmp = torch.empty(min(rows, n), n, dtype=torch.float32, device=dist.device)
    return torch.cat(
        [_kernel_row_sums(dist[s : s + rows], dn, kernel, tmp) for s in range(0, n, rows)]
        or [torch.zeros(0, device=dist.device)]
    )


def density_order(rho: torch.Tensor) -> torch.Tensor:
    """Point indices by decreasing density; exact ties keep the lower index first. (N,) -> Long (N,)."""
    return torch.sort(rho.float(), descending=True, stable=True).indices


def _resolve_block(adjacent: torch.Tensor) -> torch.Tensor:
    """The sequential rule inside one block, with vectorised rounds.

    adjacent: (B, B) bool, adjacent[i, j] = point j is within the cutoff of point i's row, for B
    undecided points listed in density order (none of them excluded by an earlier center).
    Returns (B,) bool: which of them become centers.

    Each round, every undecided point with no undecided denser neighbour is a center (nothing before
    it can exclude it any more); the points those centers reach are excluded. A point is decided as
    soon as all its denser neighbours are, so the number of rounds is the length of the longest chain
    of denser neighbours, not the block size.
    """
    b = adjacent.shape[0]
    earlier = torch.ones(b, b, dtype=torch.bool, device=adjacent.device).triu_(1)
    reach = (adjacent & earlier).float()  # reach[i, j]: i is denser than j and within the cutoff
    undecided = torch.ones(b, dtype=torch.bool, device=adjacent.device)
    center = torch.zeros(b, dtype=torch.bool, device=adjacent.device)
    while True:
        blocked = (undecided.float() @ reach) > 0  # some denser neighbour is still undecided
        new = undecided & ~blocked
        center |= new
        excluded = (new.float() @ reach) > 0
        undecided &= ~(new | excluded)
        if not bool(undecided.any()):
            return center


def _select_and_assign(
    dist: torch.Tensor, rho: torch.Tensor, cutoff: float, row_near: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centers by the sequential rule, and each point's nearest center (module docstring).

    row_near: (N,) bool, whether row i of dist has another point within the cutoff; a center whose
    row has none can exclude nobody and be nobody else's nearest center, so its row is never read.
    """
    n = dist.shape[0]
    device = dist.device
    is_center = torch.zeros(n, dtype=torch.bool, device=device)
    nearest = torch.full((n,), float("inf"), dtype=torch.float32, device=device)  # to the centers so far
    labels = torch.arange(n, device=device)
    queue = density_order(rho)  # the undecided points, in density order
    while queue.numel():
        block, queue = queue[:block_size], queue[block_size:]
        if not bool(row_near[block].any()):
            # Nobody in the block reaches anybody: all are centers and nothing changes for the rest
            # (the common case on data without cluster structure).
            is_center[block] = True
            continue
        centers = block[_resolve_block(dist[block[:, None], block[None, :]] <= cutoff)]
        is_center[centers] = True
        talkers = centers[row_near[centers]]
        if talkers.numel():
            dmin, arg = dist.index_select(0, talkers).min(0)  # first minimum = the densest center
            closer = dmin < nearest  # strict: an earlier (denser) center keeps ties
            nearest = torch.where(closer, dmin, nearest)
            labels = torch.where(closer, talkers[arg], labels)
            queue = queue[nearest[queue] > cutoff]  # drop the points these centers exclude
    centers = is_center.nonzero().squeeze(1)
    labels[centers] = centers
    return centers, labels


def dbdpc_from_distances(
    dist: torch.Tensor,
    cutoff: float,
    *,
    dn: float = 2.0,
    kernel: str = "gaussian",
    rho: torch.Tensor | None = None,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DBDPC on a precomputed (N, N) distance matrix (zero diagonal); see the module docstring.

    rho: optional (N,) densities (default: `density(dist, dn, kernel)`).
    Returns (centers LongTensor[C] ascending, labels LongTensor[N] = point index of each point's center).
    """
    _check_cutoff(cutoff, dn, kernel)
    if dist.dim() != 2 or dist.shape[0] != dist.shape[1]:
        raise ValueError(f"dist must be a square (N, N) matrix, got {tuple(dist.shape)}")
    n = dist.shape[0]
    empty = torch.zeros(0, dtype=torch.long, device=dist.device)
    if n == 0:
        return empty, empty.clone()
    dist = dist.float()
    check_finite(dist=dist)
    if bool(dist.diagonal().ne(0).any()):
        raise ValueError("dist must have a zero diagonal")
    rho = density(dist, dn, kernel) if rho is None else rho.float()
    row_near = (dist <= cutoff).sum(1) > 1  # the zero diagonal always counts once
    return _select_and_assign(dist, rho, cutoff, row_near, block_size)


def dbdpc(
    x: torch.Tensor,
    cutoff: float,
    dn: float = 2.0,
    *,
    kernel: str = "gaussian",
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance-bounded density-peak clustering of N points (paper Algorithm 2).

    Args:
        x: (N, D) clustering vectors in any float dtype (computed in float32).
        cutoff: d_c; centers are pairwise farther than it and every point is within it of its center.
        dn: density bandwidth d_n (the reference hard-codes 2).
        kernel: "gaussian" exp(-(d/dn)^2) (reference code) or "exponential" exp(-d/dn) (paper eq. 6).
        block_size: points resolved together in the center-selection walk (speed only).

    Returns:
        centers: LongTensor[C], ascending point indices of the cluster centers.
        labels: LongTensor[N], point index of each point's (nearest) center; labels[c] == c.

    Raises ValueError on NaN/Inf input. Memory: one float32 N x N matrix plus O(N) and per-chunk buffers.
    """
    _check_cutoff(cutoff, dn, kernel)
    _check_points(x)
    n = x.shape[0]
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long, device=x.device)
        return empty, empty.clone()
    dist, rho, row_near = _distance_pass(x, dn, kernel, cutoff)
    return _select_and_assign(dist, rho, cutoff, row_near, block_size)


def retrieve(points: torch.Tensor, centers: torch.Tensor, max_distance: float) -> torch.Tensor:
    """Attach each point to its nearest center if it is within `max_distance`, else -1.

    Used by PACT to give pruned tokens back to the clusters (max_distance = retrieval_coef * cutoff).
    Like the reference the test is `d <= max_distance`. Distance as in DBDPC (max(0, 1 - cos),
    clamped norms); equidistant nearest centers go to the lower position in `centers`.

    Args:
        points: (M, F) vectors, any float dtype.
        centers: (C, F) the centers' vectors.
    Returns:
        LongTensor[M], index into `centers` (0..C-1) or -1.
    """
    _check_points(points, "points")
    _check_points(centers, "centers")
    m = points.shape[0]
    if m == 0 or centers.shape[0] == 0:
        return torch.full((m,), -1, dtype=torch.long, device=points.device)
    if points.shape[1] != centers.shape[1]:
        raise ValueError(f"points width {points.shape[1]} != centers width {centers.shape[1]}")
    pn, cn = normalize_rows(points), normalize_rows(centers)
    rows = max(1, _MATMUL_ITEMS // centers.shape[0])  # bound the (rows, C) distance chunk
    labels = []
    for s in range(0, m, rows):
        dist = (1.0 - pn[s : s + rows] @ cn.T).clamp_(min=0.0)
        dmin, arg = dist.min(1)  # first minimum = lower position in `centers`
        labels.append(torch.where(dmin <= max_distance, arg, torch.full_like(arg, -1)))
    return torch.cat(labels)
