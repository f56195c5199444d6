"""SmolVLM / SmolVLM2 (``SmolVLMForConditionalGeneration``): Llama-style text decoder, SigLIP-style tower
without [CLS], pixel shuffle, image splitting.

An image larger than ``max_image_size`` is split into rows x cols square sub-images plus a global
(downscaled whole) image; each is encoded alone and pixel-shuffled (``scale_factor`` x
``scale_factor`` patches -> one row, row-major) into ``image_seq_len`` ``<image>`` tokens. The
processor writes, per sub-image, ``<fake_token_around_image><row_i_col_j>`` then its tokens, a
newline after each row of sub-images, then ``\\n<fake_token_around_image><global-img>`` + the
global image's tokens + ``<fake_token_around_image>``. A video is a sequence of frames, each laid
out like an unsplit image (``<global-img>`` + its tokens) after a "Frame from MM:SS:" text. Only
``<image>`` tokens carry vision features: the wrapper tokens are text and never reduction
candidates (``candidate_mask`` is the ``image_token_id`` mask of the base adapter).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pact.models.base import ModelAdapter
from pact.models.groups import Group, runs
from pact.models.vision_probe import VisionProbe


class SmolVLMProbe(VisionProbe):
    """The SmolVLM vision transformer (SigLIP, no [CLS]): the connector's pixel shuffle turns
    ``scale_factor`` x ``scale_factor`` patches into one LLM row, then ``modality_projection``."""

    has_cls = False

    def layers(self) -> nn.ModuleList:
        return self.vlm.vision_model.encoder.layers

    def attention(self, layer: int) -> nn.Module:
        return self.layers()[layer].self_attn

    def select_layer(self) -> int:
        return len(self.layers()) - 1  # the connector reads the last layer (after post_layernorm)

    def rows_module(self) -> nn.Module:
        # Its input is the pixel-shuffled rows (N, R, s^2 * C), its output the LLM rows (N, R, D).
        return self.vlm.connector.modality_projection

    def to_rows(self, values: torch.Tensor, segments: list[int]) -> torch.Tensor:
        """Per-patch values (S_total, C) -> per-row values: the mean over the patches the model's
        own ``pixel_shuffle`` concatenates into each row."""
        x = torch.stack(torch.split(values, segments))  # (N, P, C): every sub-image has P patches
        n, _, c = x.shape
        scale = int(self.config.scale_factor)
        shuffled = self.vlm.connector.pixel_shuffle(x, scale)  # (N, P / s^2, s^2 * C)
        return shuffled.reshape(n, -1, scale * scale, c).mean(2).flatten(0, 1)


class SmolVLMAdapter(ModelAdapter):
    family = "smolvlm"
    class_names = ("SmolVLMForConditionalGeneration", "SmolVLMModel")
    model_types = ("smolvlm",)
    has_video = True
    video_frames_as_images = True  # each frame is an image grid of its own: no frame layout for EVS/HoliTom
    default_checkpoint = "HuggingFaceTB/SmolVLM2-2.2B-Instruct"
    vision_probe_class = SmolVLMProbe

    @property
    def text_model(self) -> nn.Module:
        return self.vlm.text_model

    def vision_tower(self) -> nn.Module:
        return self.vlm.vision_model

    def _tokens_per_image(self) -> int:
        vision = self.model.config.vision_config
        side = int(vision.image_size) // int(vision.patch_size) // int(self.model.config.scale_factor)
        return side * side

    def visual_groups(self, input_ids: torch.Tensor, inputs: Mapping[str, Any]) -> list[list[Group]]:
        """Per sample: each run of ``<image>`` tokens is one square grid (wrapper tokens separate
        every sub-image). A run right after the ``<global-img>`` token is a global image and closes
        its image: the sub-images before it ("tile") and it ("base") share one image index; an image
        or video frame that was not split is one "image" grid.

        The ``<global-img>`` id is read from the sequence (the token before the sample's last run:
        every image and frame ends with a global run), so no tokenizer is needed.
        """
        per_image = self._tokens_per_image()
        side = math.isqrt(per_image)
        image_id = int(self.model.config.image_token_id)
        out: list[list[Group]] = []
        for row in input_ids:
            spans = runs(row == image_id)
            groups: list[Group] = []
            if not spans:
                out.append(groups)
                continue
            global_id = int(row[spans[-1][0] - 1]) if spans[-1][0] > 0 else -1
            start, image, tiles = 0, 0, 0
            for a, length in spans:
                if length != per_image:
                    raise ValueError(
                        f"smolvlm: a run of {length} <image> tokens; each sub-image or global image has "
                        f"{per_image} (image_size / patch_size / scale_factor squared)"
                    )
                is_global = a > 0 and int(row[a - 1]) == global_id
                kind = "tile" if not is_global else ("base" if tiles else "image")
                groups.append(Group(image, kind, start, side, side))
                start += length
                if is_global:
                    image, tiles = image + 1, 0
                else:
                    tiles += 1
            out.append(groups)
        return out
