"""InternVL, HF-native (``InternVLForConditionalGeneration``, the "-hf" checkpoints).

Visual candidates are the ``<IMG_CONTEXT>`` tokens between ``<img>`` and ``</img>`` (the processor
turns video frames into such tiles too); the start/end tokens are text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pact.models.base import ModelAdapter
from pact.models.groups import Group


class InternVLAdapter(ModelAdapter):
    family = "internvl"
    class_names = ("InternVLForConditionalGeneration", "InternVLModel")
    model_types = ("internvl",)
    has_video = True
    default_checkpoint = "OpenGVLab/InternVL3-8B-hf"

    def visual_groups(self, input_ids: torch.Tensor, inputs: Mapping[str, Any]) -> list[list[Group]]:
        """Every ``image_seq_length`` consecutive tokens are one square tile (the tiles of one run of
        visual tokens belong to one image)."""
        return self._square_visual_groups(input_ids, inputs, int(self.model.config.image_seq_length), "tile")
