"""LLaVA-NeXT / LLaVA-1.6 (``LlavaNextForConditionalGeneration``, Mistral or Vicuna text model).

The ``<image>`` span of an anyres image is: the base crop's patches, then the unpadded crop grid
row by row with one ``image_newline`` embedding after each row. The newline slots are not visual
patches and are never reduction candidates (a method may remove them: ``removable_mask``);
``image_newline_flags`` recomputes where they are from
``image_sizes`` and the grid pinpoints with the same functions transformers' ``pack_image_features``
uses, so the layout cannot drift from the model's.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

import torch

from pact.models.base import ModelAdapter
from pact.models.groups import Group, anyres_groups, runs
from pact.models.llava import ClipProbe


def _scatter_flags(
    input_ids: torch.Tensor, token_id: int, flags: list[torch.Tensor], what: str
) -> torch.Tensor:
    """(B, T) bool: the concatenated per-item ``flags`` written at the ``token_id`` slots, row-major
    over the batch (the order in which the model's ``masked_scatter`` fills them)."""
    slots = input_ids == token_id
    out = torch.zeros_like(slots)
    if not flags:
        return out
    cat = torch.cat(flags).to(input_ids.device)
    n_slots = int(slots.sum())
    if cat.numel() != n_slots:
        raise ValueError(
            f"cannot locate the image-newline slots: the {what} layout gives {cat.numel()} tokens but "
            f"input_ids has {n_slots} {what} tokens (were image_sizes / pixel values passed?)"
        )
    out[slots] = cat
    return out


class LlavaNextAdapter(ModelAdapter):
    family = "llava_next"
    class_names = ("LlavaNextForConditionalGeneration", "LlavaNextModel")
    model_types = ("llava_next",)
    default_checkpoint = "llava-hf/llava-v1.6-mistral-7b-hf"
    vision_probe_class = ClipProbe
    base_and_sub_images = True

    def _module(self) -> Any:
        return sys.modules[type(self.vlm).__module__]

    def _grid_side(self) -> int:
        vc = self.model.config.vision_config
        return int(vc.image_size) // int(vc.patch_size)

    def _image_flags(
        self, image_size: Any, need_patching: bool, vision_aspect_ratio: str | None
    ) -> torch.Tensor:
        """Newline flags (bool, one per feature token) of one image, mirroring pack_image_features."""
        mod = self._module()
        cfg = self.model.config
        side = self._grid_side()
        base = side * side
        crop = int(cfg.vision_config.image_size)
        num_patches = (
            mod.image_size_to_num_patches(image_size, cfg.image_grid_pinpoints, crop) if need_patching else 1
        )
        if num_patches <= 1:
            flags = torch.zeros(base + 1, dtype=torch.bool)
            flags[-1] = True
            return flags
        nph, npw = mod.get_anyres_image_grid_shape(image_size, cfg.image_grid_pinpoints, crop)
        # unpad_image only reads the tensor's shape: a zero-channel stand-in gives the unpadded size.
        grid = mod.unpad_image(torch.empty(0, nph * side, npw * side), image_size)
        height, width = int(grid.shape[1]), int(grid.shape[2])
        if vision_aspect_ratio is not None:
            max_num_patches = int(vision_aspect_ratio.strip("anyres_max_"))  # noqa: B005 (as transformers)
            ratio = math.sqrt(height * width / (max_num_patches * side**2))
            if ratio > 1.1:
                height, width = int(height // ratio), int(width // ratio)
        rows = torch.zeros(height, width + 1, dtype=torch.bool)
        rows[:, -1] = True
        return torch.cat([torch.zeros(base, dtype=torch.bool), rows.flatten()])

    def _vision_aspect_ratio(self, inputs: Mapping[str, Any]) -> str | None:
        return None  # LLaVA-NeXT does not downscale the crop grid

    def _need_patching(self, inputs: Mapping[str, Any], n_images: int) -> list[bool]:
        return [True] * n_images

    def image_flags(self, input_ids: torch.Tensor, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """One bool vector per image of the batch, in image order: its feature slots (base crop, then
        the unpadded crop grid row by row), True at the image-newline slots.

        From the layout (``image_sizes`` + grid pinpoints) when the call carries ``image_sizes``; in
        ``generate`` transformers encodes the images before the prefill and passes only
        ``mm_encoder_outputs`` (``image_sizes`` is consumed), so the slots are then read from the
        packed features themselves: the rows that are copies of the model's ``image_newline``.
        """
        if not bool((input_ids == self.model.config.image_token_id).any()):
            return []
        sizes = inputs.get("image_sizes")
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
        if sizes is not None:
            sizes = sizes.tolist() if isinstance(sizes, torch.Tensor) else [list(s) for s in sizes]
            need = self._need_patching(inputs, len(sizes))
            aspect = self._vision_aspect_ratio(inputs)
            return [self._image_flags(s, p, aspect) for s, p in zip(sizes, need, strict=True)]
        if encoded is not None:
            newline = self.vlm.image_newline
            return [(f == newline.to(f)).all(-1).cpu() for f in encoded.pooler_output]
        raise ValueError(
            f"{type(self.model).__name__}: image tokens without image_sizes or encoded image features; "
            "pact needs one of them to locate the image-newline slots"
        )

    def newline_mask(self, input_ids: torch.Tensor, inputs: Mapping[str, Any]) -> torch.Tensor:
        """(B, T) bool: True at the image-newline slots inside the visual spans (see ``image_flags``)."""
        out = torch.zeros_like(input_ids, dtype=torch.bool)
        flags = self.image_flags(input_ids, inputs)
        if not flags:
            return out
        return out | _scatter_flags(input_ids, self.model.config.image_token_id, flags, "image")

    def candidate_mask(self, input_ids: torch.Tensor, inputs: Mapping[str, Any]) -> torch.Tensor:
        return super().candidate_mask(input_ids, inputs) & ~self.newline_mask(input_ids, inputs)

    def removable_mask(self, input_ids: torch.Tensor, inputs: Mapping[str, Any]) -> torch.Tensor:
        """The image-newline slots (``newline_mask``; LLaVA-OneVision: its video newline too): HiRED's
        official code builds its sequence without them (``image_newline=None``)."""
        return self.newline_mask(input_ids, inputs)

    def visual_groups(self, input_ids: torch.Tensor, inputs: Mapping[str, Any]) -> list[list[Group]]:
        """Per sample: each image's base crop (side x side), then its unpadded crop grid (rows x cols;
        the newline slot after each row is not a visual token), read from ``image_flags``; each
        OneVision video: per frame a ceil(side/2)^2 grid."""
        cfg = self.model.config
        side = self._grid_side()
        flags = self.image_flags(input_ids, inputs)
        image_id = cfg.image_token_id
        video_id = getattr(cfg, "video_token_id", None)
        per_sample: list[list[Group]] = []
        k = 0  # next image (images fill the batch's image slots in row-major order)
        frames = 0
        if video_id is not None and bool((input_ids == video_id).any()):
            videos = inputs.get("pixel_values_videos")
            if videos is not None:
                frames = int(videos.shape[1])
            else:
                encoded = (inputs.get("mm_encoder_outputs") or {}).get("video")
                pooled = math.ceil(side / 2) ** 2
                frames = (int(encoded.pooler_output.shape[1]) - 1) // pooled
        for row in input_ids:
            groups: list[Group] = []
            start = 0
            image = 0
            # walk the visual runs in sequence order: each image run is a whole number of images
            kinds = (row == image_id).long()
            if video_id is not None:
                kinds = kinds + 2 * (row == video_id).long()
            spans = sorted(
                [(a, n, 1) for a, n in runs(kinds == 1)] + [(a, n, 2) for a, n in runs(kinds == 2)]
            )
            for _, length, kind in spans:
                if kind == 1:
                    used = 0
                    while used < length:
                        f = flags[k]
                        new, start = anyres_groups(f, side * side, image, start)
                        groups += new
                        used += int(f.numel())
                        k += 1
                        image += 1
                else:
                    pooled_side = math.ceil(side / 2)
                    per_video = frames * pooled_side**2 + 1
                    for _ in range(length // per_video):
                        for _f in range(frames):
                            groups.append(Group(image, "frame", start, pooled_side, pooled_side))
                            start += pooled_side**2
                        image += 1
            per_sample.append(groups)
        return per_sample
