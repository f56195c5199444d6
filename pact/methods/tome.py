"""ToMe (token merging) inside the language model, as the PACT reference runs it.

Progressive: at every decoder layer i from ``cfg.layer`` (0 in ``configs/tome.json``, which the
reference forces) to the last, the current visual tokens are split alternately into A/B, each A
token finds its most similar B token (cosine of ``cluster_features``, post-RoPE keys by default),
and the ``r_i`` best pairs merge: size-weighted mean hidden state, summed size, kept at the B token's
slot and position; sizes feed proportional attention in every later layer.

``r_i`` follows the reference's schedule (``pact.ops.tome.tome_schedule``):
``p_eff = 1 - (1 - p)(n - L_eq)/n``, ``r_0 = 6 n (1 - p_eff) N / ((n + 1)(2n + 1))``,
``r_i = floor(r_0 (n - i) / n) + 1``, clamped at run time to ``[0, floor(N_cur / 2) - 2]`` -- so the
layer-averaged number of visual tokens matches a single-layer method keeping p from layer L_eq
(p = ``tome_keep_ratio``, L_eq = ``tome_equivalent_layer``, N = visual tokens before the first ToMe
layer, n = decoder layers).

Budget: ``target_tokens`` T / ``target_ratio`` r set p = T / N (per sample) / p = 1 - r: ToMe's budget
is the layer-averaged cost of keeping that many tokens from L_eq, the comparison the reference makes.
"""

from __future__ import annotations

from pact.methods.base import CLUSTERING, Method, Signals, declare, register
from pact.methods.budget import target_count
from pact.methods.pact import cluster_features
from pact.ops.reduction import Reduction
from pact.ops.tome import bipartite_merge, merge_reduction, tome_clamp, tome_schedule

declare(
    CLUSTERING,
    "tome",
    "whole method",
    "ToMe: progressive bipartite merging from layer 0 with the reference r-schedule",
)


@register("none", "tome")
class ToMe(Method):
    """Progressive bipartite soft matching with the reference's r-schedule."""

    name = "tome"

    def layers(self, num_layers: int) -> list[int]:
        first = int(self.config.layer)
        if first >= num_layers:
            raise ValueError(f"layer={first} but the model has only {num_layers} decoder layers")
        eq = int(self.config.tome_equivalent_layer)
        if eq >= num_layers:
            # The schedule would clamp L_eq to n (p_eff = 1: one merge per layer whatever the
            # budget): refuse at apply instead of running a different budget.
            raise ValueError(
                f"tome_equivalent_layer={eq} but the model has only {num_layers} decoder layers: use a "
                f"layer in [0, {num_layers - 1}]"
            )
        return list(range(first, num_layers))

    def keep_ratio(self, n_original: int) -> float:
        """p of the schedule for a sample with ``n_original`` visual tokens."""
        target = target_count(self.config, n_original)
        if target is None:
            return float(self.config.tome_keep_ratio)
        return target / n_original if n_original else 1.0

    def merge_count(self, layer: int, num_layers: int, n_original: int, n_current: int) -> int:
        """Clamped r of ``layer`` for a sample with ``n_original`` tokens of which ``n_current`` remain."""
        eq = min(int(self.config.tome_equivalent_layer), num_layers)
        r = tome_schedule(num_layers, n_original, self.keep_ratio(n_original), eq)[layer]
        return tome_clamp(r, n_current)

    def reduce(self, signals: Signals) -> Reduction:
        # ToMe never drops a token, so the sizes add up to the visual count before the first layer.
        n_original = round(float(signals.sizes.sum()))
        r = self.merge_count(signals.layer, signals.num_layers, n_original, signals.num_visual)
        vis = signals.visual_mask
        metric = cluster_features(signals)[vis]
        hidden = signals.hidden[vis]
        kept, labels, _ = bipartite_merge(metric, r, signals.sizes)
        red = merge_reduction(hidden, kept, labels, signals.sizes)
        if not self.config.merge_mean:
            red.hidden = None  # the B token keeps its own hidden state (take_mean=false)
        return red
