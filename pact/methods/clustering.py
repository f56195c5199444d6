"""Clustering baselines of the PACT paper -- k-means, agglomerative, DPC, DBSCAN -- and every
"score pruning, then clustering" combination.

All cluster the same features DBDPC does (``cluster_features``: layer-L post-RoPE keys by default),
in float32 (``pact.ops.clustering``; the reference's k-means and agglomerative crashed under bf16 and
its DBSCAN could not run at all), and merge each cluster into its representative token: size-weighted
mean hidden state (``merge_mean``), summed size for proportional attention, the representative's
position. The representative is the member nearest the centroid (k-means), nearest the mean feature
(agglomerative), the density peak (DPC) or the member with the most eps-neighbours (DBSCAN).

Cluster counts: ``int(S * cluster_ratio)`` (at least 1) for k-means, agglomerative (scikit-learn) and
DPC, S = tokens being clustered; DBSCAN's count follows from ``dbscan_eps`` (a Euclidean radius on
L2-normalised features, as in the reference's cuML call) and ``dbscan_min_samples``; noise is dropped
or kept as singletons (``dbscan_noise_as_clusters``).

Budget (``target_tokens`` / ``target_ratio``): the count becomes the target for k-means,
agglomerative and DPC; DBSCAN bisects eps (``search_dbscan_eps``). With a pruning stage
(``fastv``, ``norm``, ``random``, ``euti``, ``custom``) the pruning keeps ``int(N * keep_ratio)``
tokens and the clustering of those meets the budget.

Composition: each clustering here is declared a "clusterer" (``pact.methods.base.declare``) with its
composer (``PruneThenCluster``, or ``PruneThenDbdpc`` for DBDPC); ``build_method`` pairs it with any
declared score pruner at call time, so a pruner added in another file composes too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pact.methods.base import CLUSTERING, PRUNING, Method, Signals, declare, spec
from pact.methods.budget import (
    cluster_reduction,
    dbdpc_cutoff_for,
    pruned_reduction,
    search_threshold,
    select_by_scores,
    target_count,
)
from pact.methods.fastv import fastv_input_layers, fastv_token_scores
from pact.methods.pact import cluster_features
from pact.ops import clustering as ops_clustering
from pact.ops.dbdpc import dbdpc, retrieve
from pact.ops.reduction import Reduction
from pact.ops.scoring import euti_scores

Clusterer = Callable[[torch.Tensor, Any, "int | None"], tuple[torch.Tensor, torch.Tensor]]
"""(features (S, F), config, target count or None) -> (centers LongTensor[C] into the S points,
labels LongTensor[S]: point index of each point's representative, or -1 = dropped)."""


def euti_token_scores(signals: Signals) -> torch.Tensor:
    """float32 (N,) EUTI scores (PACT's pruning score) with the config's EUTI options."""
    cfg = signals.config
    rope = bool(cfg.euti_rope)
    return euti_scores(
        signals.hidden,
        signals.queries(rope=rope),
        signals.keys(rope=rope),
        signals.visual_mask,
        support=cfg.euti_support,
        query_from=cfg.euti_query,
        multiply_by_norm=bool(cfg.multiply_by_norm),
        norm_order=float(cfg.norm_order),
        scale=signals.attention_scale(),
    )


def _count(cfg: Any, s: int, target: int | None) -> int:
    """Cluster count for S points: the target, else int(S * cluster_ratio), within [1, S]."""
    k = int(s * float(cfg.cluster_ratio)) if target is None else int(target)
    return max(1, min(k, s))


def kmeans_clusters(x: torch.Tensor, cfg: Any, target: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean k-means on the raw features (the reference's faiss call), seeded by ``random_seed``."""
    return ops_clustering.kmeans(
        x, _count(cfg, x.shape[0], target), int(cfg.kmeans_iters), int(cfg.random_seed)
    )


def agglomerative_clusters(
    x: torch.Tensor, cfg: Any, target: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn agglomerative clustering on the cosine distance, ``linkage`` single/average/complete."""
    return ops_clustering.agglomerative(x, _count(cfg, x.shape[0], target), linkage=cfg.linkage)


def dpc_clusters(x: torch.Tensor, cfg: Any, target: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peaks clustering with DBDPC's distance, density bandwidth and kernel."""
    return ops_clustering.dpc(
        x, _count(cfg, x.shape[0], target), float(cfg.density_bandwidth), kernel=cfg.density_kernel
    )


def _dbscan(x: torch.Tensor, cfg: Any, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return ops_clustering.dbscan(
        x,
        eps,
        int(cfg.dbscan_min_samples),
        bool(cfg.dbscan_noise_as_clusters),
        metric="euclidean_unit",
    )


_EPS_MAX = 2.0  # Euclidean distance between unit vectors is at most 2: every point is a neighbour


def search_dbscan_eps(x: torch.Tensor, cfg: Any, target: int) -> float:
    """eps (Euclidean, unit vectors) whose DBSCAN keeps the token count closest to ``target``.

    With noise kept as singletons the count only decreases with eps: bisect on [0, 2]. With noise
    dropped, a tiny eps makes every point noise (count 0), so the count first rises then falls: we
    locate the peak on a coarse grid (eps = 2k/16) and bisect on the falling side [peak, 2]; a target
    above the peak count gets the peak.
    """

    def run(eps: float) -> int:
        return int(_dbscan(x, cfg, eps)[0].numel())

    lo = 0.0
    if not cfg.dbscan_noise_as_clusters:
        grid = [_EPS_MAX * k / 16 for k in range(1, 17)]
        counts = [run(e) for e in grid]
        peak = max(range(len(grid)), key=lambda i: (counts[i], -i))
        if counts[peak] <= target:
            return grid[peak]
        lo = grid[peak]
    return search_threshold(run, target, lo, _EPS_MAX)[0]


def dbscan_clusters(x: torch.Tensor, cfg: Any, target: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """DBSCAN with ``dbscan_eps``, or the eps that meets the target."""
    eps = float(cfg.dbscan_eps) if target is None else search_dbscan_eps(x, cfg, target)
    return _dbscan(x, cfg, eps)


class PruneThenCluster(Method):
    """Optional score pruning (``cfg.pruning``), then a clustering (``cfg.clustering``) of the survivors.

    The composer of every "clusterer" with a ``cluster_fn``: ``build_method`` resolves any score
    pruner (or "none") + such a clusterer to this class at call time.
    """

    name = "prune_then_cluster"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.pruner = None if config.pruning == "none" else spec(PRUNING, config.pruning)
        self.cluster_fn = spec(CLUSTERING, config.clustering).cluster_fn
        if self.pruner is not None and self.pruner.check is not None:
            self.pruner.check(config)

    def input_layers(self, num_layers: int) -> list[int]:
        if self.pruner is None or self.pruner.input_layers is None:
            return []
        return self.pruner.input_layers(self.config)

    def prune(self, signals: Signals) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(subset: ascending visual indices that survive the pruning, scores or None)."""
        n = signals.num_visual
        if self.config.pruning == "none":
            return torch.arange(n, device=signals.hidden.device), None
        scores = self.pruner.score_fn(signals)
        return select_by_scores(scores, self.config, alone=False), scores

    def reduce(self, signals: Signals) -> Reduction:
        cfg = self.config
        n = signals.num_visual
        subset, scores = self.prune(signals)
        if subset.numel() == 0:
            return pruned_reduction(subset, n, scores=scores)
        vis = signals.visual_mask
        x = cluster_features(signals)[vis][subset]
        target = target_count(cfg, n)
        if target == 0:
            return pruned_reduction(subset[:0], n, scores=scores)
        centers, labels = self.cluster_fn(x, cfg, target)
        return cluster_reduction(
            signals.hidden[vis],
            signals.sizes,
            n,
            subset,
            centers,
            labels,
            merge_mean=bool(cfg.merge_mean),
            scores=scores,
        )


class PruneThenDbdpc(PruneThenCluster):
    """Any score pruner, then PACT's DBDPC clustering and retrieval of the pruned tokens.

    PACT's pipeline (``pact.ops.pact.pact_reduce``) with the pruner's scores in place of EUTI's: the
    pruning keeps its tokens (``select_by_scores``: ``keep_ratio`` or IQR), DBDPC clusters them with
    ``cutoff`` (bisected to meet a budget, as PACT does), and with ``retrieval`` every pruned token
    within ``retrieval_coef * cutoff`` of a center joins that center. euti+dbdpc and none+dbdpc are
    PACT itself (``pact.methods.pact.Pact``, registered pairs); this composer runs the other score
    pruners (e.g. fastv+dbdpc), and with EUTI scores it gives PACT's reduction.
    """

    name = "prune_then_dbdpc"

    def reduce(self, signals: Signals) -> Reduction:
        cfg = self.config
        n = signals.num_visual
        subset, scores = self.prune(signals)
        target = target_count(cfg, n)
        if subset.numel() == 0 or target == 0:
            return pruned_reduction(subset[:0], n, scores=scores)
        features = cluster_features(signals)[signals.visual_mask]
        x = features[subset]
        cutoff = float(cfg.cutoff)
        if target is not None:
            cutoff = dbdpc_cutoff_for(x, target, cfg.density_bandwidth, cfg.density_kernel)
        centers, labels = dbdpc(x, cutoff, cfg.density_bandwidth, kernel=cfg.density_kernel)
        extra = None
        if cfg.retrieval and subset.numel() < n and centers.numel():
            pruned = torch.ones(n, dtype=torch.bool, device=subset.device)
            pruned[subset] = False
            pruned_idx = pruned.nonzero().squeeze(1)
            near = retrieve(features[pruned_idx], x[centers], float(cfg.retrieval_coef) * cutoff)
            extra = torch.full((n,), -1, dtype=torch.long, device=subset.device)
            extra[pruned_idx] = torch.where(near >= 0, centers[near.clamp(min=0)], near)
        return cluster_reduction(
            signals.hidden[signals.visual_mask],
            signals.sizes,
            n,
            subset,
            centers,
            labels,
            merge_mean=bool(cfg.merge_mean),
            scores=scores,
            extra_labels=extra,
        )


declare(PRUNING, "euti", "score pruner", "EUTI pruning (PACT's importance score)", score_fn=euti_token_scores)
declare(
    PRUNING,
    "fastv",
    "score pruner",
    "FastV pruning (attention received; reference or original variant)",
    score_fn=fastv_token_scores,
    input_layers=fastv_input_layers,
)
for _name, _fn, _text in (
    ("kmeans", kmeans_clusters, "k-means clustering (Euclidean on the keys)"),
    ("dpc", dpc_clusters, "density-peaks clustering"),
    ("agglomerative", agglomerative_clusters, "agglomerative clustering (single/average/complete)"),
    ("dbscan", dbscan_clusters, "DBSCAN clustering (noise dropped or singletons)"),
):
    declare(CLUSTERING, _name, "clusterer", _text, composer=PruneThenCluster, cluster_fn=_fn)
declare(CLUSTERING, "dbdpc", "clusterer", "DBDPC clustering (PACT)", composer=PruneThenDbdpc)
