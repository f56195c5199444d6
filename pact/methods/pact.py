"""PACT (EUTI pruning + DBDPC clustering + retrieval of pruned tokens) and its ablations.

With a budget (``target_tokens`` / ``target_ratio``) EUTI alone keeps exactly the target, and DBDPC
(with or without EUTI, whose ``keep_ratio`` stays) gets the cutoff whose number of centers is closest
to the target (``pact.methods.budget.dbdpc_cutoff_for``).

Registered (pruning, clustering) pairs:
    euti + dbdpc   PACT (``cfg.retrieval`` toggles the retrieval of pruned tokens)
    euti + none    EUTI pruning only
    none + dbdpc   DBDPC clustering only (no pruning, so nothing to retrieve)
    none + none    identity: every token kept (the engine path with nothing removed)

The algorithms live in ``pact.ops``; this file only picks the signals they need from the layer.
"""

from __future__ import annotations

import torch

from pact.methods.base import Method, Signals, register
from pact.methods.budget import dbdpc_cutoff_for, pruned_reduction, target_count
from pact.ops.pact import pact_reduce
from pact.ops.reduction import Reduction, identity_reduction
from pact.ops.scoring import euti_scores, keep_topk


@register("none", "none", "no reduction (identity)")
class Identity(Method):
    """Keeps every visual token as it is (size 1)."""

    name = "identity"
    needs_merge = False

    def reduce(self, signals: Signals) -> Reduction:
        return identity_reduction(signals.num_visual, device=signals.hidden.device)


def cluster_features(signals: Signals) -> torch.Tensor:
    """(T, F) vectors DBDPC compares, per ``cfg.cluster_features``; KV heads concatenated, not
    repeated (512-d for Qwen2-7B, as in the reference)."""
    choice = signals.config.cluster_features
    if choice == "hidden":
        return signals.hidden
    rope = choice.endswith("_rope")
    x = signals.keys(rope=rope) if choice.startswith("keys") else signals.queries(rope=rope)
    return x.reshape(x.shape[0], -1)


@register("euti", "dbdpc", "PACT: EUTI pruning + DBDPC clustering + retrieval of pruned tokens")
@register("euti", "none")
@register("none", "dbdpc")
class Pact(Method):
    """PACT and its ablations, from ``cfg.pruning`` (euti/none), ``cfg.clustering`` (dbdpc/none)
    and ``cfg.retrieval``."""

    name = "pact"

    def __init__(self, config: object) -> None:
        super().__init__(config)
        self.prune = config.pruning == "euti"
        self.cluster = config.clustering == "dbdpc"
        self.needs_merge = self.cluster
        if self.prune and config.pruning_selection != "ratio":
            raise ValueError(
                f"pruning_selection={config.pruning_selection!r} is not implemented for PACT's EUTI "
                "pruning yet; use pruning_selection='ratio' (keep_ratio)"
            )

    def budget(
        self,
        signals: Signals,
        queries: torch.Tensor | None,
        keys: torch.Tensor | None,
        features: torch.Tensor,
    ) -> tuple[float, float]:
        """(keep_ratio, cutoff) that meet the config's token budget for this sample.

        EUTI alone keeps exactly the target; with DBDPC, ``keep_ratio`` stays and the cutoff is
        bisected so the number of centers among the kept tokens is closest to the target (a tie going
        to the count not above it), see ``pact.methods.budget.dbdpc_cutoff_for``.
        """
        cfg = self.config
        n = signals.num_visual
        target = target_count(cfg, n)
        keep_ratio, cutoff = float(cfg.keep_ratio), float(cfg.cutoff)
        if target is None:
            return keep_ratio, cutoff
        if not self.cluster:
            # int(n * (t + 0.5) / n) == t without float round-off (t = n -> 1.0)
            return (1.0 if target >= n else (target + 0.5) / n), cutoff
        vis_features = features[signals.visual_mask]
        if self.prune:
            scores = euti_scores(
                signals.hidden,
                queries,
                keys,
                signals.visual_mask,
                support=cfg.euti_support,
                query_from=cfg.euti_query,
                multiply_by_norm=cfg.multiply_by_norm,
                norm_order=cfg.norm_order,
                scale=signals.attention_scale(),
            )
            vis_features = vis_features[keep_topk(scores, keep_ratio)]
        if target == 0 or vis_features.shape[0] == 0:
            return keep_ratio, 2.0
        cutoff = dbdpc_cutoff_for(
            vis_features,
            target,
            cfg.density_bandwidth,
            cfg.density_kernel,
            matrix_max_points=cfg.dbdpc_matrix_max_points,
        )
        return keep_ratio, cutoff

    def reduce(self, signals: Signals) -> Reduction:
        cfg = self.config
        rope = bool(cfg.euti_rope)
        queries = signals.queries(rope=rope) if self.prune else None
        keys = signals.keys(rope=rope) if self.prune else None
        # pact_reduce only reads the features when clustering; the hidden states stand in otherwise.
        features = cluster_features(signals) if self.cluster else signals.hidden
        keep_ratio, cutoff = self.budget(signals, queries, keys, features)
        if target_count(cfg, signals.num_visual) == 0:
            empty = torch.zeros(0, dtype=torch.long, device=signals.hidden.device)
            return pruned_reduction(empty, signals.num_visual)
        return pact_reduce(
            signals.hidden,
            queries,
            keys,
            features,
            signals.visual_mask,
            keep_ratio=keep_ratio,
            cutoff=cutoff,
            retrieval=cfg.retrieval,
            retrieval_coef=cfg.retrieval_coef,
            dn=cfg.density_bandwidth,
            kernel=cfg.density_kernel,
            matrix_max_points=cfg.dbdpc_matrix_max_points,
            merge_mean=cfg.merge_mean,
            prune=self.prune,
            cluster=self.cluster,
            support=cfg.euti_support,
            query_from=cfg.euti_query,
            multiply_by_norm=cfg.multiply_by_norm,
            norm_order=cfg.norm_order,
            scale=signals.attention_scale() if self.prune else None,
        )
