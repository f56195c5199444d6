"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one crop, ``<image>`` tokens are all patches."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pact.models.base import ModelAdapter
from pact.models.groups import Group
from pact.models.vision_probe import VisionProbe


class ClipProbe(VisionProbe):
    """CLIP (LLaVA-1.5, LLaVA-NeXT) and SigLIP (LLaVA-OneVision) towers."""

    def layers(self) -> nn.ModuleList:
        tower = self.vlm.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    def attention(self, layer: int) -> nn.Module:
        return self.layers()[layer].self_attn


class LlavaAdapter(ModelAdapter):
    family = "llava"
    class_names = ("LlavaForConditionalGeneration", "LlavaModel")
    model_types = ("llava",)
    default_checkpoint = "llava-hf/llava-1.5-7b-hf"
    vision_probe_class = ClipProbe
    base_and_sub_images = True

    def visual_groups(self, input_ids: torch.Tensor, inputs: Mapping[str, Any]) -> list[list[Group]]:
        """Every ``(image_size / patch_size)^2`` consecutive image tokens are one square image."""
        cfg = self.model.config
        side = int(cfg.vision_config.image_size) // int(cfg.vision_config.patch_size)
        if getattr(cfg, "vision_feature_select_strategy", "default") == "full":
            raise ValueError("LLaVA with vision_feature_select_strategy='full' (CLS kept) has no square grid")
        return self._square_visual_groups(input_ids, inputs, side * side, "image")
