"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one crop, ``<image>`` tokens are all patches."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pact.models.base import ModelAdapter
from pact.models.groups import Group


class LlavaAdapter(ModelAdapter):
    family = "llava"
    class_names = ("LlavaForConditionalGeneration", "LlavaModel")
    model_types = ("llava",)
    default_checkpoint = "llava-hf/llava-1.5-7b-hf"

    def visual_groups(self, input_ids: torch.Tensor, inputs: Mapping[str, Any]) -> list[list[Group]]:
        """Every ``(image_size / patch_size)^2`` consecutive image tokens are one square image."""
        cfg = self.model.config
        side = int(cfg.vision_config.image_size) // int(cfg.vision_config.patch_size)
        if getattr(cfg, "vision_feature_select_strategy", "default") == "full":
            raise ValueError("LLaVA with vision_feature_select_strategy='full' (CLS kept) has no square grid")
        return self._square_visual_groups(input_ids, inputs, side * side, "image")
