"""Qwen3-VL (``Qwen3VLForConditionalGeneration``) and its MoE variant: M-RoPE, q/k norms, DeepStack.

What differs from Qwen2-VL, and where pact handles it:

- The attention normalises each head's queries and keys (``q_norm`` / ``k_norm``) before RoPE:
  ``ModelAdapter.queries_keys`` applies them (tests/test_qk_contract.py checks it on this family).
- M-RoPE is interleaved (t, h, w frequencies alternate instead of three blocks): the text model's
  ``rotary_emb`` folds it into one cos/sin per token, which the engine gathers or recomputes through
  ``ModelAdapter.rotary`` as for Qwen2-VL. Position ids come from ``get_rope_index`` (text 1-D, each
  image/video frame an (h, w) grid at the text position) and decode continues with ``rope_deltas``,
  exactly as Qwen2-VL's cached branch: ``Qwen2VLAdapter.decode_position_ids`` applies.
- Videos: the processor writes a timestamp (``<1.0 seconds>``) before every frame (temporal patch),
  so each frame is its own run of ``<|video_pad|>`` tokens between ``<|vision_start|>`` /
  ``<|vision_end|>``, and ``get_rope_index`` splits each ``video_grid_thw`` row (t, h, w) into t
  grids (1, h, w), one per run, in order. ``run_media`` (``timestamped_video_media``) undoes that
  split: a run of ``<|video_pad|>`` starts a video or continues the current one until the video's
  t * h * w / merge^2 tokens are seen (from ``video_grid_thw``, or, in ``generate``, which passes
  the encoded videos instead, from the per-video ``pooler_output`` of ``mm_encoder_outputs``);
  ``<|image_pad|>`` runs are images. ``Signals.groups()`` then gives a video's frames as "frame"
  groups of one index, as for Qwen2-VL, so EVS and HoliTom find them (the timestamps between them
  are text: never candidates, never removed).
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

from collections.abc import Mapping
from typing import Any

import torch

from pact.models.base import ModelAdapter, VisualInjection
from pact.models.groups import media_by_video_sizes, runs
from pact.models.qwen2_vl import Qwen2VLAdapter, QwenProbe

_DEEPSTACK_FEATURES = "deepstack_visual_embeds"
_DEEPSTACK_MASK = "visual_pos_masks"


def video_token_counts(adapter: ModelAdapter, inputs: Mapping[str, Any]) -> list[int]:
    """Tokens of every video of the call, in batch order: ``t * h * w / merge^2`` of each
    ``video_grid_thw`` row, or (``generate`` encodes the videos before the prefill and passes
    ``mm_encoder_outputs`` instead of the grids) the rows of each video's encoded output.

    Raises:
        ValueError: the call has neither.
    """
    grid = inputs.get("video_grid_thw")
    if isinstance(grid, torch.Tensor):
        merge = int(adapter.model.config.vision_config.spatial_merge_size)
        return [int(t * h * w) // (merge * merge) for t, h, w in grid.tolist()]
    encoded = (inputs.get("mm_encoder_outputs") or {}).get("video")
    pooled = getattr(encoded, "pooler_output", None)
    if isinstance(pooled, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in pooled):
        return [int(v.shape[0]) for v in pooled]
    raise ValueError(
        f"{adapter.family}: the call has video tokens but neither video_grid_thw nor per-video encoder "
        "outputs (mm_encoder_outputs['video'].pooler_output), so which frames form one video is unknown"
    )


def timestamped_video_media(adapter: ModelAdapter, inputs: Mapping[str, Any]) -> list[list[int]] | None:
    """``ModelAdapter.run_media`` of the families whose processor puts a timestamp before every video
    frame (Qwen3-VL, Qwen3.5): ``<|image_pad|>`` runs are images; consecutive ``<|video_pad|>`` runs
    are the frames of one video until its token count (``video_token_counts``) is reached, exactly
    as ``get_rope_index`` consumes its per-frame split of ``video_grid_thw``. None without video."""
    input_ids = inputs.get("input_ids")
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"{adapter.family}: the frames of a video are found from the call's input_ids")
    candidates = adapter.candidate_mask(input_ids, inputs)
    video = candidates & (input_ids == int(adapter.model.config.video_token_id))
    if not bool(video.any()):
        return None
    spans = [runs(row) for row in candidates]
    lengths = [[n for _, n in row] for row in spans]
    is_video = [[bool(video[b, a]) for a, _ in row] for b, row in enumerate(spans)]
    return media_by_video_sizes(lengths, is_video, video_token_counts(adapter, inputs))


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    class_names = ("Qwen3VLForConditionalGeneration", "Qwen3VLModel")
    model_types = ("qwen3_vl",)
    default_checkpoint = "Qwen/Qwen3-VL-8B-Instruct"
    vision_probe_class = QwenProbe  # same ViT layout: fused qkv, vision RoPE, cu_seqlens, 2x2 merger
    injects_visual_features = True

    def run_media(self, inputs: Mapping[str, Any]) -> list[list[int]] | None:
        """A video's frames are timestamped runs: ``timestamped_video_media``."""
        return timestamped_video_media(self, inputs)

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
