"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one crop, ``<image>`` tokens are all patches."""

from __future__ import annotations

from pact.models.base import ModelAdapter


class LlavaAdapter(ModelAdapter):
    family = "llava"
    class_names = ("LlavaForConditionalGeneration", "LlavaModel")
    model_types = ("llava",)
