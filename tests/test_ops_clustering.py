"""Clustering baselines (pact.ops.clustering) against plain reference implementations / scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.cluster import DBSCAN, AgglomerativeClustering, KMeans

from pact.ops.clustering import agglomerative, dbscan, dpc, find_threshold, kmeans
from pact.ops.dbdpc import cosine_distances

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


def blobs(n: int, f: int = 8, k: int = 5, spread: float = 0.3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, f, generator=g)
    return centers[torch.randint(k, (n,), generator=g)] + spread * torch.randn(n, f, generator=g)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two labelings define the same groups (and the same -1 set)."""
    a, b = np.asarray(a), np.asarray(b)
    if not np.array_equal(a == -1, b == -1):
        return False
    fwd: dict[int, int] = {}
    back: dict[int, int] = {}
    for u, v in zip(a.tolist(), b.tolist(), strict=True):
        if u == -1:
            continue
        if fwd.setdefault(u, v) != v or back.setdefault(v, u) != u:
            return False
    return True


def check_output(centers: torch.Tensor, labels: torch.Tensor, n: int) -> None:
    """The common contract: ascending unique centers, labels[c] == c, every label a center or -1."""
    assert centers.dtype == torch.long and labels.dtype == torch.long
    assert labels.shape == (n,)
    if centers.numel() > 1:
        assert bool((centers[1:] > centers[:-1]).all())
    assert torch.equal(labels[centers], centers)
    valid = labels[labels >= 0]
    assert bool(torch.isin(valid, centers).all())
    assert set(valid.tolist()) == set(centers.tolist())


def ref_cosine(x: torch.Tensor, symmetric: bool = True) -> np.ndarray:
    """DBDPC's distance matrix (what every method reads), symmetrised for DBSCAN / agglomerative."""
    d = cosine_distances(x)
    return (0.5 * (d + d.T) if symmetric else d).double().numpy()


# ------------------------------------------------------------------------------------------------
# DPC


def ref_dpc(d: np.ndarray, k: int, dn: float = 2.0, kernel: str = "gaussian") -> list[int]:
    """Textbook density peaks with the strict (density desc, index asc) order; plain loops."""
    n = d.shape[0]
    rho = [
        sum(math.exp(-((d[i, j] / dn) ** 2 if kernel == "gaussian" else d[i, j] / dn)) for j in range(n))
        for i in range(n)
    ]
    order = sorted(range(n), key=lambda i: (-rho[i], i))
    rank = {p: r for r, p in enumerate(order)}
    delta, nearest = [math.inf] * n, list(range(n))
    for i in range(n):
        for j in range(n):
            if rank[j] < rank[i] and d[i, j] < delta[i]:
                delta[i], nearest[i] = d[i, j], j
    gamma = [rho[i] * delta[i] for i in range(n)]
    centers = set(sorted(range(n), key=lambda i: (-gamma[i], i))[:k])
    labels = [-1] * n
    for i in order:
        labels[i] = i if i in centers else labels[nearest[i]]
    return labels


@pytest.mark.parametrize("kernel", ["gaussian", "exponential"])
@pytest.mark.parametrize("n,k", [(40, 6), (25, 1), (30, 30)])
def test_dpc_matches_reference(kernel, n, k):
    x = blobs(n, seed=n + k)
    centers, labels = dpc(x, k, kernel=kernel, chunk=7)
    check_output(centers, labels, n)
    assert centers.numel() == k
    assert labels.tolist() == ref_dpc(ref_cosine(x, False), k, kernel=kernel)


@SETTINGS
@given(n=st.integers(1, 40), frac=st.floats(0.01, 1.0), seed=st.integers(0, 10_000))
def test_dpc_properties(n, frac, seed):
    x = blobs(n, f=4, seed=seed)
    k = max(1, int(frac * n))
    centers, labels = dpc(x, k, chunk=16)
    check_output(centers, labels, n)
    assert centers.numel() == k
    d = ref_cosine(x, False)
    rho = np.exp(-((d / 2.0) ** 2)).sum(1)
    densest = min(range(n), key=lambda i: (-rho[i], i))
    assert int(labels[densest]) == densest  # gamma = inf: always a center


def test_dpc_propagation_long_chain():
    # Points on an arc: each point's nearest denser neighbour is its neighbour on the arc, so labels
    # must travel along a long chain (pointer jumping depth).
    # Spacing grows along the arc, so densities are clearly ordered (no float near-ties).
    t = torch.linspace(0, 1, 300) ** 2 * 1.2
    x = torch.stack([torch.cos(t), torch.sin(t), torch.zeros_like(t)], 1)
    _, labels = dpc(x, 3, dn=0.01, kernel="exponential")
    assert labels.tolist() == ref_dpc(ref_cosine(x, False), 3, dn=0.01, kernel="exponential")
    assert len(set(labels[:100].tolist())) == 1


# ------------------------------------------------------------------------------------------------
# k-means


def test_kmeans_matches_sklearn_lloyd_from_same_init():
    x = blobs(80, f=5, k=4, spread=0.8, seed=3)
    k, seed = 6, 11
    centers, labels = kmeans(x, k, seed=seed)
    check_output(centers, labels, 80)
    init = x[torch.randperm(80, generator=torch.Generator().manual_seed(seed))[:k]].numpy()
    sk = KMeans(n_clusters=k, init=init, n_init=1, max_iter=100, tol=0.0, algorithm="lloyd").fit(x.numpy())
    assert same_partition(labels.numpy(), sk.labels_)


def test_kmeans_representative_is_closest_to_centroid():
    x = blobs(60, f=4, seed=5)
    for cosine in (False, True):
        centers, labels = kmeans(x, 7, cosine=cosine)
        feats = torch.nn.functional.normalize(x, dim=1) if cosine else x
        for c in centers.tolist():
            members = (labels == c).nonzero().squeeze(1).tolist()
            mean = feats[members].mean(0)
            dist = [float(((feats[m] - mean) ** 2).sum()) for m in members]
            best = min(dist)
            # closest member (ties within rounding -> lowest index)
            assert c == min(m for m, dv in zip(members, dist, strict=True) if dv <= best + 1e-6)


def test_kmeans_recovers_separated_blobs():
    x = blobs(100, f=6, k=4, spread=0.05, seed=1)
    centers, labels = kmeans(x, 4, init="k-means++", seed=2)
    assert centers.numel() == 4
    # Every cluster is tight: no member farther than the blob spread allows.
    for c in centers.tolist():
        members = x[labels == c]
        assert float(torch.cdist(members, members).max()) < 1.0


def test_kmeans_degenerate_and_duplicates():
    assert kmeans(torch.zeros(0, 3), 4)[0].numel() == 0
    c, l = kmeans(torch.randn(1, 3), 5)
    assert c.tolist() == [0] and l.tolist() == [0]
    c, l = kmeans(torch.randn(2, 3), 2)
    assert c.tolist() == [0, 1]
    same = torch.ones(10, 4)
    c, l = kmeans(same, 3)  # identical points: a single non-empty cluster survives
    check_output(c, l, 10)
    assert c.tolist() == [0]
    with pytest.raises(ValueError):
        kmeans(torch.randn(5, 3), 0)


# ------------------------------------------------------------------------------------------------
# agglomerative


@pytest.mark.parametrize("linkage", ["single", "average", "complete"])
def test_agglomerative_matches_sklearn(linkage):
    x = blobs(50, seed=7)
    centers, labels = agglomerative(x, 8, linkage)
    check_output(centers, labels, 50)
    assert centers.numel() == 8
    sk = AgglomerativeClustering(n_clusters=8, metric="precomputed", linkage=linkage).fit_predict(
        ref_cosine(x)
    )
    assert same_partition(labels.numpy(), sk)
    xn = torch.nn.functional.normalize(x, dim=1)
    for c in centers.tolist():
        members = (labels == c).nonzero().squeeze(1).tolist()
        mean = torch.nn.functional.normalize(x[members].mean(0), dim=0)
        dist = [1 - float(xn[m] @ mean) for m in members]
        best = min(dist)
        assert c == min(m for m, dv in zip(members, dist, strict=True) if dv <= best + 1e-6)


def test_agglomerative_degenerate():
    assert agglomerative(torch.zeros(0, 3), 2)[0].numel() == 0
    assert agglomerative(torch.randn(1, 3), 1)[1].tolist() == [0]
    assert agglomerative(torch.randn(2, 3), 1)[0].numel() == 1
    assert agglomerative(torch.randn(3, 3), 7)[0].tolist() == [0, 1, 2]
    with pytest.raises(ValueError):
        agglomerative(torch.randn(4, 3), 2, "ward")


# ------------------------------------------------------------------------------------------------
# DBSCAN


def safe_eps(d: np.ndarray, want: float) -> float:
    """An eps near `want` that sits in a gap between pairwise distances (no rounding-edge cases)."""
    vals = np.unique(np.round(d[np.triu_indices_from(d, 1)], 9))
    if vals.size == 0:
        return max(want, 1e-3)
    i = int(np.searchsorted(vals, want))
    lo = vals[i - 1] if i > 0 else 0.0
    hi = vals[i] if i < len(vals) else vals[-1] + 0.02
    return float((lo + hi) / 2)


@pytest.mark.parametrize("want_eps,min_samples", [(0.05, 5), (0.15, 5), (0.3, 3), (0.6, 10), (0.02, 1)])
def test_dbscan_matches_sklearn(want_eps, min_samples):
    x = blobs(120, f=8, k=6, spread=0.35, seed=2)
    d = ref_cosine(x)
    eps = safe_eps(d, want_eps)
    centers, labels = dbscan(x, eps, min_samples, chunk=13)
    check_output(centers, labels, 120)
    sk = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit(d).labels_
    assert same_partition(labels.numpy(), sk)
    # representative = member with most neighbours within eps, ties -> lower index
    degree = (d <= eps).sum(1)
    for c in centers.tolist():
        members = (labels == c).nonzero().squeeze(1).tolist()
        assert c == max(members, key=lambda m: (degree[m], -m))


@SETTINGS
@given(
    n=st.integers(1, 40), want=st.floats(0.0, 1.0), min_samples=st.integers(1, 6), seed=st.integers(0, 999)
)
def test_dbscan_matches_sklearn_random(n, want, min_samples, seed):
    x = blobs(n, f=3, k=3, spread=0.5, seed=seed)
    d = ref_cosine(x)
    eps = safe_eps(d, want)
    _, labels = dbscan(x, eps, min_samples, chunk=8)
    sk = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit(d).labels_
    assert same_partition(labels.numpy(), sk)


def test_dbscan_chain_and_noise_as_clusters():
    t = torch.linspace(0, 1.5, 200)
    arc = torch.stack([torch.cos(t), torch.sin(t), torch.zeros_like(t)], 1)
    far = torch.tensor([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
    x = torch.cat([far[:1], arc, far[1:]])
    d = ref_cosine(x)
    eps = safe_eps(d, 1 - math.cos(1.5 * 1.5 / 199))  # links only consecutive arc points
    centers, labels = dbscan(x, eps, 3, chunk=16)
    sk = DBSCAN(eps=eps, min_samples=3, metric="precomputed").fit(d).labels_
    assert same_partition(labels.numpy(), sk)
    assert centers.numel() == 1 and labels[0] == -1 and labels[-1] == -1
    c2, l2 = dbscan(x, eps, 3, noise_as_clusters=True, chunk=16)
    check_output(c2, l2, 202)
    assert l2[0] == 0 and l2[-1] == 201 and c2.numel() == 3


def test_dbscan_euclidean_unit_eps_conversion():
    x = blobs(80, seed=9)
    d = ref_cosine(x)
    eps_cos = safe_eps(d, 0.12)
    eps_euc = math.sqrt(2 * eps_cos)
    a = dbscan(x, eps_euc, 4, metric="euclidean_unit")
    b = dbscan(x, eps_cos, 4)
    assert torch.equal(a[1], b[1])
    xn = torch.nn.functional.normalize(x, dim=1).double().numpy()
    sk = DBSCAN(eps=eps_euc, min_samples=4, metric="euclidean").fit(xn).labels_
    assert same_partition(a[1].numpy(), sk)


def test_dbscan_degenerate():
    assert dbscan(torch.zeros(0, 3), 0.1)[0].numel() == 0
    c, l = dbscan(torch.randn(1, 3), 0.1, 5)
    assert l.tolist() == [-1] and c.numel() == 0
    c, l = dbscan(torch.randn(1, 3), 0.1, 5, noise_as_clusters=True)
    assert l.tolist() == [0]
    c, l = dbscan(torch.ones(6, 3), 0.01, 5)  # identical points: one cluster, represented by index 0
    assert c.tolist() == [0] and l.tolist() == [0] * 6
    with pytest.raises(ValueError):
        dbscan(torch.randn(3, 3), -1.0)


# ------------------------------------------------------------------------------------------------
# shared behaviour


ALGOS = {
    "kmeans": lambda x: kmeans(x, 5),
    "kmeans_pp_cos": lambda x: kmeans(x, 5, init="k-means++", cosine=True),
    "agglomerative": lambda x: agglomerative(x, 5, "average"),
    "dpc": lambda x: dpc(x, 5),
    "dbscan": lambda x: dbscan(x, 0.2, 3),
}


@pytest.mark.parametrize("name", list(ALGOS))
def test_bf16_equals_float32_cast_and_deterministic(name):
    run = ALGOS[name]
    x = blobs(40, seed=4).to(torch.bfloat16)
    c1, l1 = run(x)
    c2, l2 = run(x.float())
    _, l3 = run(x)
    assert torch.equal(l1, l2) and torch.equal(c1, c2)
    assert torch.equal(l1, l3)
    check_output(c1, l1, 40)


@pytest.mark.parametrize("name", list(ALGOS))
@pytest.mark.parametrize("n", [0, 1, 2])
def test_tiny_inputs(name, n):
    c, l = ALGOS[name](torch.randn(n, 3))
    check_output(c, l, n)


@pytest.mark.parametrize("name", list(ALGOS))
def test_identical_points_and_zero_vectors(name):
    x = torch.cat([torch.ones(8, 4), torch.zeros(3, 4), -torch.ones(5, 4)])
    c, l = ALGOS[name](x)
    check_output(c, l, 16)
    # Identical points always share a representative (or are all dropped).
    assert len(set(l[:8].tolist())) == 1 and len(set(l[11:].tolist())) == 1


@pytest.mark.parametrize("name", list(ALGOS))
def test_nan_is_an_error(name):
    x = torch.randn(6, 3)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ALGOS[name](x)


# ------------------------------------------------------------------------------------------------
# find_threshold


def test_find_threshold_decreasing_and_increasing():
    dec = lambda t: int(100 * (1 - t))  # noqa: E731
    t, c = find_threshold(dec, 37, 0.0, 1.0)
    assert c == 37 and dec(t) == 37
    inc = lambda t: int(100 * t)  # noqa: E731
    t, c = find_threshold(inc, 62, 0.0, 1.0)
    assert c == 62
    evens = lambda t: 2 * int(50 * t)  # noqa: E731  only even counts: 36 and 38 are equally close
    t, c = find_threshold(evens, 37, 0.0, 1.0)
    assert c == 36  # never more than the budget on a tie
    assert find_threshold(dec, 500, 0.0, 1.0)[1] == 100  # unreachable: best effort
    with pytest.raises(ValueError):
        find_threshold(dec, 5, 1.0, 0.0)


def test_find_threshold_with_dpc_like_method():
    x = blobs(60, seed=8)
    run = lambda eps: dbscan(x, eps, 1)[0].numel()  # noqa: E731  min_samples=1: count falls with eps
    t, c = find_threshold(run, 20, 0.0, 1.0)
    assert abs(c - 20) <= 2 and run(t) == c
