"""Toy method "keynorm", the proof that a new method is one file (plus its JSON and its test).

Keep the visual tokens whose layer-L key (pre-RoPE, KV heads concatenated) has the largest L2 norm.
Declared as a score pruner, so without any other edit it composes with every clusterer (k-means,
agglomerative, DPC, DBSCAN, DBDPC) and with custom clustering, honours ``pruning_selection="iqr"``
and budgets, and appears in ``pact methods``. It lives under tests/ (not shipped): test_keynorm.py
imports it, which registers it, and removes it from the registry afterwards.
"""

from __future__ import annotations

import torch

from pact.methods.base import PRUNING, Method, Signals, declare, register
from pact.methods.budget import pruned_reduction, select_by_scores
from pact.ops.reduction import Reduction


def keynorm_token_scores(signals: Signals) -> torch.Tensor:
    """float32 (N,): L2 norm of each visual token's layer-L key, (H_kv, d) flattened to H_kv * d."""
    keys = signals.keys()[signals.visual_mask]
    return keys.reshape(keys.shape[0], -1).float().norm(dim=1)


declare(
    PRUNING, "keynorm", "score pruner", "key-norm pruning (toy test method)", score_fn=keynorm_token_scores
)


@register("keynorm", "none")
class KeyNormPruning(Method):
    """Keep the visual tokens with the largest layer-L key norm (top keep_ratio, IQR or a budget)."""

    name = "keynorm"
    needs_merge = False

    def reduce(self, signals: Signals) -> Reduction:
        scores = keynorm_token_scores(signals)
        return pruned_reduction(
            select_by_scores(scores, self.config), signals.num_visual, signals.sizes, scores
        )
