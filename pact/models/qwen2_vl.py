"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): M-RoPE positions, no image newlines.

Visual candidates are the ``<|image_pad|>`` / ``<|video_pad|>`` tokens (never ``<|vision_start|>`` /
``<|vision_end|>``). Positions are (t, h, w) triples; the rotary module already folds them into one
cos/sin per token, so the engine gathers cos/sin rows of kept tokens like for 1-D RoPE.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from pact.models.base import ModelAdapter
from pact.models.vision_probe import VisionProbe


class QwenProbe(VisionProbe):
    """The Qwen2-VL / Qwen2.5-VL ViT: fused qkv with vision RoPE, images (or attention windows) as
    ``cu_seqlens`` segments; the merger turns 4 consecutive patches into one LLM row."""

    has_cls = False

    def layers(self) -> nn.ModuleList:
        return self.vlm.visual.blocks

    def attention(self, layer: int) -> nn.Module:
        return self.layers()[layer].attn

    def select_layer(self) -> int:
        return len(self.layers()) - 1  # the merger reads the last block

    def rows_module(self) -> nn.Module:
        return self.vlm.visual.merger

    def qk(
        self, module: nn.Module, args: tuple, kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        x = args[0] if args else kwargs["hidden_states"]
        cu = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
        cos, sin = kwargs["position_embeddings"]
        s = x.shape[0]
        q, k, _ = module.qkv(x).reshape(s, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        rope = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision
        q, k = rope(q, k, cos, sin)
        segments = torch.diff(cu).tolist() if cu is not None else [s]
        return q, k, [int(n) for n in segments if n > 0]

    def to_rows(self, values: torch.Tensor, segments: list[int]) -> torch.Tensor:
        unit = int(self.vlm.visual.spatial_merge_size) ** 2  # consecutive patches of one merged token
        return values.view(-1, unit, values.shape[-1]).mean(1)

    def row_crops(self, num_rows: int, segments: list[int], device: torch.device) -> torch.Tensor:
        unit = int(self.vlm.visual.spatial_merge_size) ** 2
        lengths = torch.tensor([n // unit for n in segments], device=device)
        if int(lengths.sum()) != num_rows:
            return torch.zeros(num_rows, dtype=torch.long, device=device)
        return torch.arange(len(segments), device=device).repeat_interleave(lengths)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        # the merger normalises each patch, then concatenates the 4 patches of a token
        unit = int(self.vlm.visual.spatial_merge_size) ** 2
        return self.rows_module()(features.reshape(features.shape[0] * unit, -1))


class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2_vl"
    class_names = ("Qwen2VLForConditionalGeneration", "Qwen2VLModel")
    model_types = ("qwen2_vl",)
    mrope = True
    has_video = True
    default_checkpoint = "Qwen/Qwen2-VL-7B-Instruct"
    vision_probe_class = QwenProbe

    def decode_position_ids(self, start: int, length: int, batch: int, device: torch.device) -> torch.Tensor:
        """(3, B, q): the stock ``compute_3d_position_ids`` cached branch with the unreduced length."""
        pos = torch.arange(start, start + length, device=device).view(1, 1, -1).expand(3, batch, -1)
        deltas = getattr(self.vlm, "rope_deltas", None)
        if deltas is None:
            return pos
        deltas = deltas.repeat_interleave(batch // deltas.shape[0], dim=0).to(device)
        return pos + deltas
