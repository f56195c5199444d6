"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``, Qwen2 text model).

Image spans are laid out like LLaVA-NeXT (base crop, then the unpadded grid with a newline after each
row, the grid bilinearly shrunk beyond ``anyres_max_N``); an image of a multi-image sample is one
crop followed by one newline. A video span is all frames' pooled patches followed by one newline.
Newline slots are never reduction candidates (a method may remove them: ``removable_mask``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from pact.models.llava import ClipProbe
from pact.models.llava_next import LlavaNextAdapter, _scatter_flags


class SiglipProbe(ClipProbe):
    """SigLIP (no [CLS]); OneVision videos add the pooled view of each frame's rows."""

    has_cls = False

    def views(self, rows: torch.Tensor, values: dict[str, torch.Tensor], segments: list[int]) -> list[tuple]:
        # OneVision videos: the projector rows of each frame are bilinearly pooled (apply_pooling).
        per = segments[0] if segments else 0
        side = int(self.config.vision_config.image_size) // int(self.config.vision_config.patch_size)
        if not segments or per != side * side or any(s != per for s in segments):
            return []
        b = len(segments)
        pooled_rows = self.vlm.apply_pooling(rows.view(b, per, -1)).flatten(0, 1)
        pooled = {
            k: self.vlm.apply_pooling(v.view(b, per, -1).float()).flatten(0, 1) for k, v in values.items()
        }
        return [(pooled_rows, pooled)]


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    class_names = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
    model_types = ("llava_onevision",)
    has_video = True
    default_checkpoint = "llava-hf/llava-onevision-qwen2-7b-ov-hf"
    vision_probe_class = SiglipProbe

    def _vision_aspect_ratio(self, inputs: Mapping[str, Any]) -> str | None:
        return inputs.get("vision_aspect_ratio") or getattr(
            self.model.config, "vision_aspect_ratio", "anyres_max_9"
        )

    def _need_patching(self, inputs: Mapping[str, Any], n_images: int) -> list[bool]:
        # get_image_features: a sample with several images uses one crop per image.
        counts = inputs.get("batch_num_images")
        if counts is None:
            return [True] * n_images
        counts = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
        return [n == 1 for n in counts for _ in range(n)]

    def newline_mask(self, input_ids: torch.Tensor, inputs: Mapping[str, Any]) -> torch.Tensor:
        out = super().newline_mask(input_ids, inputs)
        video_id = self.model.config.video_token_id
        if not bool((input_ids == video_id).any()):
            return out
        videos = inputs.get("pixel_values_videos")
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("video")
        if videos is not None:
            side = self._grid_side()
            per_video = int(videos.shape[1]) * math.ceil(side / 2) ** 2 + 1  # apply_pooling: ceil halves
            n_videos = int(videos.shape[0])
        elif encoded is not None:
            per_video, n_videos = int(encoded.pooler_output.shape[1]), int(encoded.pooler_output.shape[0])
        else:
            raise ValueError(
                "LlavaOnevision: video tokens without pixel_values_videos or encoded video features; pact "
                "needs one of them to locate the video newline slots"
            )
        one = torch.zeros(per_video, dtype=torch.bool)
        one[-1] = True  # get_video_features appends one newline after each video's frames
        return out | _scatter_flags(input_ids, video_id, [one] * n_videos, "video")
