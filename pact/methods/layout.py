"""Where each visual token of a sample sits in its image: the grids behind the LLM's visual tokens.

Spatial methods (pooling, HiRED's sub-image budgets) need, for one sample, its visual tokens split
into row-major grids ("groups"): an image, a LLaVA-NeXT/-OneVision base crop or unpadded crop grid,
a video frame, an InternVL tile. Per family:

* Qwen2-VL / Qwen2.5-VL: from the M-RoPE positions (t, h, w) of the tokens: one group per run of
  consecutive visual tokens and temporal index t; rows/cols from h and w.
* LLaVA-1.5: every ``(image_size / patch_size)^2`` consecutive image tokens are one square image.
* InternVL: every ``image_seq_length`` consecutive tokens are one square tile.
* LLaVA-NeXT / LLaVA-OneVision: per image, the base crop (side x side) then the unpadded crop grid
  (rows x cols, one newline slot after each row, newlines are not visual tokens); OneVision videos:
  per frame a ceil(side/2)^2 grid. Read from the adapter's per-image layout (``image_flags``, the
  one it uses to find the newline slots: ``image_sizes``, or the encoded features in ``generate``).

Everything is computed once per prefill and cached in the call's ``Signals.context``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Group", "sample_groups"]


@dataclass(frozen=True)
class Group:
    """One row-major grid of a sample's visual tokens.

    image: index of the image/video (per sample, in order) the grid belongs to.
    kind: "image", "base", "grid", "frame" or "tile".
    start: index of its first token among the sample's visual tokens; rows * cols tokens follow.
    rows, cols: grid shape.
    """

    image: int
    kind: str
    start: int
    rows: int
    cols: int

    @property
    def size(self) -> int:
        return self.rows * self.cols


def _runs(flags: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of the runs of True in a 1-D bool tensor (a loop over runs, not tokens)."""
    x = flags.long()
    edges = torch.diff(torch.cat([x.new_zeros(1), x, x.new_zeros(1)]))
    starts = (edges == 1).nonzero().flatten().tolist()
    stops = (edges == -1).nonzero().flatten().tolist()
    return [(a, b - a) for a, b in zip(starts, stops, strict=True)]


def _square_groups(run_lengths: list[int], per_image: int, kind: str) -> list[Group]:
    side = math.isqrt(per_image)
    if side * side != per_image:
        raise ValueError(f"cannot lay out {per_image} tokens per {kind} as a square grid")
    groups, start, image = [], 0, 0
    for length in run_lengths:
        if length % per_image:
            raise ValueError(
                f"a run of {length} visual tokens is not a whole number of {per_image}-token {kind}s"
            )
        for _ in range(length // per_image):
            groups.append(Group(image, kind, start, side, side))
            start += per_image
            image += kind == "image"  # LLaVA-1.5: one grid per image; InternVL: the tiles of one run
        image += kind != "image"
    return groups


def _mrope_groups(positions: torch.Tensor, visual_mask: torch.Tensor) -> list[Group]:
    """Groups from M-RoPE positions (3, T) of one sample's valid tokens.

    A run of visual tokens is one image or one video; its (h, w) positions span a rows x cols grid,
    and a video run holds whole frames of rows * cols tokens (frame by frame: the temporal index
    alone cannot split them, Qwen2.5-VL scales it by time and frames can share one value).
    """
    groups: list[Group] = []
    start = 0
    for image, (a, length) in enumerate(_runs(visual_mask)):
        h, w = positions[1, a : a + length], positions[2, a : a + length]
        rows = int(h.max() - h.min()) + 1
        cols = int(w.max() - w.min()) + 1
        if length % (rows * cols):
            raise ValueError("the visual tokens' M-RoPE positions do not form whole grids")
        frames = length // (rows * cols)
        for f in range(frames):
            groups.append(
                Group(image, "frame" if frames > 1 else "image", start + f * rows * cols, rows, cols)
            )
        start += length
    return groups


def _anyres_groups(flags: torch.Tensor, base: int, image: int, start: int) -> tuple[list[Group], int]:
    """Groups of one LLaVA-NeXT/-OneVision image from its newline flags; returns (groups, next start)."""
    side = math.isqrt(base)
    groups = [Group(image, "base", start, side, side)]
    start += base
    rest = flags[base:]
    rows = int(rest.sum())
    patches = int(rest.numel()) - rows
    if rows and patches:
        groups.append(Group(image, "grid", start, rows, patches // rows))
        start += patches
    return groups, start


def _llava_next_layout(adapter: Any, input_ids: torch.Tensor, inputs: dict[str, Any]) -> list[list[Group]]:
    """Per sample groups of LLaVA-NeXT / -OneVision (images, then OneVision videos)."""
    cfg = adapter.model.config
    side = int(cfg.vision_config.image_size) // int(cfg.vision_config.patch_size)
    flags = adapter.image_flags(input_ids, inputs)
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
        runs = sorted([(a, n, 1) for a, n in _runs(kinds == 1)] + [(a, n, 2) for a, n in _runs(kinds == 2)])
        for _, length, kind in runs:
            if kind == 1:
                used = 0
                while used < length:
                    f = flags[k]
                    new, start = _anyres_groups(f, side * side, image, start)
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


def _batch_layout(adapter: Any, inputs: dict[str, Any]) -> list[list[Group]] | None:
    """Per sample groups for the families laid out from input_ids (None for M-RoPE families)."""
    family = adapter.family
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return None
    input_ids = inputs["input_ids"]
    if family in ("llava_next", "llava_onevision"):
        return _llava_next_layout(adapter, input_ids, inputs)
    cfg = adapter.model.config
    if family == "llava":
        side = int(cfg.vision_config.image_size) // int(cfg.vision_config.patch_size)
        per, kind = side * side, "image"
        if getattr(cfg, "vision_feature_select_strategy", "default") == "full":
            raise ValueError("LLaVA with vision_feature_select_strategy='full' (CLS kept) has no square grid")
    elif family == "internvl":
        per, kind = int(cfg.image_seq_length), "tile"
    else:
        raise ValueError(f"no visual token layout for model family {family!r}")
    cand = adapter.candidate_mask(input_ids, inputs)
    return [_square_groups([n for _, n in _runs(row)], per, kind) for row in cand]


def sample_groups(signals: Any) -> list[Group]:
    """The grids of the sample's ORIGINAL visual tokens (``signals.visual_index`` maps the current ones).

    Raises ValueError for a layout that cannot be derived (the message names the family).
    """
    adapter = signals.adapter
    if adapter.family in ("qwen2_vl", "qwen2_5_vl"):
        if signals.num_visual != int(signals.visual_mask.sum()) or not torch.equal(
            signals.visual_index, torch.arange(signals.num_visual, device=signals.visual_index.device)
        ):
            raise ValueError("grid layouts are only available before any visual token was removed")
        return _mrope_groups(signals.positions, signals.visual_mask)
    key = "pact.layout.groups"
    if key not in signals.context:
        signals.context[key] = _batch_layout(adapter, signals.inputs)
    groups = signals.context[key][signals.sample]
    total = sum(g.size for g in groups)
    if signals.num_visual and total <= int(signals.visual_index.max()):
        raise ValueError(
            f"{adapter.family}: the visual token layout covers {total} tokens, fewer than the sample's"
        )
    return groups
