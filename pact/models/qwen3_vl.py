"""Qwen3-VL (``Qwen3VLForConditionalGeneration``) and its MoE variant: M-RoPE, q/k norms, DeepStack.

What differs from Qwen2-VL, and where pact handles it:

- The attention normalises each head's queries and keys (``q_norm`` / ``k_norm``) before RoPE:
  ``ModelAdapter.queries_keys`` applies them (tests/test_qk_contract.py checks it on this family).
- M-RoPE is interleaved (t, h, w frequencies alternate instead of three blocks): the text model's
  ``rotary_emb`` folds it into one cos/sin per token, which the engine gathers or recomputes through
  ``ModelAdapter.rotary`` as for Qwen2-VL. Position ids come from ``get_rope_index`` (text 1-D, each
  image/video frame an (h, w) grid at the text position) and decode continues with ``rope_deltas``,
  exactly as Qwen2-VL's cached branch: ``Qwen2VLAdapter.decode_position_ids`` applies.
- Videos: the processor writes a timestamp (``<1.0 seconds>``) before every frame, so each frame is
  its own run of ``<|video_pad|>`` tokens between ``<|vision_start|>`` / ``<|vision_end|>``, and
  ``get_rope_index`` gives it its own grid (one temporal step). ``position_groups`` therefore sees one
  grid per frame, each its own image (per-image methods such as PruMerge work per frame).
- DeepStack: the vision tower also returns features of some of its layers (``deepstack_features``);
  the text model adds the k-th of them to the hidden states at the visual positions right after
  decoder layer k (``Qwen3VLTextModel._deepstack_process``). A reduction at or before those layers
  changes the visual positions, so the stock call would index a (B, T) mask into (B, R) hidden
  states. The adapter hands the features to the engine (``take_visual_injection``) and adds them
  with the model's own ``_deepstack_process`` (``inject``); the engine follows the reductions: a
  kept token gets its own feature, a merged token the size-weighted mean of its members' features
  (the combination its hidden state got), a removed token none, and a new token (PruMerge's
  ``extra``) none (it stands for pruned tokens, whose features are dropped with them).
"""

from __future__ import annotations

from typing import Any

import torch

from pact.models.base import VisualInjection
from pact.models.qwen2_vl import Qwen2VLAdapter, QwenProbe

_DEEPSTACK_FEATURES = "deepstack_visual_embeds"
_DEEPSTACK_MASK = "visual_pos_masks"


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    class_names = ("Qwen3VLForConditionalGeneration", "Qwen3VLModel")
    model_types = ("qwen3_vl",)
    default_checkpoint = "Qwen/Qwen3-VL-8B-Instruct"
    # The processor writes a timestamp before every frame, so each frame is its own visual run and
    # its own "image" grid; which runs form one video is not derived yet: EVS / HoliTom refuse.
    video_frames_as_images = True
    vision_probe_class = QwenProbe  # same ViT layout: fused qkv, vision RoPE, cu_seqlens, 2x2 merger
    injects_visual_features = True

    def take_visual_injection(self, kwargs: dict[str, Any]) -> VisualInjection | None:
        """DeepStack: ``deepstack_visual_embeds`` (list of (M, D), the k-th added after layer k) and
        ``visual_pos_masks`` (B, T) of the text model's call, removed from ``kwargs``."""
        features = kwargs.get(_DEEPSTACK_FEATURES)
        mask = kwargs.get(_DEEPSTACK_MASK)
        if features is None or mask is None:
            return None
        num_layers = len(self.layers)
        if len(features) > num_layers:
            raise ValueError(
                f"{len(features)} DeepStack feature sets for a text model of {num_layers} decoder layers"
            )
        kwargs[_DEEPSTACK_FEATURES] = None
        kwargs[_DEEPSTACK_MASK] = None
        return VisualInjection(mask=mask.bool(), features=dict(enumerate(features)))

    def inject(self, hidden: torch.Tensor, mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.text_model._deepstack_process(hidden, mask, features)


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    family = "qwen3_vl_moe"
    class_names = ("Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeModel")
    model_types = ("qwen3_vl_moe",)
    default_checkpoint = "Qwen/Qwen3-VL-30B-A3B-Instruct"
