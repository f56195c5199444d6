"""DivPrune (CVPR 2025, official code ``vbdi/divprune``): keep a maximally diverse subset of the
visual tokens.

The official code (``LLaVA/llava/model/llava_arch.py``, ``DivPrune``, enabled by ``LAYER_INDEX=0``)
runs on the projector outputs as they enter the LLM: the visual rows of ``inputs_embeds``, i.e. the
hidden states entering decoder layer 0 here (``divprune.json``: ``layer: 0``). It keeps
``int(round(SUBSET_RATIO * N))`` tokens (``keep_ratio``, 0.098 in its scripts; Python's ``round``,
half to even) chosen by greedy max-min diversity in cosine distance
(``pact.ops.diversity.farthest_point_selection``), puts them back in sequence order and removes the
rest before the LLM, whose positions are then contiguous (LLaVA recomputes them from the shortened
sequence): ``position_mode: "renumber"``.

Option: ``layer`` L > 0 runs the same selection on the hidden states entering decoder layer L (the
residual stream) -- the "at a layer" variant of the paper's ablation; the official repository ships
only layer 0.

With a budget (``target_tokens`` / ``target_ratio``) the sample keeps exactly that many tokens.
One selection per sample over all its visual tokens (the official code handles one image per batch).
"""

from __future__ import annotations

from pact.methods.base import PRUNING, Method, Signals, declare, register
from pact.methods.budget import pruned_reduction, target_count
from pact.ops.diversity import farthest_point_selection
from pact.ops.reduction import Reduction

declare(
    PRUNING,
    "divprune",
    "whole method",
    "DivPrune: greedy max-min cosine diversity over the visual tokens (LLM input by default)",
)


def divprune_count(cfg: object, n: int) -> int:
    """Tokens DivPrune keeps out of ``n``: the budget, else ``int(round(keep_ratio * n))`` (official)."""
    budget = target_count(cfg, n)
    if budget is not None:
        return budget
    return min(n, round(float(cfg.keep_ratio) * n))


@register("divprune", "none")
class DivPrune(Method):
    """Keep ``divprune_count`` visual tokens chosen by greedy farthest-point (max-min) selection."""

    name = "divprune"
    needs_merge = False

    def reduce(self, signals: Signals) -> Reduction:
        features = signals.hidden[signals.visual_mask]
        n = signals.num_visual
        chosen = farthest_point_selection(features.detach(), divprune_count(self.config, n))
        return pruned_reduction(chosen.sort().values, n, signals.sizes)
