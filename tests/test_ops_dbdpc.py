"""DBDPC and retrieval against the paper's sequential rule, written as plainly as possible."""

from __future__ import annotations

import importlib
import itertools
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pact.ops import cosine_distances, dbdpc, dbdpc_from_distances, density, density_order, retrieve

# `pact.ops.dbdpc` is the function (the package re-exports it); the module is reached by name.
dbdpc_module = importlib.import_module("pact.ops.dbdpc")


def _reference_dbdpc(dist: list[list[float]], rho: list[float], cutoff: float) -> tuple[list[int], list[int]]:
    """Paper Algorithm 2, literally: visit by decreasing density (ties: lower index first); a point is
    a center iff every existing center is farther than the cutoff; then each point takes its nearest
    center (ties: the center created first, i.e. the denser one). dist[c][p] is read from c's row."""
    n = len(dist)
    order = sorted(range(n), key=lambda i: (-rho[i], i))
    centers: list[int] = []
    for i in order:
        if all(dist[c][i] > cutoff for c in centers):
            centers.append(i)
    labels = []
    for p in range(n):
        best = centers[0]
        for c in centers[1:]:
            if dist[c][p] < dist[best][p]:
                best = c
        labels.append(p if p in centers else best)
    return sorted(centers), labels


def _reference_distances_and_density(x: torch.Tensor, dn: float, kernel: str):
    """float64 double loop from the definitions (zero vectors: cosine 0)."""
    x = x.double()
    n = x.shape[0]
    dist = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i != j:
                ni, nj = float(x[i].norm()), float(x[j].norm())
                cos = float(x[i] @ x[j]) / (max(ni, 1e-12) * max(nj, 1e-12))
                dist[i][j] = max(0.0, 1.0 - cos)
    k = (lambda d: math.exp(-((d / dn) ** 2))) if kernel == "gaussian" else (lambda d: math.exp(-d / dn))
    rho = [sum(k(d) for d in row) for row in dist]
    return dist, rho


def _blobs(n: int, dim: int, k: int, spread: float, seed: int) -> torch.Tensor:
    """Points around k random directions; pairwise cosine distance inside a blob ~ dim*spread^2."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(k, dim, generator=g), dim=1)
    which = torch.randint(0, k, (n,), generator=g)
    scale = spread * (0.5 + torch.rand(k, generator=g))  # blobs of different tightness
    return centers[which] + scale[which, None] * torch.randn(n, dim, generator=g)


CASES = [
    # (n, dim, blobs, spread, cutoff, kernel)
    (1, 4, 1, 0.1, 0.2, "gaussian"),
    (2, 4, 2, 0.1, 0.2, "gaussian"),
    (7, 3, 2, 0.2, 0.3, "exponential"),
    (40, 8, 3, 0.15, 0.21, "gaussian"),
    (150, 16, 6, 0.1, 0.21, "exponential"),
    (300, 32, 10, 0.07, 0.1, "gaussian"),
    (300, 32, 10, 0.07, 0.35, "exponential"),
    (257, 6, 1, 1.0, 0.05, "gaussian"),  # plain random data
    (400, 64, 40, 0.05, 0.21, "gaussian"),
]


@pytest.mark.parametrize(("n", "dim", "k", "spread", "cutoff", "kernel"), CASES)
def test_matches_sequential_rule_on_the_same_distances(n, dim, k, spread, cutoff, kernel):
    x = _blobs(n, dim, k, spread, seed=n + dim)
    dist = cosine_distances(x)
    rho = density(dist, 2.0, kernel)
    ref_centers, ref_labels = _reference_dbdpc(dist.double().tolist(), rho.tolist(), cutoff)
    for block_size in (1 if n <= 40 else 9, 128):
        centers, labels = dbdpc(x, cutoff, kernel=kernel, block_size=block_size)
        assert centers.tolist() == ref_centers
        assert labels.tolist() == ref_labels
    centers, labels = dbdpc_from_distances(dist, cutoff, kernel=kernel)
    assert centers.tolist() == ref_centers and labels.tolist() == ref_labels


def test_distances_and_density_match_float64_definitions():
    x = _blobs(60, 12, 4, 0.15, seed=3)
    x[5] = 0.0  # a zero vector
    for kernel, dn in [("gaussian", 2.0), ("exponential", 2.0), ("gaussian", 0.3)]:
        ref_dist, ref_rho = _reference_distances_and_density(x, dn, kernel)
        dist = cosine_distances(x)
        torch.testing.assert_close(
            dist.double(), torch.tensor(ref_dist, dtype=torch.float64), rtol=0, atol=2e-6
        )
        torch.testing.assert_close(
            density(dist, dn, kernel).double(), torch.tensor(ref_rho, dtype=torch.float64), rtol=1e-5, atol=0
        )
    assert torch.equal(dist.diagonal(), torch.zeros(60))
    assert torch.equal(dist[5, torch.arange(60) != 5], torch.ones(59))  # zero vector: distance 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_an_independent_float64_reference_on_clustered_data(seed):
    # Tight, well separated blobs: no distance near the cutoff, so float32 vs float64 cannot matter.
    x = _blobs(120, 24, 8, 0.03, seed=seed)
    ref_dist, ref_rho = _reference_distances_and_density(x, 2.0, "gaussian")
    ref_centers, ref_labels = _reference_dbdpc(ref_dist, ref_rho, 0.3)
    gaps = sorted(ref_rho)
    assert min(b - a for a, b in itertools.pairwise(gaps)) > 1e-5  # the order is robust too
    centers, labels = dbdpc(x, 0.3)
    assert centers.tolist() == ref_centers and labels.tolist() == ref_labels
    assert 8 <= centers.numel() < 120


def test_chunk_boundaries_do_not_change_anything(monkeypatch):
    x = _blobs(203, 16, 7, 0.1, seed=9)
    want = dbdpc(x, 0.2)
    want_dist, want_rho = cosine_distances(x), density(cosine_distances(x))
    monkeypatch.setattr(dbdpc_module, "_MATMUL_ITEMS", 203 * 17)  # 17-row matmul chunks
    monkeypatch.setattr(dbdpc_module, "_ELEMENTWISE_ITEMS", 203 * 5)  # 5-row element-wise chunks
    monkeypatch.setattr(dbdpc_module, "_MIN_ELEMENTWISE_ROWS", 1)
    got = dbdpc(x, 0.2)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    dist = cosine_distances(x)
    ref_centers, ref_labels = _reference_dbdpc(dist.double().tolist(), density(dist).tolist(), 0.2)
    assert got[0].tolist() == ref_centers and got[1].tolist() == ref_labels
    torch.testing.assert_close(dist, want_dist, rtol=0, atol=1e-6)
    torch.testing.assert_close(density(dist), want_rho, rtol=1e-6, atol=0)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 60),
    dim=st.integers(2, 8),
    k=st.integers(1, 6),
    spread=st.floats(0.01, 1.0),
    cutoff=st.floats(0.0, 1.2),
    seed=st.integers(0, 10_000),
)
def test_properties(n, dim, k, spread, cutoff, seed):
    x = _blobs(n, dim, k, spread, seed)
    centers, labels = dbdpc(x, cutoff)
    dist = cosine_distances(x)
    assert centers.dtype == labels.dtype == torch.long and labels.shape == (n,)
    if n == 0:
        assert centers.numel() == 0
        return
    assert torch.equal(centers, centers.unique())  # ascending, unique
    assert torch.equal(labels[centers], centers)
    assert bool(torch.isin(labels, centers).all())
    # Centers are pairwise farther than the cutoff (read from the earlier-visited center's row).
    order = density_order(density(dist))
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n)
    sub = dist[centers][:, centers]
    earlier = rank[centers][:, None] < rank[centers][None, :]
    assert bool((sub[earlier] > cutoff).all())
    # Every point is within the cutoff of its center, and that center is a nearest one.
    d_own = dist[labels, torch.arange(n)]
    assert bool((d_own <= cutoff).all())
    assert torch.equal(d_own, dist[centers].min(0).values)


def test_degenerate_inputs():
    empty_c, empty_l = dbdpc(torch.zeros(0, 5), 0.2)
    assert empty_c.shape == (0,) and empty_l.shape == (0,) and empty_c.dtype == torch.long
    assert [t.tolist() for t in dbdpc(torch.randn(1, 5), 0.2)] == [[0], [0]]
    close = torch.tensor([[1.0, 0.0], [1.0, 0.1]])
    assert [t.tolist() for t in dbdpc(close, 0.2)] == [[0], [0, 0]]  # equal densities: lower index
    far = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert [t.tolist() for t in dbdpc(far, 0.2)] == [[0, 1], [0, 1]]
    same = torch.randn(1, 16).repeat(50, 1)
    assert [t.tolist() for t in dbdpc(same, 0.21)] == [[0], [0] * 50]
    zeros = torch.zeros(4, 8)
    zeros[2] = 1.0
    # Zero vectors are at distance 1 from everything (each other included): 4 singletons.
    assert [t.tolist() for t in dbdpc(zeros, 0.5)] == [[0, 1, 2, 3], [0, 1, 2, 3]]
    centers, labels = dbdpc(zeros, 1.0)  # distance 1 <= cutoff 1: one cluster
    assert centers.numel() == 1 and bool((labels == centers).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_equals_float32_cast(dtype):
    x = _blobs(300, 32, 10, 0.07, seed=4).to(dtype)
    got = dbdpc(x, 0.21)
    want = dbdpc(x.float(), 0.21)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_an_error(bad):
    x = torch.randn(10, 4)
    x[3, 2] = bad
    with pytest.raises(ValueError, match="x contains non-finite"):
        dbdpc(x, 0.2)
    with pytest.raises(ValueError, match="points contains non-finite"):
        retrieve(x, torch.randn(2, 4), 0.3)


def test_parameter_errors():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="cutoff"):
        dbdpc(x, -0.1)
    with pytest.raises(ValueError, match="dn"):
        dbdpc(x, 0.1, dn=0.0)
    with pytest.raises(ValueError, match="kernel"):
        dbdpc(x, 0.1, kernel="cauchy")
    with pytest.raises(ValueError, match="2-D"):
        dbdpc(torch.randn(5), 0.1)
    with pytest.raises(ValueError, match="diagonal"):
        dbdpc_from_distances(torch.ones(3, 3), 0.1)


@pytest.mark.parametrize("block_size", [1, 2, 128])  # ties within one block and across blocks
def test_tie_rules_on_handmade_distances(block_size):
    def run(dist, cutoff, rho=None):
        out = dbdpc_from_distances(torch.tensor(dist), cutoff, rho=rho, block_size=block_size)
        return [t.tolist() for t in out]

    # Points 0 and 1 are 0.5 apart; point 2 is 0.2 from both. Cutoff 0.3.
    dist = [[0.0, 0.5, 0.2], [0.5, 0.0, 0.2], [0.2, 0.2, 0.0]]
    # Equal densities of 0 and 1: the lower index is visited first (both become centers anyway);
    # point 2 is equidistant from both centers and goes to the denser one.
    assert run(dist, 0.3, torch.tensor([2.0, 2.0, 1.0])) == [[0, 1], [0, 1, 0]]
    assert run(dist, 0.3, torch.tensor([2.0, 3.0, 1.0])) == [[0, 1], [0, 1, 1]]
    # Exact density tie between two points within the cutoff: the lower index becomes the center.
    assert run([[0.0, 0.1], [0.1, 0.0]], 0.3) == [[0], [0, 0]]
    # A distance exactly equal to the cutoff excludes (the rule is "farther than the cutoff").
    assert run([[0.0, 0.1], [0.1, 0.0]], 0.1) == [[0], [0, 0]]
    assert run([[0.0, 0.1], [0.1, 0.0]], 0.0999) == [[0, 1], [0, 1]]
    # Only the center's row is read: here 0 reaches 1 but 1 does not reach 0.
    assert run([[0.0, 0.1], [0.5, 0.0]], 0.3, torch.tensor([2.0, 1.0])) == [[0], [0, 0]]
    assert run([[0.0, 0.1], [0.5, 0.0]], 0.3, torch.tensor([1.0, 2.0])) == [[0, 1], [0, 1]]


def _reference_retrieve(points, centers, max_distance):
    out = []
    for p in points.double():
        d = [
            max(0.0, 1.0 - float(p @ c) / (max(float(p.norm()), 1e-12) * max(float(c.norm()), 1e-12)))
            for c in centers.double()
        ]
        best = min(range(len(d)), key=lambda i: (d[i], i))
        out.append(best if d[best] <= max_distance else -1)
    return out


def test_retrieve_matches_reference_and_uses_less_or_equal():
    pts = _blobs(80, 16, 5, 0.15, seed=2)
    cen = _blobs(6, 16, 5, 0.15, seed=2)
    for radius in (0.05, 0.3, 1.0):
        assert retrieve(pts, cen, radius).tolist() == _reference_retrieve(pts, cen, radius)
    # Exactly at the radius: (0, 1) is at distance exactly 1 from (1, 0).
    p, c = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert retrieve(p, c, 1.0).tolist() == [0]  # <=, and an equidistant tie goes to the first center
    assert retrieve(p, c, 0.999).tolist() == [-1]
    assert retrieve(torch.zeros(0, 2), c, 1.0).shape == (0,)
    assert retrieve(p, torch.zeros(0, 2), 1.0).tolist() == [-1]
    assert retrieve(p.bfloat16(), c.bfloat16(), 1.0).tolist() == [0]


def test_reference_style_algorithm_and_bench_ops_smoke(capsys):
    """The benchmark's re-implementation of the reference's recursive scheme (a different algorithm)
    agrees with dbdpc on clustered data, and `pact bench ops` runs end to end (timings not checked)."""
    from pact import bench
    from pact.bench import ops as bench_ops

    for kind, seed in (("blobs", 0), ("blobs", 1), ("random", 0)):
        x = bench_ops.make_points(kind, 300, 32, seed=seed)
        centers, labels = dbdpc(x, 0.21)
        ref_centers, ref_labels = bench_ops.reference_style_dbdpc(x, 0.21)
        assert torch.equal(centers, ref_centers)
        assert torch.equal(
            cosine_distances(x)[labels, torch.arange(300)], cosine_distances(x)[ref_labels, torch.arange(300)]
        )
    rows = bench_ops.bench_ops(sizes=(40,), dim=8, repeats=1, reference_max=40)
    assert [(r["n"], r["data"]) for r in rows] == [(40, "blobs"), (40, "random")]
    assert all(r["dbdpc_s"] > 0 and r["matmul_s"] > 0 and r["reference_s"] is not None for r in rows)
    assert [r["form"] for r in rows] == ["matrix", "matrix"]
    blocked = bench_ops.bench_ops(
        sizes=(300,), dim=8, repeats=1, kinds=("blobs",), matrix_max_points=0, matmul_max=0
    )
    assert blocked[0]["form"] == "blocked" and blocked[0]["matmul_s"] is None and blocked[0]["pass_s"] > 0
    assert blocked[0]["clusters"] == dbdpc(bench_ops.make_points("blobs", 300, 8), 0.21)[0].numel()
    assert bench.main(["ops", "--sizes", "30", "--dim", "8", "--repeats", "1", "--data", "random"]) == 0
    assert (
        bench.main(["ops", "--sizes", "130", "--dim", "8", "--repeats", "1", "--matrix-max-points", "0"]) == 0
    )
    assert "random" in capsys.readouterr().out


# ---- blocked form (no N x N matrix): the same centers and labels as the stored matrix ---------------


def _both_forms(x, cutoff, block_size=128, **kw):
    stored = dbdpc(x, cutoff, block_size=block_size, matrix_max_points=x.shape[0], **kw)
    blocked = dbdpc(x, cutoff, block_size=block_size, matrix_max_points=0, **kw)
    return stored, blocked


@pytest.mark.parametrize(("n", "dim", "k", "spread", "cutoff", "kernel"), CASES)
@pytest.mark.parametrize(
    ("tile_items", "budget"),  # tile_items None: the real tile size; budget None: the default
    [(None, None), (17, None), (64, None), (17, 0), (None, 0), (64, 150), (None, 900)],
)
def test_blocked_equals_stored_on_the_oracle_cases(
    monkeypatch, n, dim, k, spread, cutoff, kernel, tile_items, budget
):
    """The same centers and labels whether the rows come from the neighbour lists (all kept), are
    all recomputed (budget 0) or some of each (a budget that a few tiles overflow)."""
    if tile_items is not None:  # tiles of tile_items // n rows: 17 divides none of these N
        monkeypatch.setattr(dbdpc_module, "_MATMUL_ITEMS", tile_items * n)
    if budget is not None:
        monkeypatch.setattr(dbdpc_module, "_NEIGHBOUR_BUDGET", budget)
    x = _blobs(n, dim, k, spread, seed=n + dim)
    dist = cosine_distances(x)
    ref_centers, ref_labels = _reference_dbdpc(
        dist.double().tolist(), density(dist, 2.0, kernel).tolist(), cutoff
    )
    for block_size in (1, 5, 9, 128, 1000):
        stored, blocked = _both_forms(x, cutoff, block_size, kernel=kernel)
        assert stored[0].tolist() == blocked[0].tolist() == ref_centers
        assert stored[1].tolist() == blocked[1].tolist() == ref_labels


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 90),
    dim=st.integers(2, 8),
    k=st.integers(1, 6),
    spread=st.floats(0.0, 1.0),
    cutoff=st.sampled_from([0.0, 0.05, 0.21, 0.5, 1.0, 1.5]),
    duplicates=st.integers(0, 30),
    zeros=st.integers(0, 3),
    block_size=st.integers(1, 20),
    tile_rows=st.integers(1, 12),
    budget=st.sampled_from([None, 0, 1, 7, 40, 200]),
    seed=st.integers(0, 10_000),
)
# Found by hypothesis: a 2-row tile computes a row with other bits at position 1 than at position 0,
# so a recomputed row must sit at its first-pass position (i mod T). Budget 0: every row with a
# neighbour is recomputed.
@example(
    n=7,
    dim=5,
    k=1,
    spread=0.875,
    cutoff=0.0,
    duplicates=3,
    zeros=1,
    block_size=1,
    tile_rows=2,
    budget=0,
    seed=0,
)
def test_blocked_equals_stored_with_ties_and_duplicates(
    n, dim, k, spread, cutoff, duplicates, zeros, block_size, tile_rows, budget, seed
):
    """Exact duplicates and zero vectors give exactly equal distances and densities (ties); budget:
    the neighbour entries the blocked form may keep (None: the default), the rest is recomputed."""
    x = _blobs(n, dim, k, spread, seed)
    g = torch.Generator().manual_seed(seed)
    copies = x[torch.randint(0, n, (duplicates,), generator=g)]
    x = torch.cat([x, copies, torch.zeros(zeros, dim)])[torch.randperm(n + duplicates + zeros, generator=g)]
    saved = dbdpc_module._MATMUL_ITEMS, dbdpc_module._NEIGHBOUR_BUDGET
    dbdpc_module._MATMUL_ITEMS = tile_rows * x.shape[0]  # hypothesis forbids the monkeypatch fixture
    if budget is not None:
        dbdpc_module._NEIGHBOUR_BUDGET = budget
    try:
        stored, blocked = _both_forms(x, cutoff, block_size)
        dist = cosine_distances(x)
    finally:
        dbdpc_module._MATMUL_ITEMS, dbdpc_module._NEIGHBOUR_BUDGET = saved
    ref_centers, ref_labels = _reference_dbdpc(dist.double().tolist(), density(dist).tolist(), cutoff)
    assert stored[0].tolist() == blocked[0].tolist() == ref_centers
    assert stored[1].tolist() == blocked[1].tolist() == ref_labels


def test_recomputed_rows_have_the_bits_of_the_stored_matrix(monkeypatch):
    """The premise of the blocked form: a row recomputed among any other rows (here a 1-row and a
    2-row gather, where MKL's own 1- and 2-row products differ from wider ones) has the same bits."""
    n = 301
    monkeypatch.setattr(dbdpc_module, "_MATMUL_ITEMS", 40 * n)  # 8 tiles of 38 rows, the last padded
    x = _blobs(n, 48, 9, 0.1, seed=5)
    xn = dbdpc_module.normalize_rows(x)
    dist, rho, row_near, rows_of, lists = dbdpc_module._distance_pass(xn, 2.0, "gaussian", 0.21, store=True)
    assert lists is None
    assert rows_of.rows_per_tile == 38 and dist.shape == (n, n)
    out = torch.empty(38, n)
    for idx in ([7], [300, 0], list(range(150, 188)), torch.randperm(n)[:38].tolist()):
        idx = torch.tensor(idx)
        assert torch.equal(rows_of(idx, out), dist[idx])
    scratch_dist, scratch_rho, scratch_near, _, lists = dbdpc_module._distance_pass(
        xn, 2.0, "gaussian", 0.21, store=False
    )
    assert scratch_dist.shape == (38, n)  # blocked: one tile, no N x N buffer
    assert torch.equal(scratch_rho, rho) and torch.equal(scratch_near, row_near)
    assert torch.equal(density(dist), rho)


def test_auto_threshold_picks_the_form(monkeypatch):
    """N <= matrix_max_points stores the matrix; above it the first pass allocates one tile only."""
    shapes = []
    real = dbdpc_module._distance_pass

    def spy(xn, dn, kernel, cutoff, store):
        out = real(xn, dn, kernel, cutoff, store)
        shapes.append(tuple(out[0].shape))
        return out

    monkeypatch.setattr(dbdpc_module, "_distance_pass", spy)
    x = _blobs(500, 8, 5, 0.1, seed=1)
    monkeypatch.setattr(dbdpc_module, "_MATMUL_ITEMS", 100 * 500)
    a = dbdpc(x, 0.2, matrix_max_points=500)
    b = dbdpc(x, 0.2, matrix_max_points=499)
    assert shapes == [(500, 500), (100, 500)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert dbdpc_module.MATRIX_MAX_POINTS == 8192
    with pytest.raises(ValueError, match="matrix_max_points must be an int >= 0, got -1"):
        dbdpc(x, 0.2, matrix_max_points=-1)
    with pytest.raises(ValueError, match="block_size must be an int >= 1, got 0"):
        dbdpc(x, 0.2, block_size=0)


@pytest.mark.parametrize("matrix_max_points", [0, 8192])
def test_works_with_gradients_enabled(matrix_max_points):
    """A model run with autograd on: the old in-place `out=` matmul raised "mm(): functions with
    out=... arguments don't support automatic differentiation"."""
    x = _blobs(120, 16, 6, 0.1, seed=2).requires_grad_()
    want = dbdpc(x.detach(), 0.2)
    got = dbdpc(x, 0.2, matrix_max_points=matrix_max_points)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert retrieve(x, x[:10], 0.3).tolist() == retrieve(x.detach(), x[:10].detach(), 0.3).tolist()
    assert torch.equal(cosine_distances(x), cosine_distances(x.detach()))


def test_budget_cutoff_search_uses_the_configured_memory_form(monkeypatch):
    """The cutoff search of a token budget runs DBDPC in the configured form (blocked above
    `dbdpc_matrix_max_points`), with the same answer as the stored form."""
    from pact.methods.budget import dbdpc_cutoff_for

    op = dbdpc_module

    seen = []
    real = op.dbdpc

    def spy(*args, **kwargs):
        seen.append(kwargs.get("matrix_max_points"))
        return real(*args, **kwargs)

    monkeypatch.setattr(op, "dbdpc", spy)
    x = torch.randn(60, 16, generator=torch.Generator().manual_seed(0))
    blocked = dbdpc_cutoff_for(x, 12, matrix_max_points=0)
    assert seen and set(seen) == {0}
    assert blocked == dbdpc_cutoff_for(x, 12)


def _within_cutoff_entries(dist: torch.Tensor, cutoff: float) -> dict[int, list[tuple[int, float]]]:
    """Row i -> [(j, d_ij)] for j != i with d_ij <= cutoff, read from a stored matrix."""
    out = {}
    for i in range(dist.shape[0]):
        row = dist[i].clone()
        row[i] = float("inf")
        cols = (row <= cutoff).nonzero().squeeze(1)
        out[i] = list(zip(cols.tolist(), row[cols].tolist(), strict=True))
    return out


@pytest.mark.parametrize("budget", [0, 5, 60, 400, 1 << 25])
def test_neighbour_lists_hold_the_stored_matrix_entries(monkeypatch, budget):
    """The first pass of the blocked form keeps exactly the stored matrix's within-cutoff entries
    (same bits) of the rows it keeps, records every row's degree, and never holds more than the
    budget: the rows it drops are the heaviest (a degree cap)."""
    n, cutoff = 203, 0.3
    monkeypatch.setattr(dbdpc_module, "_MATMUL_ITEMS", 17 * n)  # 12 tiles of 17 rows, the last partial
    monkeypatch.setattr(dbdpc_module, "_NEIGHBOUR_BUDGET", budget)
    x = _blobs(n, 16, 7, 0.12, seed=11)
    x[50:60] = x[3]  # a row of exact duplicates: the heaviest rows
    dist = cosine_distances(x)
    want = _within_cutoff_entries(dist, cutoff)
    xn = dbdpc_module.normalize_rows(x)
    _, rho, row_near, _, lists = dbdpc_module._distance_pass(xn, 2.0, "gaussian", cutoff, store=False)
    assert torch.equal(rho, density(dist))
    degree = torch.tensor([len(want[i]) for i in range(n)])
    assert torch.equal(lists.degree, degree) and torch.equal(row_near, degree > 0)
    assert lists.columns.numel() <= budget
    kept = lists.kept.nonzero().squeeze(1)
    assert bool((lists.kept | (degree > 0)).all())  # only rows with entries are ever dropped
    if budget >= int(degree.sum()):
        assert lists.cap is None and kept.numel() == n
    else:
        assert lists.cap is not None and bool((degree[~lists.kept] > lists.cap).all())
        assert bool((degree[lists.kept] <= lists.cap).all())
    source, columns, distances = lists.entries(kept)
    got = {int(i): [] for i in kept}
    for s, j, d in zip(source.tolist(), columns.tolist(), distances.tolist(), strict=True):
        got[int(kept[s])].append((j, d))
    assert got == {int(i): want[int(i)] for i in kept}  # exact floats, columns ascending


def test_equidistant_centers_and_a_heavy_row_in_the_blocked_walk(monkeypatch):
    """Hand-made ties: point 0 sits exactly between two centers (the same bits in both rows) and goes
    to the denser, earlier one; a pile of identical points has the heaviest rows and is dropped
    from the neighbour lists (budget 600), so its rows are recomputed; both walks agree with the
    reference."""
    a, b = math.cos(0.4), math.sin(0.4)
    # 16 copies of `left` outweigh point 0's closeness to everybody; the single `right` does not.
    left, right, pile, near_pile = [a, b, 0.0], [a, -b, 0.0], [0.0, 0.0, 1.0], [0.0, 0.1, 1.0]
    x = torch.tensor([[1.0, 0.0, 0.0]] + [left] * 16 + [right] + [pile] * 30 + [near_pile] * 2)
    cutoff = 0.1  # 1 - cos(0.4) = 0.079 <= 0.1 < 1 - cos(0.8) = 0.303
    dist = cosine_distances(x)
    assert dist[1, 0] == dist[17, 0]  # point 0 is exactly as far from both centers
    rho = density(dist)
    assert rho[1] > rho[0] > rho[17]  # visited: left, 0 (excluded by left), right (a center)
    ref_centers, ref_labels = _reference_dbdpc(dist.double().tolist(), rho.tolist(), cutoff)
    assert ref_labels[0] == 1 and 1 in ref_centers and 17 in ref_centers
    # Degrees: left 16, point 0 17, right 1, pile and near pile 31 (1266 entries): the cap falls to 17.
    monkeypatch.setattr(dbdpc_module, "_NEIGHBOUR_BUDGET", 600)
    xn = dbdpc_module.normalize_rows(x)
    lists = dbdpc_module._distance_pass(xn, 2.0, "gaussian", cutoff, store=False)[4]
    assert lists.cap == 17 and not bool(lists.kept[18:].any()) and bool(lists.kept[:18].all())
    for block_size in (1, 3, 128):
        stored, blocked = _both_forms(x, cutoff, block_size)
        assert stored[0].tolist() == blocked[0].tolist() == ref_centers
        assert stored[1].tolist() == blocked[1].tolist() == ref_labels


def test_elementwise_slices_are_at_least_32_rows():
    """At large N the ~1 MiB slices of the density pass were 4 rows (65,536 points): 130k tiny
    OpenMP regions per call, each waiting for both threads on a busy machine. Slices now have at
    least 32 rows (the tile's last slice may be shorter) and never cross a tile boundary; N <= 8192
    keeps its 1 MiB slices."""
    for n in (1000, 8000, 8192, 16384, 65536):
        t = dbdpc_module._tile_rows(n)
        slices = dbdpc_module._row_slices(n)
        assert slices[0][0] == 0 and slices[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(slices))  # contiguous
        assert all(s // t == (e - 1) // t for s, e in slices)  # inside one tile
        assert all(e - s >= min(32, n) for s, e in slices if e % t and e != n)
    assert {e - s for s, e in dbdpc_module._row_slices(8000)} <= {32, 8000 % 32, 1000 % 32}
    assert len(dbdpc_module._row_slices(65536)) == 65536 // 32
