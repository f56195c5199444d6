"""PyramidDrop (CVPR 2025, official code ``Cooperx521/PyramidDrop``, ``llava/model/modeling_llama_pdrop.py``
``pdrop_forward`` / ``pdrop_rank_drop``): drop visual tokens in stages, ranked by the attention the
last instruction token pays them.

The official rule (LLaVA-1.5-7B, 32 layers, ``--layer_list [8,16,24] --image_token_ratio_list
[0.5,0.25,0.125]``, i.e. 4 stages with lambda = 0.5): after layer l-1, for each l in the list, the
query of the LAST token of the prompt and the keys of every token, both from layer l's own
projections of its input (after RoPE), give one attention row (softmax over all keys, mean over
heads); the ``int(N * ratio_s)`` visual tokens (N: the ORIGINAL count) with the largest attention
stay, in sequence order. The shortened sequence gets contiguous position ids and decoding continues
from its length (``pdrop_rank_drop`` rebuilds ``arange`` positions; ``pdrop_forward`` subtracts the
dropped count from the decode positions): ``position_mode: "renumber"``.

Only that one attention row is computed (``pact.ops.scoring.fastv_scores``, variant "original":
float32, from the layer's recomputed q/k), so the method runs on sdpa; the row equals what an eager
model returns with ``output_attentions`` (tests).

Config: ``pdrop_layers`` (given for a model of ``pdrop_depth`` layers, scaled to the model's depth),
``pdrop_keep_ratios`` (of the original count). ``layer`` is not used and ``progressive: true`` is
refused.

Budget (``target_tokens`` K / ``target_ratio``): stage s keeps ``int(N * lambda^s)`` (the pyramid of
the paper), lambda the largest whose mean visual count over the layers from the first stage to the
last is not above K (``pact.ops.stages.budget_counts``).
"""

from __future__ import annotations

from typing import Any

from pact.methods.base import PRUNING, Method, Signals, declare, register
from pact.methods.budget import pruned_reduction, target_count
from pact.ops.reduction import Reduction
from pact.ops.scoring import fastv_scores, topk_indices
from pact.ops.stages import absolute_counts, budget_counts, parse_layers, parse_ratios, scale_layers

declare(
    PRUNING,
    "pdrop",
    "whole method",
    "PyramidDrop: staged drops ranked by the last instruction token's attention (one row, sdpa-safe)",
)


def pyramid(n: int, lam: float, stages: int) -> list[int]:
    """``int(n * lam ** s)`` for s = 1..stages (the paper's pyramid with rate lambda)."""
    return absolute_counts(n, [lam ** (s + 1) for s in range(stages)])


@register("pdrop", "none")
class PyramidDrop(Method):
    """Staged dropping by the last token's attention at each stage layer."""

    name = "pdrop"
    needs_merge = False

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        if config.progressive:
            raise ValueError(
                "pruning='pdrop' runs at its own stage layers (pdrop_layers); progressive=true has no "
                "meaning for it: set progressive=false"
            )

    def layers(self, num_layers: int) -> list[int]:
        cfg = self.config
        return scale_layers(parse_layers(cfg.pdrop_layers), int(cfg.pdrop_depth), num_layers)

    def counts(self, n: int, num_layers: int) -> list[int]:
        """Visual tokens a sample with ``n`` of them keeps after each stage."""
        stages = self.layers(num_layers)
        target = target_count(self.config, n)
        if target is None:
            return absolute_counts(n, parse_ratios(self.config.pdrop_keep_ratios))
        return budget_counts(n, target, stages, num_layers, lambda lam: pyramid(n, lam, len(stages)))

    def reduce(self, signals: Signals) -> Reduction:
        stages = self.layers(signals.num_layers)
        stage = stages.index(signals.layer)
        plan = ("pdrop counts", signals.sample)
        if stage == 0:
            signals.context[plan] = self.counts(signals.num_visual, signals.num_layers)
        if plan not in signals.context:
            raise RuntimeError("PyramidDrop: the first stage of this sample did not run")
        q, k = signals.queries(rope=True), signals.keys(rope=True)
        scores = fastv_scores(
            q.detach(),
            k.detach(),
            signals.visual_mask,
            variant="original",
            scale=signals.attention_scale(),
            visibility=signals.attention_visibility(),  # the layer's own mask (Gemma 3: its window)
        )
        n = signals.num_visual
        kept = topk_indices(scores, min(n, signals.context[plan][stage]))
        return pruned_reduction(kept, n, signals.sizes, scores)
