"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): M-RoPE positions, no image newlines.

Visual candidates are the ``<|image_pad|>`` / ``<|video_pad|>`` tokens (never ``<|vision_start|>`` /
``<|vision_end|>``). Positions are (t, h, w) triples; the rotary module already folds them into one
cos/sin per token, so the engine gathers cos/sin rows of kept tokens like for 1-D RoPE.
"""

from __future__ import annotations

import torch

from pact.models.base import ModelAdapter


class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2_vl"
    class_names = ("Qwen2VLForConditionalGeneration", "Qwen2VLModel")
    model_types = ("qwen2_vl",)
    mrope = True
    has_video = True
    default_checkpoint = "Qwen/Qwen2-VL-7B-Instruct"

    def decode_position_ids(self, start: int, length: int, batch: int, device: torch.device) -> torch.Tensor:
        """(3, B, q): the stock ``compute_3d_position_ids`` cached branch with the unreduced length."""
        pos = torch.arange(start, start + length, device=device).view(1, 1, -1).expand(3, batch, -1)
        deltas = getattr(self.vlm, "rope_deltas", None)
        if deltas is None:
            return pos
        deltas = deltas.repeat_interleave(batch // deltas.shape[0], dim=0).to(device)
        return pos + deltas
