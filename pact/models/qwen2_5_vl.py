"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): same token and position layout as Qwen2-VL
(M-RoPE with time-scaled video positions, already folded into the positions the model builds)."""

from __future__ import annotations

from pact.models.qwen2_vl import Qwen2VLAdapter


class Qwen2_5_VLAdapter(Qwen2VLAdapter):  # noqa: N801 (mirrors the Hugging Face class name)
    family = "qwen2_5_vl"
    class_names = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")
    model_types = ("qwen2_5_vl",)
    default_checkpoint = "Qwen/Qwen2.5-VL-7B-Instruct"
