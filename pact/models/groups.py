"""Where each visual token of a sample sits in its image: the grids behind the LLM's visual tokens.

Spatial methods (pooling, HiRED's sub-image budgets, PruMerge's per-image merges) need, for one
sample, its visual tokens split into row-major grids ("groups"): an image, a LLaVA-NeXT/-OneVision
base crop or unpadded crop grid, a video frame, an InternVL tile. Each adapter derives them
(``ModelAdapter.visual_groups`` from ``input_ids`` and the call's inputs, or, for M-RoPE families,
``ModelAdapter.position_groups`` from the tokens' (t, h, w) positions); this module holds the
family-independent pieces, with no transformers import.

``sample_groups`` is what ``Signals.groups()`` returns: computed once per prefill and cached in the
call's context.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Group",
    "anyres_groups",
    "media_by_delimiters",
    "media_by_video_sizes",
    "mrope_groups",
    "runs",
    "sample_groups",
    "square_groups",
]


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


def runs(flags: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of the runs of True in a 1-D bool tensor (a loop over runs, not tokens)."""
    x = flags.long()
    edges = torch.diff(torch.cat([x.new_zeros(1), x, x.new_zeros(1)]))
    starts = (edges == 1).nonzero().flatten().tolist()
    stops = (edges == -1).nonzero().flatten().tolist()
    return [(a, b - a) for a, b in zip(starts, stops, strict=True)]


def square_groups(run_lengths: list[int], per_image: int, kind: str) -> list[Group]:
    """Groups of runs of visual tokens made of whole ``per_image``-token square grids.

    ``kind="image"``: each grid is one image (LLaVA-1.5); otherwise (``"tile"``, InternVL) the grids
    of one run are the tiles of one image.
    """
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


def mrope_groups(
    positions: torch.Tensor, visual_mask: torch.Tensor, media: list[int] | None = None
) -> list[Group]:
    """Groups from M-RoPE positions (3, T) of one sample's valid tokens.

    Each run of visual tokens spans, by its (h, w) positions, a rows x cols grid, and holds whole
    frames of rows * cols tokens (frame by frame: the temporal index alone cannot split them,
    Qwen2.5-VL scales it by time and frames can share one value).

    Args:
        positions: (3, T) the (t, h, w) ids; visual_mask: (T,) bool, the visual tokens.
        media: for each run of visual tokens (in token order), the index of the image or video it
            belongs to (``ModelAdapter.run_media``): consecutive runs with one index are the frames
            of one video whose frames are separate runs (Qwen3-VL's timestamps between frames).
            None: every run is one image or one video (Qwen2-VL).
    Returns:
        The grids in token order; an image or video of several frames gives one "frame" group per
        frame (``image`` = its media index), otherwise one "image" group.
    """
    spans = runs(visual_mask)
    if media is None:
        media = list(range(len(spans)))
    if len(media) != len(spans):
        raise ValueError(f"{len(media)} media indices for {len(spans)} runs of visual tokens")
    if media and (media[0] != 0 or any(b - a not in (0, 1) for a, b in itertools.pairwise(media))):
        raise ValueError(f"media indices of the visual runs must count up from 0 in token order, got {media}")
    grids: list[tuple[int, int, int, int]] = []  # (media, rows, cols, frames) per run
    for index, (a, length) in zip(media, spans, strict=True):
        h, w = positions[1, a : a + length], positions[2, a : a + length]
        rows = int(h.max() - h.min()) + 1
        cols = int(w.max() - w.min()) + 1
        if length % (rows * cols):
            raise ValueError("the visual tokens' M-RoPE positions do not form whole grids")
        grids.append((index, rows, cols, length // (rows * cols)))
    frames_of: dict[int, int] = {}
    for index, _, _, frames in grids:
        frames_of[index] = frames_of.get(index, 0) + frames
    groups: list[Group] = []
    start = 0
    for index, rows, cols, frames in grids:
        kind = "frame" if frames_of[index] > 1 else "image"
        for _ in range(frames):
            groups.append(Group(index, kind, start, rows, cols))
            start += rows * cols
    return groups


def media_by_video_sizes(
    run_lengths: list[list[int]], run_is_video: list[list[bool]], video_sizes: list[int]
) -> list[list[int]]:
    """Which runs of visual tokens form one video when every frame is its own run (Qwen3-VL and
    Qwen3.5: a timestamp before each frame), from each video's token count.

    Args:
        run_lengths: per sample, the length of each run of visual tokens, in token order.
        run_is_video: per sample, whether each run holds video tokens (else an image).
        video_sizes: the tokens of every video of the batch, in batch order (sample 0's videos
            first, each sample's in token order), as the model's ``video_grid_thw`` counts them.
    Returns:
        Per sample, the media index of each run (``mrope_groups``'s ``media``): an image run its
        own index, the consecutive runs of one video one shared index.
    Raises:
        ValueError: the runs do not add up to the videos' sizes (a frame split across two videos,
            a video interrupted by an image or split between samples, too few or too many videos).
    """
    sizes = iter(video_sizes)
    out: list[list[int]] = []
    for sample, (lengths, is_video) in enumerate(zip(run_lengths, run_is_video, strict=True)):
        media: list[int] = []
        left = 0  # tokens of the current video not yet seen
        for length, video in zip(lengths, is_video, strict=True):
            if video and left:
                media.append(media[-1])
            else:
                if left:
                    raise ValueError(f"sample {sample}: an image run inside a video ({left} tokens left)")
                media.append(media[-1] + 1 if media else 0)
                left = next(sizes, 0) if video else 0
                if video and not left:
                    raise ValueError(f"sample {sample}: more video runs than the {len(video_sizes)} videos")
            if video:
                left -= length
                if left < 0:
                    raise ValueError(f"sample {sample}: a run of {length} video tokens overruns its video")
        if left:
            raise ValueError(f"sample {sample}: its last video lacks {left} tokens (split between samples?)")
        out.append(media)
    rest = sum(1 for _ in sizes)
    if rest:
        raise ValueError(f"{rest} of the {len(video_sizes)} videos given have no visual tokens in the batch")
    return out


def media_by_delimiters(
    run_starts: list[list[int]], video_number: torch.Tensor, inside_video: torch.Tensor
) -> list[list[int]]:
    """Which runs of visual tokens form one video when every frame is its own run between the
    video's begin/end tokens (GLM-4.1V: ``<|begin_of_video|>`` ... ``<|end_of_video|>``).

    Args:
        run_starts: per sample, the first token index of each run of visual tokens.
        video_number: (B, T) long, how many video begin tokens precede or are at each token.
        inside_video: (B, T) bool, the token lies between a video's begin and end tokens.
    Returns:
        Per sample, the media index of each run, as ``media_by_video_sizes``.
    """
    out: list[list[int]] = []
    for b, starts in enumerate(run_starts):
        media: list[int] = []
        previous = None  # the video number of the previous run, None for an image
        for a in starts:
            video = int(video_number[b, a]) if bool(inside_video[b, a]) else None
            same = video is not None and video == previous
            media.append(media[-1] if same else (media[-1] + 1 if media else 0))
            previous = video
        out.append(media)
    return out


def anyres_groups(flags: torch.Tensor, base: int, image: int, start: int) -> tuple[list[Group], int]:
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


_CACHE_KEY = "pact.layout.groups"
_MEDIA_KEY = "pact.layout.run_media"


def sample_groups(
    adapter: Any,
    *,
    sample: int,
    inputs: Mapping[str, Any],
    positions: torch.Tensor,
    visual_mask: torch.Tensor,
    visual_index: torch.Tensor,
    cache: dict[str, Any],
) -> list[Group]:
    """The grids of one sample's ORIGINAL visual tokens (``visual_index`` maps the current ones).

    Args:
        adapter: the model's ``pact.models`` adapter.
        sample: index of the sample in the batch; inputs: the keyword arguments of the prefill call.
        positions: (A, T) rotary positions of the sample's valid tokens; visual_mask: (T,) bool.
        visual_index: (N,) original visual index of each current visual token.
        cache: per-call dict where the batch's groups are kept (``Signals.context``).
    Raises:
        ValueError: a layout that cannot be derived (the message names the family).
    """
    num_visual = int(visual_index.numel())
    if adapter.mrope:
        if num_visual != int(visual_mask.sum()) or not torch.equal(
            visual_index, torch.arange(num_visual, device=visual_index.device)
        ):
            raise ValueError("grid layouts are only available before any visual token was removed")
        if _MEDIA_KEY not in cache:
            cache[_MEDIA_KEY] = adapter.run_media(inputs)
        media = cache[_MEDIA_KEY]
        return adapter.position_groups(positions, visual_mask, None if media is None else media[sample])
    if _CACHE_KEY not in cache:
        cache[_CACHE_KEY] = adapter.visual_groups(inputs["input_ids"], inputs)
    groups = cache[_CACHE_KEY][sample]
    total = sum(g.size for g in groups)
    if num_visual and total <= int(visual_index.max()):
        raise ValueError(
            f"{adapter.family}: the visual token layout covers {total} tokens, fewer than the sample's"
        )
    return groups
