"""InternVL, HF-native (``InternVLForConditionalGeneration``, the "-hf" checkpoints).

Visual candidates are the ``<IMG_CONTEXT>`` tokens between ``<img>`` and ``</img>`` (the processor
turns video frames into such tiles too); the start/end tokens are text.

Language models: InternVL3 has a Qwen2 decoder, InternVL3.5 a Qwen3 one (dense or MoE) whose
attention normalises each head's q and k before RoPE (``ModelAdapter.queries_keys`` applies them).
Decoders with sliding-window layers or attention sinks (InternVL3.5-GPT-OSS) are refused: the
engine's masks and attention function of reduced layers model neither.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pact.models.base import ModelAdapter
from pact.models.groups import Group
from pact.models.vision_probe import VisionProbe


class InternVLProbe(VisionProbe):
    """InternViT (with [CLS] and q/k norms); the pixel shuffle turns 2x2 patches into one LLM row."""

    def layers(self) -> nn.ModuleList:
        return self.vlm.vision_tower.encoder.layer

    def attention(self, layer: int) -> nn.Module:
        return self.layers()[layer].attention

    def qk(
        self, module: nn.Module, args: tuple, kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        x = args[0] if args else kwargs["hidden_states"]
        b, s, _ = x.shape
        q = module.q_norm(module.q_proj(x)).view(b, s, module.num_heads, -1)
        k = module.k_norm(module.k_proj(x)).view(b, s, module.num_heads, -1)
        return q.flatten(0, 1), k.flatten(0, 1), [s] * b

    def to_rows(self, values: torch.Tensor, segments: list[int]) -> torch.Tensor:
        parts = torch.split(values, segments)
        if self.drops_cls():
            parts = [p[1:] for p in parts]
        x = torch.stack(parts)  # (B, P, C)
        b, p, c = x.shape
        side = math.isqrt(p)
        shuffled = self.vlm.pixel_shuffle(x.view(b, side, side, c), scale_factor=self.config.downsample_ratio)
        group = round(1 / self.config.downsample_ratio**2)  # patches per token (4)
        return shuffled.reshape(b, -1, group, c).mean(2).flatten(0, 1)


class InternVLAdapter(ModelAdapter):
    family = "internvl"
    class_names = ("InternVLForConditionalGeneration", "InternVLModel")
    model_types = ("internvl",)
    has_video = True
    video_frames_as_images = True
    default_checkpoint = "OpenGVLab/InternVL3-8B-hf"
    vision_probe_class = InternVLProbe

    def unsupported_reason(self) -> str | None:
        text = self.text_config
        for i, layer in enumerate(self.layers):
            attn = getattr(layer, "self_attn", None)
            if getattr(attn, "sliding_window", None) is not None:
                return (
                    f"its {text.model_type} decoder has sliding-window attention (layer {i}); the engine's "
                    "masks of reduced layers are full causal"
                )
            if getattr(attn, "sinks", None) is not None:
                return (
                    f"its {text.model_type} decoder has attention sinks (layer {i}); the engine's attention "
                    "of reduced layers has none"
                )
        return None

    def visual_groups(self, input_ids: torch.Tensor, inputs: Mapping[str, Any]) -> list[list[Group]]:
        """Every ``image_seq_length`` consecutive tokens are one square tile (the tiles of one run of
        visual tokens belong to one image)."""
        return self._square_visual_groups(input_ids, inputs, int(self.model.config.image_seq_length), "tile")
