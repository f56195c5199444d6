"""What differs between vision encoders, for the vision-side methods (VisPruner, PruMerge, HiRED).

A ``VisionProbe`` tells ``pact.methods.vision.VisionCapture`` where an encoder's layers and attention
modules are, how a layer's queries and keys are recomputed from the attention module's input, how
per-patch values map to the rows the projector sends to the LLM, and how features are projected.
Each family's adapter names its probe class (``ModelAdapter.vision_probe_class``; the probe is
defined next to the adapter, e.g. ``ClipProbe`` in ``pact.models.llava``) and builds it with
``adapter.vision_probe()``. Encoders with a [CLS] token (``has_cls``) give the methods their own
signal; the others get the documented substitute (see ``pact.methods.vision``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

__all__ = ["VisionProbe"]


class VisionProbe(ABC):
    """Family-specific access to the vision encoder: its layers, q/k of a layer, the output rows."""

    has_cls = True

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter
        self.vlm = adapter.vlm
        self.config = adapter.model.config

    @abstractmethod
    def layers(self) -> nn.ModuleList:
        """The encoder's transformer layers."""

    @abstractmethod
    def attention(self, layer: int) -> nn.Module:
        """The self-attention module of encoder layer ``layer``."""

    def select_layer(self) -> int:
        """Index of the encoder layer whose output feeds the projector."""
        fl = self.config.vision_feature_layer
        fl = fl[-1] if isinstance(fl, (list, tuple)) else int(fl)
        n = len(self.layers())
        index = fl % (n + 1) - 1  # hidden_states[k] is the output of layer k - 1
        if index < 0:
            raise ValueError(f"vision_feature_layer={fl} selects the patch embeddings: no attention to read")
        return index

    def rows_module(self) -> nn.Module:
        return self.vlm.multi_modal_projector

    def qk(
        self, module: nn.Module, args: tuple, kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(q, k, segment lengths): q/k (S_total, H, d) over the concatenated images of the call."""
        x = args[0] if args else kwargs["hidden_states"]
        b, s, _ = x.shape
        h = module.num_heads
        q = module.q_proj(x).view(b, s, h, -1)
        k = module.k_proj(x).view(b, s, h, -1)
        return q.flatten(0, 1), k.flatten(0, 1), [s] * b

    def scale(self, module: nn.Module) -> float:
        return float(getattr(module, "scale", getattr(module, "scaling", None)))

    def drops_cls(self) -> bool:
        return self.has_cls and getattr(self.config, "vision_feature_select_strategy", "default") == "default"

    def to_rows(self, values: torch.Tensor, segments: list[int]) -> torch.Tensor:
        """Per-patch values (S_total, C) -> per-row values (R, C) (patches of one image per segment)."""
        parts = torch.split(values, segments)
        if self.drops_cls():
            parts = [p[1:] for p in parts]
        return torch.cat(parts)

    def row_features(self, projector_input: torch.Tensor, num_rows: int) -> torch.Tensor:
        """The projector's input -> (R, F) features of its R output rows (what a method merges and
        ``project`` maps to LLM rows). Default: the input already holds one feature vector per row
        (LLaVA's MLP, SmolVLM's shuffled rows), in row order."""
        if projector_input.numel() % num_rows:
            raise RuntimeError(
                f"vision capture: projector input of {projector_input.numel()} values for {num_rows} rows"
            )
        return projector_input.reshape(num_rows, -1)

    def views(self, rows: torch.Tensor, values: dict[str, torch.Tensor], segments: list[int]) -> list[tuple]:
        """Extra (rows, values) views for tokens the model builds from the rows (default: none)."""
        return []

    def row_crops(self, num_rows: int, segments: list[int], device: torch.device) -> torch.Tensor:
        """(R,) the encoder image (segment) each output row comes from: equal shares per segment."""
        per = num_rows // max(1, len(segments))
        if per * len(segments) != num_rows:
            return torch.zeros(num_rows, dtype=torch.long, device=device)
        return torch.arange(len(segments), device=device).repeat_interleave(per)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Projector input rows (R, F) -> LLM input rows (R, D), by the model's own module."""
        return self.rows_module()(features[None]).reshape(features.shape[0], -1)
