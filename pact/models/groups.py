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

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Group", "anyres_groups", "mrope_groups", "runs", "sample_groups", "square_groups"]


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


def mrope_groups(positions: torch.Tensor, visual_mask: torch.Tensor) -> list[Group]:
    """Groups from M-RoPE positions (3, T) of one sample's valid tokens.

    A run of visual tokens is one image or one video; its (h, w) positions span a rows x cols grid,
    and a video run holds whole frames of rows * cols tokens (frame by frame: the temporal index
    alone cannot split them, Qwen2.5-VL scales it by time and frames can share one value).
    """
    groups: list[Group] = []
    start = 0
    for image, (a, length) in enumerate(runs(visual_mask)):
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
        return adapter.position_groups(positions, visual_mask)
    if _CACHE_KEY not in cache:
        cache[_CACHE_KEY] = adapter.visual_groups(inputs["input_ids"], inputs)
    groups = cache[_CACHE_KEY][sample]
    total = sum(g.size for g in groups)
    if num_visual and total <= int(visual_index.max()):
        raise ValueError(
            f"{adapter.family}: the visual token layout covers {total} tokens, fewer than the sample's"
        )
    return groups
