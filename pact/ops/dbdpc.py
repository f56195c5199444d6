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

Distance rows: every distance is computed as part of one fixed-shape tile, the matmul of T unit
rows (gathered into a tile buffer; rows past the last real one are stale and never read) with all N
unit rows, then 1 - cos clamped at 0 and a zero self-distance. T depends on N only (about 32 MiB of
distances per tile: T = N up to N = 2896, 128 rows at N = 65,536). A matmul's result for one element
can depend on the call's shape (MKL computes 1- and 2-row products differently from wider ones,
cuBLAS picks its kernel by shape), never on the values of the other rows, so a distance row has the
same bits whichever rows share its tile: this is what lets the blocked form below recompute rows and
still take exactly the decisions the stored matrix gives.

Memory (`matrix_max_points`): for N <= matrix_max_points (default 8192, a 256 MiB matrix) the N x N
distance matrix is stored by the first pass and read by the center walk. Above it ("blocked") no
N x N buffer exists. The walk only ever reads entries within the cutoff (a point is excluded by a
center within the cutoff, and a point that is not a center has its nearest center within the
cutoff), so the first pass keeps, for each row, its entries d_ij <= cutoff (j != i) as neighbour
lists (`_NeighbourLists`: int32 column + float32 distance, in row order), and the walk runs on them:
every distance is computed once, by the first pass. The lists have a budget (`_NEIGHBOUR_BUDGET`,
2^25 entries = 256 MiB, the stored matrix at 8192 points): when a tile would pass it, the rows of the
largest degrees stop being kept (a degree cap), and the walk recomputes those "heavy" rows when it
needs them (`_RecomputedRows`, at their first-pass position, T at a time, ahead along the density
order). When the points have on average fewer than budget / N neighbours within the cutoff (512 at
N = 65,536) nothing is recomputed.
Extra memory: the normalised copy of x, O(N) vectors, one (T, N) tile of distances and its (T, N)
bool mask, the lists (at most the budget) and, only if some row is heavy, a row cache of about one
tile. Both forms give the same centers and labels, bit for bit: they share the first pass (so the
densities and the density order are identical) and read the same distance bits, and the two walks
take the same decisions (`_select_and_assign_sparse`).

Speed: the first pass computes the rows tile by tile; 1 - cos, the density and each row's nearest
other point (stored) or within-cutoff mask (blocked) are computed on ~1 MiB slices while they are
hot in cache. Center selection uses the
principle of the paper's appendix D (a point none of whose denser, still undecided points is within
the cutoff is certainly a center; the points within the cutoff of a center are certainly not) on
blocks of the density order:
- the next block is the first `block_size` still-undecided points in density order;
- inside it, vectorised rounds on its small adjacency matrix resolve the sequential rule (each round
  decides every point whose denser neighbours are all decided, so the number of rounds is the
  longest chain of denser neighbours in the block, not its size);
- one vectorised pass over the new centers' rows then removes the points they exclude from all
  later blocks and keeps a running nearest center, so no separate assignment pass is needed.
Points whose row has no other point within the cutoff (on data without cluster structure, nearly
all of them) exclude nobody and are nobody's nearest center: their rows are never read (nor
recomputed). Host synchronisations: a few per block plus one per round, never one per point (the
blocked first pass: one per tile).

Gradients: the clustering is a discrete decision; it is computed without autograd on detached
inputs (a model run with gradients enabled gets the same indices), and only the merged means that
use the labels (`pact.ops.merge`) carry gradients.
"""

from __future__ import annotations

import torch

from pact.ops.scoring import check_finite

_NORM_EPS = 1e-12
_KERNELS = ("gaussian", "exponential")
_ELEMENTWISE_ITEMS = 1 << 18  # rows of this many floats (1 MiB) stay in cache for the density passes
# ... but never fewer rows than this per slice: each element-wise op is one OpenMP region, and with
# 2 threads on a busy machine every region waits for both (65,536 points: 4-row slices made 130k
# regions and tripled the time; 32 rows cost the same single-threaded). N <= 8192: no change.
_MIN_ELEMENTWISE_ROWS = 32
_MATMUL_ITEMS = 1 << 23  # 32 MiB of distances per matmul call (DBDPC tiles, retrieval chunks)
MATRIX_MAX_POINTS = 8192  # default: store the N x N matrix (256 MiB) up to this N, blocked above
# blocked form: within-cutoff entries kept from the first pass (8 bytes each: 256 MiB, the stored
# matrix at MATRIX_MAX_POINTS)
_NEIGHBOUR_BUDGET = 1 << 25


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


def _check_sizes(block_size: int, matrix_max_points: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if isinstance(matrix_max_points, bool) or not isinstance(matrix_max_points, int) or matrix_max_points < 0:
        raise ValueError(f"matrix_max_points must be an int >= 0, got {matrix_max_points!r}")


def _kernel_row_sums(dist_rows: torch.Tensor, dn: float, kernel: str, tmp: torch.Tensor) -> torch.Tensor:
    """sum_j k(d_ij) for a (r, N) block of distances, using `tmp` (>= r rows) as scratch."""
    t = tmp[: dist_rows.shape[0]]
    if kernel == "gaussian":
        torch.mul(dist_rows, -1.0 / (dn * dn), out=t).mul_(dist_rows)
    else:
        torch.mul(dist_rows, -1.0 / dn, out=t)
    return t.exp_().sum(1)


def _tile_rows(n: int) -> int:
    """T: rows of every distance tile for N points (~_MATMUL_ITEMS distances, tiles of equal size)."""
    tiles = -(-n // max(1, _MATMUL_ITEMS // max(1, n)))
    return max(1, -(-n // max(1, tiles)))


def _elementwise_rows(n: int) -> int:
    return max(1, _MIN_ELEMENTWISE_ROWS, _ELEMENTWISE_ITEMS // max(1, n))


def _row_slices(n: int) -> list[tuple[int, int]]:
    """The (start, stop) row slices of the density pass: ~1 MiB (at least 32 rows) each, never across
    a tile boundary.

    `density` and the first pass of `dbdpc` sum exactly the same slices, hence the same bits.
    """
    step, t = _elementwise_rows(n), _tile_rows(n)
    tiles = ((a, min(a + t, n)) for a in range(0, n, t))
    return [(s, min(s + step, b)) for a, b in tiles for s in range(a, b, step)]


class _DistanceRows:
    """Rows of the N x N distance matrix, in fixed-shape (T, N) tiles (module docstring)."""

    def __init__(self, xn: torch.Tensor) -> None:
        n, d = xn.shape
        self.xn = xn
        self.xt = xn.T
        self.rows_per_tile = _tile_rows(n)
        self.tile = torch.zeros(self.rows_per_tile, d, dtype=torch.float32, device=xn.device)

    def __call__(self, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Distance rows of the k <= T points idx, written into out (T, N) float32.

        Returns out[:k], the rows max(0, 1 - cos) with a zero self-distance; rows k.. are scratch.
        """
        k = idx.numel()
        torch.index_select(self.xn, 0, idx, out=self.tile[:k])  # rows k.. keep old rows: never read
        torch.mm(self.tile, self.xt, out=out)  # always (T, D) @ (D, N): the same bits for a row
        rows = out[:k]
        torch.sub(1.0, rows, out=rows).clamp_(min=0.0)  # rounding can push cos > 1
        rows[torch.arange(k, device=idx.device), idx] = 0.0
        return rows

    def at_home(self, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Distance rows of points idx with distinct ``i mod T``, row i written to ``out[i mod T]``.

        The first pass computes row i at position ``i mod T`` of its (T, N) tile; a GEMM's rounding
        may depend on a row's position inside the tile (micro-kernel remainders; seen with 2-row
        tiles), so a recomputed row goes to the same position: the same shape, the same position,
        the same bits. Returns the positions ``idx mod T``; the other rows of ``out`` are scratch.
        """
        home = idx % self.rows_per_tile
        self.tile[home] = self.xn.index_select(0, idx)  # other positions keep old rows: never read
        torch.mm(self.tile, self.xt, out=out)
        torch.sub(1.0, out, out=out).clamp_(min=0.0)  # elementwise: the same bits as the first pass
        out[home, idx] = 0.0
        return home


def _distance_pass(
    xn: torch.Tensor, dn: float, kernel: str, cutoff: float, store: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, _DistanceRows, _NeighbourLists | None]:
    """First pass over every distance row: densities, "has a neighbour" flags, and the matrix or
    the neighbour lists.

    xn: (N, D) float32 unit rows. Returns dist: float32 (N, N) if `store`, else the (T, N) scratch
    tile (the blocked form reuses it); rho float32 (N,); row_near bool (N,), whether some OTHER
    point is within `cutoff` in that row; the row source; and, blocked only, the within-cutoff
    entries of the rows (`_NeighbourLists`, finished), else None.
    """
    n = xn.shape[0]
    distance_rows = _DistanceRows(xn)
    t = distance_rows.rows_per_tile
    # The stored matrix gets the last tile's padding rows too, so every tile is written in place.
    buffer = torch.empty(-(-n // t) * t if store else t, n, dtype=torch.float32, device=xn.device)
    rho = torch.empty(n, dtype=torch.float32, device=xn.device)
    nearest_other = torch.empty(n if store else 0, dtype=torch.float32, device=xn.device)
    lists = None if store else _NeighbourLists(n, _NEIGHBOUR_BUDGET, xn.device)
    within = None if store else torch.empty(t, n, dtype=torch.bool, device=xn.device)
    tmp = torch.empty(min(_elementwise_rows(n), n), n, dtype=torch.float32, device=xn.device)
    step = _elementwise_rows(n)
    for a in range(0, n, t):
        b = min(n, a + t)
        tile = distance_rows(torch.arange(a, b, device=xn.device), buffer[a : a + t] if store else buffer)
        for s in range(a, b, step):  # the slices of `_row_slices`
            e = min(s + step, b)
            rows = tile[s - a : e - a]  # ~1 MiB (>= 32 rows), hot in cache for the passes below
            diagonal = rows[:, s:e].diagonal()
            diagonal.fill_(float("inf"))  # nobody is its own neighbour
            if within is None:
                nearest_other[s:e] = rows.amin(1)
            else:
                torch.le(rows, cutoff, out=within[s - a : e - a])
            diagonal.zero_()
            rho[s:e] = _kernel_row_sums(rows, dn, kernel, tmp)
        if lists is not None:
            lists.add(a, within[: b - a], tile)
    if lists is None:
        return buffer[:n], rho, nearest_other <= cutoff, distance_rows, None
    lists.finish()
    return buffer, rho, lists.degree > 0, distance_rows, lists


class _NeighbourLists:
    """The within-cutoff entries (d_ij <= cutoff, j != i) of the distance rows, kept by the first
    pass of the blocked form, in row order (compressed sparse rows).

    The walk reads nothing else: a point is excluded by a center within the cutoff, and a point
    that is not a center has its nearest center within the cutoff. Every row's degree (number of
    entries) is recorded; its entries are kept unless they would pass the budget: then a degree cap
    is set (or lowered) so that the rows kept so far hold at most half the budget, the rows above
    it are dropped, and later rows above it are not kept. A dropped row ("heavy": many points
    within the cutoff) is recomputed by the walk if it needs it (`_RecomputedRows`). Which rows are
    kept changes the speed only: every entry has the bits of the stored matrix.

    Memory: at most `budget` entries of 8 bytes (int32 column, float32 distance), plus O(N).
    """

    def __init__(self, n: int, budget: int, device: torch.device) -> None:
        self.n, self.budget = n, budget
        self.degree = torch.zeros(n, dtype=torch.long, device=device)  # entries of every row
        self.kept = torch.ones(n, dtype=torch.bool, device=device)  # row's entries are kept
        self.cap: int | None = None  # rows of more entries are not kept
        # (first row, kept degree per row, columns, distances) per tile, rows ascending
        self._chunks: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._count = 0
        self.kept_degree = self.degree
        self.offsets = self.columns = self.distances = torch.zeros(0)

    def add(self, start: int, within: torch.Tensor, rows: torch.Tensor) -> None:
        """Rows start.. of the matrix: within (r, N) bool, d <= cutoff off the diagonal; rows (>= r, N)."""
        r = within.shape[0]
        flat = within.reshape(-1).nonzero().squeeze(1)  # row by row, columns ascending (host sync)
        degree = torch.bincount(flat // self.n, minlength=r)  # faster than a sum over bools
        self.degree[start : start + r] = degree
        if self.cap is not None:
            light = degree <= self.cap
            self.kept[start : start + r] = light
            if not bool(light.all()):
                flat = flat[light.repeat_interleave(degree)]
                degree = degree * light
        count = flat.numel()
        if not count:
            return
        values = rows[:r].reshape(-1)[flat]
        self._chunks.append((start, degree, (flat % self.n).to(torch.int32), values))
        self._count += count
        if self._count > self.budget:
            self._lower_cap()

    def _lower_cap(self) -> None:
        """Drop the rows of the largest degrees: the rest hold at most budget // 2 entries."""
        values = self.degree[self.kept & (self.degree > 0)].sort().values
        total = values.cumsum(0)
        last_of_value = torch.ones_like(values, dtype=torch.bool)
        last_of_value[:-1] = values[1:] != values[:-1]
        fits = values[last_of_value & (total <= self.budget // 2)]
        self.cap = int(fits.max()) if fits.numel() else 0
        self.kept &= self.degree <= self.cap
        chunks, self._count = [], 0
        for start, degree, columns, distances in self._chunks:
            light = degree <= self.cap
            if not bool(light.all()):
                entry = light.repeat_interleave(degree)
                degree, columns, distances = degree * light, columns[entry], distances[entry]
            if columns.numel():
                chunks.append((start, degree, columns, distances))
                self._count += columns.numel()
        self._chunks = chunks

    def finish(self) -> None:
        """Concatenate the tiles' entries (chunk by chunk: at most one chunk is held twice)."""
        device = self.degree.device
        self.kept_degree = self.degree * self.kept
        self.offsets = torch.zeros(self.n + 1, dtype=torch.long, device=device)
        torch.cumsum(self.kept_degree, 0, out=self.offsets[1:])
        self.columns = torch.empty(self._count, dtype=torch.int32, device=device)
        self.distances = torch.empty(self._count, dtype=torch.float32, device=device)
        at = 0
        self._chunks.reverse()
        while self._chunks:
            _, _, columns, distances = self._chunks.pop()
            self.columns[at : at + columns.numel()] = columns
            self.distances[at : at + columns.numel()] = distances
            at += columns.numel()

    def entries(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kept entries of the rows of points (k,) (all kept): (source position in points,
        column, distance), each (E,)."""
        counts = self.kept_degree[points]
        total = int(counts.sum())
        source = torch.repeat_interleave(torch.arange(points.numel(), device=points.device), counts)
        first = torch.cumsum(counts, 0) - counts  # each row's first entry in the result
        idx = self.offsets[points][source] + torch.arange(total, device=points.device) - first[source]
        return source, self.columns[idx].long(), self.distances[idx]


class _StoredRows:
    """The walk's view of a stored (N, N) distance matrix."""

    def __init__(self, dist: torch.Tensor) -> None:
        self.dist = dist

    def columns(self, points: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """(k, m) distances d[points, cols], read from the points' rows."""
        return self.dist[points[:, None], cols[None, :]]

    def rows(self, points: torch.Tensor) -> torch.Tensor:
        """(k, N) distance rows of points."""
        return self.dist.index_select(0, points)


class _RecomputedRows:
    """Distance rows recomputed without storing the matrix: a cache of whole tiles' worth of rows.

    `prepare(points, upcoming)` makes sure the rows of `points` (all `wanted`) are cached; when one
    is missing, the cache is refilled with the rows of `points` and of the next `wanted` points of
    `upcoming` (the rest of the queue, density order), up to the cache size. The queue keeps its
    order and only loses points, so the next refill starts past the previous one: every row is
    computed about once.
    """

    def __init__(
        self, distance_rows: _DistanceRows, scratch: torch.Tensor, wanted: torch.Tensor, block_size: int
    ):
        t = distance_rows.rows_per_tile
        n = wanted.shape[0]
        self.distance_rows = distance_rows
        self.wanted = wanted
        capacity = -(-max(block_size, t) // t) * t  # whole tiles, at least one walk block
        self.scratch = scratch  # the first pass's (T, N) tile buffer, free now: one computation's output
        self.cache = torch.empty(capacity, n, dtype=torch.float32, device=scratch.device)
        self.slot = torch.full((n,), -1, dtype=torch.long, device=wanted.device)

    def prepare(self, points: torch.Tensor, upcoming: torch.Tensor) -> None:
        if bool((self.slot[points] >= 0).all()):
            return
        t, capacity = self.distance_rows.rows_per_tile, self.cache.shape[0]
        # Row i is recomputed at its home position i mod T (`_DistanceRows.at_home`), so one tile
        # computation serves at most one row per home: the points take the first computations of
        # their homes, upcoming rows (density order) the homes still free, up to the cache size.
        count = torch.bincount(points % t, minlength=t)
        calls = max(-(-capacity // t), int(count.max()))
        upcoming = upcoming[self.wanted[upcoming]]
        call_u = count[upcoming % t] + _rank_within(upcoming % t, t)
        keep = call_u < calls
        wanted = torch.cat([points, upcoming[keep]])[:capacity]
        call = torch.cat([_rank_within(points % t, t), call_u[keep]])[:capacity]
        self.slot.fill_(-1)
        filled = 0
        for c in range(calls):
            members = wanted[call == c]
            k = members.numel()
            if k:
                home = self.distance_rows.at_home(members, self.scratch)
                torch.index_select(self.scratch, 0, home, out=self.cache[filled : filled + k])
                self.slot[members] = torch.arange(filled, filled + k, device=members.device)
                filled += k

    def rows(self, points: torch.Tensor) -> torch.Tensor:
        """(k, N) distance rows of points (prepared)."""
        return self.cache.index_select(0, self.slot[points])


class _BlockedRows:
    """The walk's view of the distance matrix in the blocked form: the within-cutoff entries of a
    row, from the first pass's neighbour lists or, for a row too heavy to keep, recomputed."""

    def __init__(
        self,
        lists: _NeighbourLists,
        distance_rows: _DistanceRows,
        scratch: torch.Tensor,
        row_near: torch.Tensor,
        cutoff: float,
        block_size: int,
    ) -> None:
        self.lists, self.cutoff = lists, cutoff
        heavy = row_near & ~lists.kept
        # the row cache (~one tile) only exists when some row could not be kept
        self.recomputed = (
            _RecomputedRows(distance_rows, scratch, heavy, block_size) if bool(heavy.any()) else None
        )

    def entries(
        self, points: torch.Tensor, upcoming: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Entries d <= cutoff off the diagonal of the rows of points (k,): (source position in
        points, column, distance), each (E,). upcoming: the rest of the queue (density order), whose
        heavy rows a recomputation may compute ahead."""
        if self.recomputed is None:
            return self.lists.entries(points)
        heavy = ~self.lists.kept[points]
        if not bool(heavy.any()):
            return self.lists.entries(points)
        light, heavy = (~heavy).nonzero().squeeze(1), heavy.nonzero().squeeze(1)
        source, columns, distances = self.lists.entries(points[light])
        self.recomputed.prepare(points[heavy], upcoming)
        rows = self.recomputed.rows(points[heavy])
        within = rows <= self.cutoff
        within[torch.arange(heavy.numel(), device=rows.device), points[heavy]] = False
        row, column = within.nonzero().unbind(1)
        return (
            torch.cat([light[source], heavy[row]]),
            torch.cat([columns, column]),
            torch.cat([distances, rows[row, column]]),
        )


def _rank_within(groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """For each element, how many earlier elements share its group: (K,) long in [0, num_groups)."""
    order = torch.sort(groups, stable=True).indices
    start = torch.cumsum(torch.bincount(groups, minlength=num_groups), 0) - torch.bincount(
        groups, minlength=num_groups
    )
    rank = torch.empty_like(groups)
    rank[order] = torch.arange(groups.numel(), device=groups.device) - start[groups[order]]
    return rank


def cosine_distances(x: torch.Tensor) -> torch.Tensor:
    """(N, D) any float dtype -> float32 (N, N) matrix max(0, 1 - cos) with a zero diagonal.

    Bit-identical to the matrix `dbdpc` works on (stored or recomputed).
    """
    _check_points(x)
    with torch.no_grad():
        dist = _distance_pass(normalize_rows(x.detach()), 2.0, "gaussian", 0.0, store=True)[0]
    return dist


def density(dist: torch.Tensor, dn: float = 2.0, kernel: str = "gaussian") -> torch.Tensor:
    """rho_i = sum_j k(d_ij) over a (N, N) distance matrix -> float32 (N,) (self term included).

    Bit-identical to the densities `dbdpc` computes from the same matrix.
    """
    _check_cutoff(0.0, dn, kernel)
    n = dist.shape[0]
    dist = dist.detach().float()
    tmp = torch.empty(min(_elementwise_rows(n), n), n, dtype=torch.float32, device=dist.device)
    return torch.cat(
        [_kernel_row_sums(dist[s:e], dn, kernel, tmp) for s, e in _row_slices(n)]
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
    source: _StoredRows,
    rho: torch.Tensor,
    cutoff: float,
    row_near: torch.Tensor,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centers by the sequential rule, and each point's nearest center (module docstring).

    source: the stored distance rows.
    row_near: (N,) bool, whether row i has another point within the cutoff; a point whose row has
    none can exclude nobody and be nobody else's nearest center, so its row is never read.
    """
    n = rho.shape[0]
    device = rho.device
    is_center = torch.zeros(n, dtype=torch.bool, device=device)
    nearest = torch.full((n,), float("inf"), dtype=torch.float32, device=device)  # to the centers so far
    labels = torch.arange(n, device=device)
    queue = density_order(rho)  # the undecided points, in density order
    while queue.numel():
        block, queue = queue[:block_size], queue[block_size:]
        near = row_near[block].nonzero().squeeze(1)  # block positions whose row reaches somebody
        if not near.numel():
            # Nobody in the block reaches anybody: all are centers and nothing changes for the rest
            # (the common case on data without cluster structure).
            is_center[block] = True
            continue
        near_points = block[near]
        adjacent = torch.zeros(block.numel(), block.numel(), dtype=torch.bool, device=device)
        adjacent[near] = source.columns(near_points, block) <= cutoff  # other rows reach only themselves
        is_block_center = _resolve_block(adjacent)
        is_center[block[is_block_center]] = True
        talkers = near_points[is_block_center[near]]  # new centers with a neighbour, in density order
        if talkers.numel():
            dmin, arg = source.rows(talkers).min(0)  # first minimum = the densest center
            closer = dmin < nearest  # strict: an earlier (denser) center keeps ties
            nearest = torch.where(closer, dmin, nearest)
            labels = torch.where(closer, talkers[arg], labels)
            queue = queue[nearest[queue] > cutoff]  # drop the points these centers exclude
    centers = is_center.nonzero().squeeze(1)
    labels[centers] = centers
    return centers, labels


def _select_and_assign_sparse(
    source: _BlockedRows, rho: torch.Tensor, cutoff: float, row_near: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_select_and_assign` on the rows' within-cutoff entries: the same blocks, the same rounds.

    The decisions only read entries d <= cutoff: a block point is excluded by a new center whose row
    has it within the cutoff, and a point that is not a center has its nearest center within the
    cutoff (the one that excluded it is), so the larger distances of the stored walk's `min` never
    win; a center's own label is set at the end in both. Nearest center: the smallest distance, ties
    to the densest center (lowest density rank), replacing an earlier block's only if strictly
    closer, as the stored walk's first minimum and strict `<`.
    """
    n = rho.shape[0]
    device = rho.device
    is_center = torch.zeros(n, dtype=torch.bool, device=device)
    nearest = torch.full((n,), float("inf"), dtype=torch.float32, device=device)  # within the cutoff
    labels = torch.arange(n, device=device)
    order = density_order(rho)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=device)
    position = torch.full((n,), -1, dtype=torch.long, device=device)  # in the current block, else -1
    best = torch.full((n,), float("inf"), dtype=torch.float32, device=device)  # scratch, reset per block
    best_rank = torch.full((n,), n, dtype=torch.long, device=device)
    queue = order  # the undecided points, in density order
    while queue.numel():
        block, queue = queue[:block_size], queue[block_size:]
        near = row_near[block].nonzero().squeeze(1)  # block positions whose row reaches somebody
        if not near.numel():
            is_center[block] = True  # nobody in the block reaches anybody
            continue
        near_points = block[near]
        row, column, distance = source.entries(near_points, queue)
        b = block.numel()
        position[block] = torch.arange(b, device=device)
        target = position[column]
        position[block] = -1
        inside = target >= 0
        adjacent = torch.zeros(b, b, dtype=torch.bool, device=device)
        adjacent[near[row[inside]], target[inside]] = True
        is_block_center = _resolve_block(adjacent)
        is_center[block[is_block_center]] = True
        talks = is_block_center[near][row]  # entries of the new centers' rows
        if bool(talks.any()):
            center, column, distance = near_points[row[talks]], column[talks], distance[talks]
            best.scatter_reduce_(0, column, distance, "amin")
            dmin = best[column]
            tie = distance == dmin
            best_rank.scatter_reduce_(0, column[tie], rank[center[tie]], "amin")
            closer = dmin < nearest[column]  # strict: an earlier (denser) center keeps ties
            hit = column[closer]
            nearest[hit] = dmin[closer]
            labels[hit] = order[best_rank[hit]]
            best[column] = float("inf")
            best_rank[column] = n
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
    _check_sizes(block_size, 0)
    if dist.dim() != 2 or dist.shape[0] != dist.shape[1]:
        raise ValueError(f"dist must be a square (N, N) matrix, got {tuple(dist.shape)}")
    n = dist.shape[0]
    empty = torch.zeros(0, dtype=torch.long, device=dist.device)
    if n == 0:
        return empty, empty.clone()
    dist = dist.detach().float()
    check_finite(dist=dist)
    if bool(dist.diagonal().ne(0).any()):
        raise ValueError("dist must have a zero diagonal")
    rho = density(dist, dn, kernel) if rho is None else rho.detach().float()
    row_near = (dist <= cutoff).sum(1) > 1  # the zero diagonal always counts once
    return _select_and_assign(_StoredRows(dist), rho, cutoff, row_near, block_size)


def dbdpc(
    x: torch.Tensor,
    cutoff: float,
    dn: float = 2.0,
    *,
    kernel: str = "gaussian",
    block_size: int = 128,
    matrix_max_points: int = MATRIX_MAX_POINTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance-bounded density-peak clustering of N points (paper Algorithm 2).

    Args:
        x: (N, D) clustering vectors in any float dtype (computed in float32; never differentiated).
        cutoff: d_c; centers are pairwise farther than it and every point is within it of its center.
        dn: density bandwidth d_n (the reference hard-codes 2).
        kernel: "gaussian" exp(-(d/dn)^2) (reference code) or "exponential" exp(-d/dn) (paper eq. 6).
        block_size: points resolved together in the center-selection walk (speed only).
        matrix_max_points: store the N x N distance matrix when N <= this, else keep only each row's
            within-cutoff entries (no N x N buffer). Same result either way; 0 = always blocked.

    Returns:
        centers: LongTensor[C], ascending point indices of the cluster centers.
        labels: LongTensor[N], point index of each point's (nearest) center; labels[c] == c.

    Raises ValueError on NaN/Inf input. Memory: the normalised float32 copy of x, O(N) vectors, and
    either the float32 N x N matrix (N <= matrix_max_points) or one (T, N) tile of distances (T ~
    32 MiB / (4 N) rows) with its bool mask plus the rows' within-cutoff entries, at most
    `_NEIGHBOUR_BUDGET` (256 MiB; see the module docstring).
    """
    _check_cutoff(cutoff, dn, kernel)
    _check_sizes(block_size, matrix_max_points)
    _check_points(x)
    n = x.shape[0]
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long, device=x.device)
        return empty, empty.clone()
    with torch.no_grad():
        store = n <= matrix_max_points
        dist, rho, row_near, distance_rows, lists = _distance_pass(
            normalize_rows(x.detach()), dn, kernel, cutoff, store
        )
        if lists is None:
            return _select_and_assign(_StoredRows(dist), rho, cutoff, row_near, block_size)
        # Blocked: the first pass's (T, N) tile buffer is the scratch of any recomputed row.
        source = _BlockedRows(lists, distance_rows, dist, row_near, cutoff, block_size)
        return _select_and_assign_sparse(source, rho, cutoff, row_near, block_size)


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
    with torch.no_grad():  # a discrete decision: never differentiated (module docstring)
        return _retrieve(normalize_rows(points.detach()), normalize_rows(centers.detach()), max_distance)


def _retrieve(pn: torch.Tensor, cn: torch.Tensor, max_distance: float) -> torch.Tensor:
    """`retrieve` on unit rows: (M, F), (C, F) float32 -> LongTensor[M]."""
    m = pn.shape[0]
    rows = max(1, _MATMUL_ITEMS // cn.shape[0])  # bound the (rows, C) distance chunk: O(C) memory
    labels = []
    for s in range(0, m, rows):
        dist = (1.0 - pn[s : s + rows] @ cn.T).clamp_(min=0.0)
        dmin, arg = dist.min(1)  # first minimum = lower position in `centers`
        labels.append(torch.where(dmin <= max_distance, arg, torch.full_like(arg, -1)))
    return torch.cat(labels)
