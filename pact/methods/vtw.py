"""VTW (visual tokens withdrawal, AAAI'25): remove every visual token at one decoder layer.

The layer: ``cfg.layer`` as given, or, with ``vtw_equivalent_layer = L_eq >= 0``, the reference's
equivalence formula ``round(n * (1 - (1 - p) * (n - L_eq) / n))`` (n = decoder layers of the model,
p = ``vtw_keep_ratio``), which makes the layer-averaged number of visual tokens equal to that of a
single-layer method keeping p from layer L_eq (n=28, L_eq=4, p=0.353 -> 12). The reference
overwrote its global config at the first forward; here the layer is computed from the model's depth
when the method is attached, the config is untouched.

With a budget, p comes from it: ``target_ratio`` r -> p = 1 - r (one layer for the whole batch);
``target_tokens`` T -> p = T / N per sample, so each sample has its own layer: the method then runs
at every layer from 0 and withdraws a sample's visual tokens at that sample's layer (L_eq =
``vtw_equivalent_layer``, or ``layer`` when it is -1). A formula layer >= n means "never withdraw".
"""

from __future__ import annotations

import torch

from pact.methods.base import PRUNING, Method, Signals, declare, register
from pact.methods.budget import pruned_reduction
from pact.ops.reduction import Reduction, identity_reduction
from pact.ops.tome import vtw_layer

declare(PRUNING, "withdraw", "whole method", "VTW: withdraw every visual token at one layer")


@register("withdraw", "none")
class VisualTokenWithdrawal(Method):
    """Withdraw all visual tokens at the VTW layer."""

    name = "vtw"
    needs_merge = False

    def _equivalent_layer(self) -> int:
        cfg = self.config
        return int(cfg.vtw_equivalent_layer) if cfg.vtw_equivalent_layer >= 0 else int(cfg.layer)

    def _keep_ratio(self) -> float | None:
        """p of the formula, None when the layer is given as is (or per sample, with target_tokens)."""
        cfg = self.config
        if cfg.target_ratio is not None:
            return 1.0 - float(cfg.target_ratio)
        if cfg.vtw_equivalent_layer >= 0:
            return float(cfg.vtw_keep_ratio)
        return None

    def withdraw_layer(self, num_layers: int, num_visual: int | None = None) -> int:
        """The decoder layer before which the visual tokens go (>= num_layers: never)."""
        cfg = self.config
        if cfg.target_tokens is not None:
            if num_visual is None:
                raise ValueError(
                    "with target_tokens the VTW layer depends on the sample's visual token count"
                )
            p = min(1.0, cfg.target_tokens / num_visual) if num_visual else 1.0
            return vtw_layer(num_layers, p, min(self._equivalent_layer(), num_layers))
        p = self._keep_ratio()
        if p is None:
            return int(cfg.layer)
        return vtw_layer(num_layers, p, min(self._equivalent_layer(), num_layers))

    def layers(self, num_layers: int) -> list[int]:
        eq = self._equivalent_layer()
        if eq >= num_layers:
            # min(L_eq, n) below would silently mean "never withdraw": refuse at apply instead.
            key = "vtw_equivalent_layer" if self.config.vtw_equivalent_layer >= 0 else "layer"
            raise ValueError(
                f"{key}={eq} but the model has only {num_layers} decoder layers: use a layer in "
                f"[0, {num_layers - 1}]" + (", or -1 to withdraw at `layer`" if key != "layer" else "")
            )
        if self.config.target_tokens is not None:
            return list(range(num_layers))  # per-sample layer: decided in reduce
        layer = self.withdraw_layer(num_layers)
        if self.config.vtw_equivalent_layer < 0 and self.config.target_ratio is None and layer >= num_layers:
            raise ValueError(f"layer={layer} but the model has only {num_layers} decoder layers")
        return [layer] if layer < num_layers else []

    def reduce(self, signals: Signals) -> Reduction:
        n = signals.num_visual
        if self.config.target_tokens is not None:
            at = self.withdraw_layer(signals.num_layers, n)
            if signals.layer != at:
                return identity_reduction(n, device=signals.hidden.device)
        empty = torch.zeros(0, dtype=torch.long, device=signals.hidden.device)
        return pruned_reduction(empty, n)
