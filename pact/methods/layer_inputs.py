"""What later decoder layers receive in a prefill, for progressive methods that score at them.

``Signals.layer_input(j)`` / ``qk_at(j)`` give earlier layers' inputs only from before the method's
first reduction step (the engine keeps no copy of a reduced layout's layer inputs). A method that
scores at a later layer with that layer's own queries/keys (SparseVLM's later stages, HoliTom's inner
merge) records the layer's input and rotary tables with a forward pre-hook, registered after the
engine's, so it sees exactly what the layer gets: ``LayerInputs``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from pact.methods.base import Signals

__all__ = ["LayerInputs"]


class LayerInputs:
    """Pre-hooks that keep, for some decoder layers, the (B, R, D) hidden states and the (cos, sin)
    tables (B, R, d) each receives in the latest prefill (decode steps, one token, are not kept).

    ``method``: the method's name, for the error when a layer's input is missing.
    """

    def __init__(self, method: str) -> None:
        self.method = method
        self.adapter: Any = None
        self.seen: dict[int, tuple[torch.Tensor, Any]] = {}

    def attach(self, adapter: Any, layers: Iterable[int]) -> list[Any]:
        """Register the pre-hooks on decoder ``layers`` of ``adapter``; returns their handles."""
        self.adapter = adapter
        self.seen = {}
        handles = []
        for layer in layers:

            def keep(module: Any, args: tuple, kwargs: dict, layer: int = layer) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                if hidden.shape[1] > 1:  # a prefill (decode steps feed one token)
                    self.seen[layer] = (hidden, kwargs.get("position_embeddings"))

            handles.append(adapter.layers[layer].register_forward_pre_hook(keep, with_kwargs=True))
        return handles

    def clear(self) -> None:
        self.seen = {}

    def get(self, layer: int) -> tuple[torch.Tensor, Any]:
        """(hidden (B, R, D), (cos, sin) or None) that decoder ``layer`` received in this prefill.

        Raises:
            ValueError: nothing was recorded for that layer (the method was not installed by
                ``pact.apply``, or the layer has not run in this prefill).
        """
        if layer not in self.seen or self.adapter is None:
            raise ValueError(
                f"{self.method}: the input of decoder layer {layer} was not recorded in this prefill "
                "(use pact.apply)"
            )
        return self.seen[layer]

    def queries_keys(self, signals: Signals, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-RoPE (q (T, H, d), k (T, H_kv, d)) of decoder ``layer`` for the sample of ``signals``,
        recomputed exactly as the layer computes them from what it received: the same T tokens as
        ``signals`` (nothing is reduced between that layer and ``signals.layer``) with the layer's own
        rotary tables (Gemma 3's sliding and global layers differ), or ``signals.cos_sin()`` when the
        layer received none."""
        hidden, rope = self.get(layer)
        t, b = signals.hidden.shape[0], signals.sample
        # the engine left-pads a reduced batch: the sample's valid tokens are its last t slots
        rows = hidden[b, -t:]
        cos, sin = (rope[0][b, -t:], rope[1][b, -t:]) if rope is not None else signals.cos_sin()
        _, _, q, k = self.adapter.queries_keys(self.adapter.layers[layer], rows, cos, sin, True, True)
        return q, k
