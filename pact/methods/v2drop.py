"""V2Drop (CVPR 2026, "Variation-aware Vision Token Dropping for Faster Large Vision-Language
Models"; official code ``xuyang-liu16/V2Drop``, ``llava/model/language_model/V2Drop.py``): drop, at a
few decoder layers, the visual tokens whose hidden state changed least across the previous layer.

The official rule (LLaVA-1.5-7B, 32 layers): before each layer L of ``{3, 17, 22}`` the variation of
each current visual token is ``||x_L - x_{L-1}||_2`` (x_i: the hidden states entering layer i, i.e.
what layer L-1 added to the residual stream); the ``max(1, int(N_cur * q))`` tokens with the LARGEST
variation stay (q = 0.5, 0.5, 0 of the current count: 576 -> 288 -> 144 -> 1), in sequence order,
with their original position ids (``position_mode: "center"``). Its Qwen2-VL port uses layers
``{3, 16, 22}`` with q = 0.25, 0.05, 0 (``v2drop_layers="3,16,22"``, ``v2drop_keep_ratios="0.25,0.05,0"``,
``v2drop_depth=28``).

Config: ``v2drop_layers`` (for a model of ``v2drop_depth`` layers, scaled to the model's depth,
``pact.ops.stages.scale_layers``), ``v2drop_keep_ratios``. ``layer`` is not used and
``progressive: true`` is refused. The variation needs the input of layer L-1 for the tokens present
at L: the method also runs at every layer L-1 (an identity step that records those hidden states),
so ``pact.stats(...).layers`` lists L-1 and L.

Budget (``target_tokens`` K / ``target_ratio``): every stage keeps the same fraction lambda of the
current tokens, lambda chosen so that the mean visual count over the layers from the first stage on
is the largest not above K (``pact.ops.stages.budget_counts``).
"""

from __future__ import annotations

from typing import Any

import torch

from pact.methods.base import PRUNING, Method, Signals, declare, register
from pact.methods.budget import pruned_reduction, target_count
from pact.ops.reduction import Reduction, identity_reduction
from pact.ops.scoring import topk_indices
from pact.ops.stages import budget_counts, parse_layers, parse_ratios, relative_counts, scale_layers

declare(
    PRUNING,
    "v2drop",
    "whole method",
    "V2Drop: progressively drop the visual tokens whose hidden state varies least across a layer",
)


def variation(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """float32 (N,) L2 norm of ``current - previous`` per row: (N, D), (N, D)."""
    if current.shape != previous.shape:
        raise ValueError(
            f"variation needs equal shapes, got {tuple(current.shape)} and {tuple(previous.shape)}"
        )
    return torch.linalg.vector_norm(current.float() - previous.float(), dim=-1)


@register("v2drop", "none")
class V2Drop(Method):
    """Progressive dropping of the least-varying visual tokens at the stage layers."""

    name = "v2drop"
    needs_merge = False

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        if config.progressive:
            raise ValueError(
                "pruning='v2drop' runs at its own stage layers (v2drop_layers); progressive=true has "
                "no meaning for it: set progressive=false"
            )

    def stages(self, num_layers: int) -> list[int]:
        """The stage layers on a model of ``num_layers`` layers."""
        cfg = self.config
        out = scale_layers(parse_layers(cfg.v2drop_layers), int(cfg.v2drop_depth), num_layers)
        if out[0] < 1:
            raise ValueError(
                f"v2drop_layers={cfg.v2drop_layers!r} gives a stage at layer {out[0]} on a "
                f"{num_layers}-layer model; V2Drop compares a layer's input with the previous layer's, "
                "so every stage layer must be >= 1"
            )
        return out

    def layers(self, num_layers: int) -> list[int]:
        stages = self.stages(num_layers)
        return sorted(set(stages) | {s - 1 for s in stages})

    def counts(self, n: int, num_layers: int) -> list[int]:
        """Visual tokens a sample with ``n`` of them keeps after each stage."""
        stages = self.stages(num_layers)
        target = target_count(self.config, n)
        if target is None:
            return relative_counts(n, parse_ratios(self.config.v2drop_keep_ratios))
        return budget_counts(
            n, target, stages, num_layers, lambda lam: relative_counts(n, [lam] * len(stages))
        )

    def reduce(self, signals: Signals) -> Reduction:
        stages = self.stages(signals.num_layers)
        n = signals.num_visual
        visual = signals.hidden[signals.visual_mask].detach()
        stash = ("v2drop previous", signals.sample)
        out = identity_reduction(n, device=visual.device)
        left = visual
        if signals.layer in stages:
            stage = stages.index(signals.layer)
            plan = ("v2drop counts", signals.sample)
            if stage == 0:
                signals.context[plan] = self.counts(n, signals.num_layers)
            previous = signals.context.get(stash)
            if previous is None or plan not in signals.context:
                raise RuntimeError(
                    "V2Drop: the previous layer's hidden states of this sample were not recorded"
                )
            scores = variation(visual, previous)
            kept = topk_indices(scores, min(n, signals.context[plan][stage]))
            out = pruned_reduction(kept, n, signals.sizes, scores)
            left = visual[kept]
        if signals.layer + 1 in stages:
            signals.context[stash] = left
        return out
