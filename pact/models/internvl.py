"""InternVL, HF-native (``InternVLForConditionalGeneration``, the "-hf" checkpoints).

Visual candidates are the ``<IMG_CONTEXT>`` tokens between ``<img>`` and ``</img>`` (the processor
turns video frames into such tiles too); the start/end tokens are text.
"""

from __future__ import annotations

from pact.models.base import ModelAdapter


class InternVLAdapter(ModelAdapter):
    family = "internvl"
    class_names = ("InternVLForConditionalGeneration", "InternVLModel")
    model_types = ("internvl",)
