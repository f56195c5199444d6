"""Clustering baselines of the PACT paper: k-means, agglomerative, DPC and DBSCAN.

Every function clusters the same features DBDPC does (one row per visual token, usually the layer-L
keys) and returns the same pair as `pact.ops.dbdpc`:

* ``centers``: LongTensor[C], strictly increasing indices of the representative points (the tokens
  that stay in the sequence, each standing for its cluster);
* ``labels``: LongTensor[N], for every point the **point index** of its representative, or -1 for a
  point that is dropped (DBSCAN noise). ``labels[c] == c`` for every center ``c``.

Numerics: whatever the input dtype, everything (distances, densities, centroids) is computed in
float32 (the reference's k-means and agglomerative crash under bf16 because they go through numpy).
Ties are broken towards the lower index, so the same input always gives the same output.
The cosine distance is ``max(0, 1 - cos(x_i, x_j))`` with ``D_ii = 0``; a zero vector has cosine 0
with everything (distance 1 to every other point) instead of the reference's NaN. NaN/Inf features
are an error.

The cosine-distance matrix, the densities and the density order are DBDPC's own building blocks
(`pact.ops.dbdpc.cosine_distances`, `density`, `density_order`), so every method sees bit-identical
distances and DPC sees bit-identical densities. Memory: that float32 N x N matrix (as DBDPC), DBSCAN's
boolean eps-graph (N^2 bytes) and O(chunk * N) temporaries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from pact.ops.dbdpc import cosine_distances, density, density_order, normalize_rows
from pact.ops.scoring import check_finite

__all__ = [
    "agglomerative",
    "dbscan",
    "dpc",
    "find_threshold",
    "kmeans",
]

# --------------------------------------------------------------------------------------------------
# shared helpers


def _features(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """Validate (N, F) finite float features and return them as float32 (NaN would silently scramble
    every distance, so it is an error)."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point (N, F) tensor, got {tuple(x.shape)} {x.dtype}")
    check_finite(**{name: x})
    return x.detach().float()


def _count(value: int, n: int, name: str) -> int:
    """Clamp a requested cluster count to [1, n] (n >= 1); a count below 1 is an error."""
    value = int(value)
    if value < 1:
        raise ValueError(f"{name} must be >= 1 when there are points to cluster, got {value}")
    return min(value, n)


def _empty(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    e = torch.zeros(0, dtype=torch.long, device=device)
    return e, e.clone()


def _best_per_group(group: torch.Tensor, score: torch.Tensor, num_groups: int, largest: bool) -> torch.Tensor:
    """For each group id in [0, num_groups) the index of its member with the best score.

    Ties go to the lower index; an empty group gets -1.

    Args:
        group: LongTensor[N] group id of each point (only ids >= 0 are considered).
        score: FloatTensor[N].
    Returns:
        LongTensor[num_groups].
    """
    n = group.numel()
    best = torch.full((num_groups,), -1, dtype=torch.long, device=group.device)
    valid = group >= 0
    if n == 0 or not bool(valid.any()):
        return best
    idx = torch.arange(n, device=group.device)[valid]
    g, s = group[valid], score[valid]
    # Two stable sorts give the order (group asc, score best-first, index asc); the first point of
    # each group's run is its representative.
    order = torch.sort(s, descending=largest, stable=True).indices
    order = order[torch.sort(g[order], stable=True).indices]
    g_sorted = g[order]
    first = torch.ones_like(g_sorted, dtype=torch.bool)
    first[1:] = g_sorted[1:] != g_sorted[:-1]
    best[g_sorted[first]] = idx[order[first]]
    return best


def _finish(rep_of_point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels = representative point index or -1) -> (sorted unique centers, labels)."""
    centers = torch.unique(rep_of_point[rep_of_point >= 0], sorted=True)
    return centers, rep_of_point


# --------------------------------------------------------------------------------------------------
# k-means


def _nearest_centroid(x: torch.Tensor, c: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of (and squared Euclidean distance to) the nearest centroid for every point.

    Args: x (N, F), c (K, F) float32. Returns: LongTensor[N], FloatTensor[N]; ties -> lower centroid.
    """
    n = x.shape[0]
    c2 = (c * c).sum(dim=1)
    assign = torch.empty(n, dtype=torch.long, device=x.device)
    dist = torch.empty(n, dtype=torch.float32, device=x.device)
    for start in range(0, n, chunk):
        xs = x[start : start + chunk]
        d = ((xs * xs).sum(dim=1, keepdim=True) - 2.0 * xs @ c.T + c2).clamp_min_(0.0)
        a = d.argmin(dim=1)
        assign[start : start + chunk] = a
        dist[start : start + chunk] = d.gather(1, a[:, None]).squeeze(1)
    return assign, dist


def _kmeans_pp_init(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling) with a CPU generator; returns the k chosen point indices."""
    n = x.shape[0]
    xc = x.cpu()
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    d2 = ((xc - xc[chosen[0]]) ** 2).sum(dim=1)
    for _ in range(1, k):  # a loop over centroids, not tokens: k small steps of O(N F) each
        w = d2.clone()
        w[chosen] = 0.0
        if float(w.sum()) <= 0.0:  # all remaining points duplicate a chosen one: pick uniformly
            w = torch.ones(n)
            w[chosen] = 0.0
        nxt = int(torch.multinomial(w.double(), 1, generator=gen))
        chosen.append(nxt)
        d2 = torch.minimum(d2, ((xc - xc[nxt]) ** 2).sum(dim=1))
    return torch.tensor(chosen, dtype=torch.long, device=x.device)


def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 100,
    seed: int = 0,
    *,
    cosine: bool = False,
    init: Literal["random", "k-means++"] = "random",
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means in float32 torch; each cluster is represented by its member closest to the centroid.

    We follow the reference (``token_reduction_kmeans``, faiss) in clustering with the **Euclidean
    distance on the raw, un-normalised features** -- unlike every other clustering baseline, which
    uses the cosine distance. ``cosine=True`` runs the same algorithm on L2-normalised rows instead
    (Euclidean on unit vectors is monotone in the cosine distance; centroids are not re-normalised).

    Initialisation: ``"random"`` picks k distinct points from a seeded CPU generator (faiss's default
    is also a random sample of the training points); ``"k-means++"`` uses D^2 sampling from the same
    generator. A centroid that loses all its points is re-seeded at the point farthest from its own
    centroid (faiss splits a large cluster instead; both just keep k clusters alive). Iteration stops
    after ``iters`` updates or when the assignment no longer changes.

    Args:
        x: (N, F) features, any float dtype (computed in float32).
        k: requested number of clusters, >= 1 (clamped to N).
        iters: maximum number of Lloyd updates (the reference's faiss ``niter=100``).
        seed: seed of the CPU generator used for the initialisation (same seed -> same output,
            on every device).
        cosine: cluster L2-normalised rows instead of raw ones.
        init: "random" or "k-means++".
        chunk: rows per block in the point-to-centroid distance computation.
    Returns:
        centers: LongTensor[C], C <= k (a cluster can end empty when points are duplicated),
            ascending point indices of the representatives.
        labels: LongTensor[N], representative point index of each point.
    """
    x = _features(x)
    n = x.shape[0]
    if n == 0:
        return _empty(x.device)
    k = _count(k, n, "k")
    if init not in ("random", "k-means++"):
        raise ValueError(f"init must be 'random' or 'k-means++', got {init!r}")
    if cosine:
        x = normalize_rows(x)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if init == "random":
        seeds = torch.randperm(n, generator=gen)[:k].to(x.device)
    else:
        seeds = _kmeans_pp_init(x, k, gen)
    centroids = x[seeds].clone()

    assign: torch.Tensor | None = None
    for _ in range(int(iters)):
        new_assign, dist = _nearest_centroid(x, centroids, chunk)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        alive = counts > 0
        centroids = torch.where(alive[:, None], sums / counts.clamp_min(1)[:, None].float(), centroids)
        n_dead = int((~alive).sum())
        if n_dead:
            # Re-seed empty clusters at the points worst served by their current centroid.
            far = torch.sort(dist, descending=True, stable=True).indices[:n_dead]
            centroids[~alive] = x[far]
    assign, _ = _nearest_centroid(x, centroids, chunk)
    d_own = ((x - centroids[assign]) ** 2).sum(dim=1)
    rep = _best_per_group(assign, d_own, k, largest=False)
    return _finish(rep[assign])


# --------------------------------------------------------------------------------------------------
# agglomerative


def agglomerative(
    x: torch.Tensor,
    n_clusters: int,
    linkage: Literal["single", "average", "complete"] = "average",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Agglomerative clustering (scikit-learn) on the precomputed cosine-distance matrix.

    The distance matrix is computed in float32 torch and handed to
    ``sklearn.cluster.AgglomerativeClustering(metric="precomputed")`` as float64 numpy, so bf16/fp16
    inputs work (the reference converted the model-dtype tensor to numpy and crashed under bf16).
    Each cluster is represented by the member with the smallest cosine distance to the cluster's
    mean feature (the mean of the raw rows, as in the reference); ties -> lower index.

    Args:
        x: (N, F) features, any float dtype.
        n_clusters: number of clusters, >= 1 (clamped to N; ``n_clusters >= N`` keeps every point).
        linkage: "single", "average" or "complete" ("ward" needs Euclidean features and is not
            defined on a precomputed matrix).
    Returns:
        centers: LongTensor[n_clusters] ascending; labels: LongTensor[N] representative indices.
    """
    if linkage not in ("single", "average", "complete"):
        raise ValueError(f"linkage must be 'single', 'average' or 'complete', got {linkage!r}")
    x = _features(x)
    n = x.shape[0]
    if n == 0:
        return _empty(x.device)
    n_clusters = _count(n_clusters, n, "n_clusters")
    if n_clusters == n:  # nothing to merge (and scikit-learn refuses N == 1)
        idx = torch.arange(n, device=x.device)
        return idx, idx.clone()
    from sklearn.cluster import AgglomerativeClustering  # heavy import, only when used

    d = cosine_distances(x)
    d = (0.5 * (d + d.T)).double().cpu().numpy()  # scikit-learn wants an exactly symmetric matrix
    model = AgglomerativeClustering(n_clusters=n_clusters, metric="precomputed", linkage=linkage)
    group = torch.from_numpy(model.fit_predict(d)).to(device=x.device, dtype=torch.long)
    counts = torch.bincount(group, minlength=n_clusters).clamp_min(1)
    means = torch.zeros(n_clusters, x.shape[1], device=x.device).index_add_(0, group, x) / counts[:, None]
    cos_to_mean = (normalize_rows(x) * normalize_rows(means)[group]).sum(dim=1)
    rep = _best_per_group(group, (1.0 - cos_to_mean).clamp_min(0.0), n_clusters, largest=False)
    return _finish(rep[group])


# --------------------------------------------------------------------------------------------------
# DPC


def dpc(
    x: torch.Tensor,
    n_centers: int,
    dn: float = 2.0,
    kernel: Literal["gaussian", "exponential"] = "gaussian",
    *,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classic density-peaks clustering (Rodriguez & Laio) with DBDPC's distance and density.

    * ``D_ij = max(0, 1 - cos)``; ``rho_i = sum_j exp(-(D_ij/dn)^2)`` (``kernel="gaussian"``, the
      reference code, d_n = 2) or ``sum_j exp(-D_ij/dn)`` (``"exponential"``, the paper's eq. 6).
      Raw densities (no rank transform), float32.
    * Points are totally ordered by (density desc, index asc); "denser than i" means "before i in
      that order" (the reference used ``rho_j >= rho_i``, so tied points were denser than each other).
    * ``delta_i`` = distance to the nearest denser point (ties -> lower index), ``inf`` for the
      densest point; ``gamma = rho * delta``.
    * Centers = the ``n_centers`` points with the largest gamma (ties -> lower index). The densest
      point has ``gamma = inf`` and is therefore always a center, so every chain of "nearest denser
      neighbour" links ends at a center.
    * Every non-center takes the label of its nearest denser neighbour. The reference visits points
      by decreasing density in a Python loop; we get the same labels by pointer jumping on the
      nearest-denser-neighbour forest (centers point to themselves): ``parent = parent[parent]``,
      ceil(log2 N) vectorised rounds.

    Args:
        x: (N, F) features, any float dtype.
        n_centers: number of centers, >= 1 (clamped to N). The reference uses floor(p * N).
        dn: density bandwidth (hard-coded to 2 in the reference).
        kernel: "gaussian" or "exponential".
        chunk: rows per block of the distance computations.
    Returns:
        centers: LongTensor[n_centers] ascending; labels: LongTensor[N] representative indices.
    """
    if kernel not in ("gaussian", "exponential"):
        raise ValueError(f"kernel must be 'gaussian' or 'exponential', got {kernel!r}")
    x = _features(x)
    n = x.shape[0]
    if n == 0:
        return _empty(x.device)
    n_centers = _count(n_centers, n, "n_centers")
    dist = cosine_distances(x)
    rho = density(dist, float(dn), kernel)
    order = density_order(rho)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=x.device)  # 0 = densest

    delta = torch.empty(n, dtype=torch.float32, device=x.device)
    nearest = torch.empty(n, dtype=torch.long, device=x.device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        d = dist[start:stop]  # each row block is read once: mask it in place
        d.masked_fill_(rank[None, :] >= rank[start:stop, None], float("inf"))  # keep denser points only
        nearest[start:stop] = d.argmin(dim=1)
        delta[start:stop] = d.gather(1, nearest[start:stop, None]).squeeze(1)

    gamma = rho * delta  # inf only for the densest point (every other delta is a distance <= 2)
    centers = torch.sort(gamma, descending=True, stable=True).indices[:n_centers]
    parent = nearest.clone()
    parent[centers] = centers
    for _ in range(max(1, (n - 1).bit_length())):
        parent = parent[parent]
    return _finish(parent)


# --------------------------------------------------------------------------------------------------
# DBSCAN


def _components(adj: torch.Tensor, core: torch.Tensor, chunk: int) -> torch.Tensor:
    """Connected components of the core points in the graph `adj`.

    Min-label propagation with hooking and pointer jumping (label = smallest core index of the
    component); O(log N) rounds in practice, each one chunked pass over `adj`.

    Args:
        adj: (N, N) bool symmetric adjacency (diagonal True). core: (N,) bool.
    Returns:
        LongTensor[N]: component id (its smallest core index) for core points; unspecified for others.
    """
    n = adj.shape[0]
    device = adj.device
    p = torch.arange(n, device=device)
    big = torch.tensor(n, device=device)
    core_idx = core.nonzero().squeeze(1)
    while True:
        m = p.clone()
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            a = adj[start:stop] & core[None, :]
            m[start:stop] = torch.where(a, p[None, :], big).amin(dim=1)
        m = torch.where(core, torch.minimum(m, p), p)
        # Hook: a root adopts the smallest label seen by any of its members (p[x] <= x always holds,
        # so p stays a forest whose roots are component minima once nothing changes).
        new_p = p.clone().scatter_reduce_(0, p[core_idx], m[core_idx], reduce="amin")
        new_p = torch.minimum(new_p, m)
        while True:  # shortcut until every node points at a root
            nxt = new_p[new_p]
            if torch.equal(nxt, new_p):
                break
            new_p = nxt
        if torch.equal(new_p, p):
            return p
        p = new_p


def dbscan(
    x: torch.Tensor,
    eps: float,
    min_samples: int = 5,
    noise_as_clusters: bool = False,
    *,
    metric: Literal["cosine", "euclidean_unit"] = "cosine",
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DBSCAN on the cosine distance, vectorised; each cluster is represented by its densest member.

    The reference ran cuML DBSCAN with the Euclidean metric on L2-normalised vectors and then (had it
    run) compared the same ``eps`` to cosine distances. We use the cosine distance everywhere. Since
    ``||a - b||^2 = 2 (1 - cos)`` for unit vectors, ``metric="euclidean_unit"`` interprets ``eps`` as
    a Euclidean radius on unit vectors and converts it with ``d_cos = eps^2 / 2``, so the reference's
    eps values carry over.

    * Neighbours: ``(D_ij + D_ji)/2 <= eps`` (self included, as in scikit-learn); core points have
      ``>= min_samples`` neighbours.
    * Clusters: connected components of the core points (vectorised min-label propagation).
    * A border point (not core, within eps of a core point) joins the component of its core
      neighbours with the lowest component id (component id = its smallest core index). This is what
      scikit-learn's sequential expansion does, so the partition equals scikit-learn's
      ``DBSCAN(metric="precomputed")`` on the same matrix.
    * Representative: the member with the most neighbours within eps (ties -> lower index).
    * Noise (neither core nor border): label -1 (dropped), or its own singleton cluster if
      ``noise_as_clusters``.

    Memory: DBDPC's float32 (N, N) distance matrix while the boolean (N, N) eps-graph is built, then
    only the graph plus O(chunk * N) temporaries.

    Args:
        x: (N, F) features, any float dtype.
        eps: neighbourhood radius, a cosine distance (or a Euclidean distance between unit vectors
            with ``metric="euclidean_unit"``), >= 0.
        min_samples: neighbours (self included) that make a core point, >= 1.
        noise_as_clusters: keep noise points as singleton clusters instead of dropping them.
        metric: "cosine" or "euclidean_unit" (how to read ``eps``).
        chunk: rows per block.
    Returns:
        centers: LongTensor[C] ascending; labels: LongTensor[N] representative index or -1 (noise).
    """
    if metric not in ("cosine", "euclidean_unit"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean_unit', got {metric!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if min_samples < 1:
        raise ValueError(f"min_samples must be >= 1, got {min_samples}")
    x = _features(x)
    n = x.shape[0]
    if n == 0:
        return _empty(x.device)
    eps_cos = float(eps) if metric == "cosine" else float(eps) ** 2 / 2.0
    dist = cosine_distances(x)
    adj = torch.empty(n, n, dtype=torch.bool, device=x.device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        # symmetrised, so that rounding cannot make "j is a neighbour of i" one-sided
        adj[start:stop] = 0.5 * (dist[start:stop] + dist[:, start:stop].T) <= eps_cos
    del dist
    degree = adj.sum(dim=1)
    core = degree >= min_samples

    comp = _components(adj, core, chunk)
    big = torch.tensor(n, device=x.device)
    comp_core = torch.where(core, comp, big)
    cluster = torch.empty(n, dtype=torch.long, device=x.device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        cluster[start:stop] = torch.where(adj[start:stop], comp_core[None, :], big).amin(dim=1)
    cluster = torch.where(core, comp, cluster)
    noise = cluster == n
    cluster = torch.where(noise, torch.full_like(cluster, -1), cluster)

    rep = _best_per_group(cluster, degree.float(), n, largest=True)
    labels = torch.where(noise, torch.full_like(cluster, -1), rep[cluster.clamp_min(0)])
    if noise_as_clusters:
        idx = torch.arange(n, device=x.device)
        labels = torch.where(noise, idx, labels)
    return _finish(labels)


# --------------------------------------------------------------------------------------------------
# equal-budget support


def find_threshold(
    run: Callable[[float], int],
    target: int,
    lo: float,
    hi: float,
    iters: int = 30,
) -> tuple[float, int]:
    """Bisect a threshold so that a threshold-driven method keeps about ``target`` tokens.

    Threshold methods (DBDPC's cutoff ``d_c``, DBSCAN's ``eps``) do not take a token budget; to
    compare them with budget methods at equal cost we search the threshold whose kept count is
    closest to the budget. ``run(threshold)`` must return the number of kept tokens and be monotone
    in the threshold (either direction; the direction is read from ``run(lo)`` and ``run(hi)``).
    DBDPC's center count is non-increasing in ``d_c``. DBSCAN's count is only roughly monotone; the
    search then still returns the best threshold it evaluated.

    Rule: among all evaluated thresholds (``lo``, ``hi`` and up to ``iters`` midpoints), return the
    one whose count minimises ``|count - target|``; on equal distance prefer the count that does not
    exceed the target (a method never gets more tokens than the budget because of the search), and
    then the threshold evaluated first. The search stops early on an exact hit.

    Args:
        run: threshold -> kept-token count.
        target: desired count (>= 0).
        lo, hi: search interval, lo < hi.
        iters: maximum number of bisection steps.
    Returns:
        (threshold, count) of the chosen threshold.
    """
    if not lo < hi:
        raise ValueError(f"find_threshold needs lo < hi, got lo={lo}, hi={hi}")

    def key(count: int) -> tuple[int, bool]:
        return abs(count - target), count > target

    c_lo = int(run(lo))
    best = (lo, c_lo)
    c_hi = int(run(hi))
    if key(c_hi) < key(best[1]):
        best = (hi, c_hi)
    increasing = c_hi >= c_lo
    a, b = lo, hi
    for _ in range(int(iters)):
        if best[1] == target:
            break
        mid = 0.5 * (a + b)
        c = int(run(mid))
        if key(c) < key(best[1]):
            best = (mid, c)
        if (c < target) == increasing:
            a = mid  # the count must move towards `target`: go where the count grows (or shrinks)
        else:
            b = mid
    return best
