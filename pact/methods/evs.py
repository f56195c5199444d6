"""EVS, Efficient Video Sampling (NVIDIA, arXiv 2510.14624; the pruning vLLM and TensorRT-LLM ship
as ``--video-pruning-rate``): drop the video tokens most similar to the token at the same spatial
position in the previous frame.

The rule, as vLLM's ``vllm/multimodal/evs.py`` computes it per video:

* features: the video embeddings the language model receives (the vision encoder's output after
  the merger/projector), i.e. the hidden states entering decoder layer 0 (``layer: 0``);
* score of a token: ``1 - cos(x[f, s], x[f - 1, s])``; every first-frame token scores 255, so the
  first frame is always kept;
* count: ``max(S, int(F * S * (1 - q)))`` for a video of F frames of S tokens, q =
  ``evs_pruning_rate``;
* selection: the ``count`` highest scores (stable descending sort: ties to the earlier token), kept
  in their original order; positions: the kept video tokens keep their own M-RoPE (t, h, w) ids
  (vLLM's ``compute_mrope_for_media`` sliced by the retention mask); on 1-D RoPE families the
  pruned tokens never reach vLLM's LLM, so positions are contiguous (``position_mode: "renumber"``
  in configs/evs.json gives both; docs/CONFIGDOC.md, "EVS", lists the differences).

A video is the "frame" groups of one video index in ``Signals.groups()`` (``video_runs``; one grid
per LLM frame: a Qwen temporal patch of 2 input frames, a LLaVA-OneVision pooled frame). On
Qwen3-VL / Qwen3.5 / GLM-4.1V each frame is its own run after a timestamp text: the adapter tells
which runs form one video (``ModelAdapter.run_media``, from ``video_grid_thw`` or the video markers),
vLLM's unit too (its ``_postprocess_video_embeds_evs`` prunes each ``video_grid_thw`` item); the
timestamps are text, never removed. Images (and everything else that is not a frame) are left
untouched, as in vLLM, where EVS prunes videos only.

Budget: ``target_tokens``/``target_ratio`` set the sample's total; the images keep all their tokens,
the videos share the rest in proportion to their sizes (one video: exactly the rest), each keeping at
least its first frame. Without a budget each video keeps ``max(S, int(F * S * (1 - q)))``.
"""

from __future__ import annotations

from typing import Any

import torch

from pact.methods.base import PRUNING, Method, Signals, declare, register
from pact.methods.budget import pruned_reduction, target_count
from pact.methods.layout import Group, full_grids
from pact.models import ADAPTERS
from pact.ops.reduction import Reduction
from pact.ops.video import EVS_FIRST_FRAME_SCORE, evs_dissimilarity, evs_keep, evs_retained_count

declare(
    PRUNING,
    "evs",
    "whole method",
    "EVS: drop video tokens most similar to the same position in the previous frame (vLLM's rule)",
)


def video_runs(groups: list[Group]) -> list[list[Group]]:
    """The videos of a sample: its "frame" groups gathered by video (their ``image`` index), in token
    order. Every other group (images, crops, tiles) is not a video.

    A video's frames are consecutive among the sample's visual tokens (``Group.start`` counts visual
    tokens only), whether they are one run of visual tokens (Qwen2-VL, LLaVA-OneVision) or separate
    runs with text between them (Qwen3-VL / Qwen3.5 timestamps, GLM-4.1V frame markers): the adapter
    says which runs form one video (``ModelAdapter.run_media``), never their contiguity in the
    sequence.

    Args:
        groups: the sample's groups in token order (``Signals.groups()``).
    Returns:
        One list of frame groups per video, in token order.
    Raises:
        ValueError: the frames of one video differ in grid shape or are not consecutive visual tokens.
    """
    videos: list[list[Group]] = []
    for g in groups:
        if g.kind != "frame":
            continue
        last = videos[-1][-1] if videos else None
        if last is None or last.image != g.image:
            videos.append([g])
            continue
        if (last.rows, last.cols) != (g.rows, g.cols) or last.start + last.size != g.start:
            raise ValueError(
                f"the frames of video {g.image} are not consecutive grids of one shape: "
                f"{last.rows} x {last.cols} at {last.start}, then {g.rows} x {g.cols} at {g.start}"
            )
        videos[-1].append(g)
    return videos


def video_keep_counts(cfg: Any, n: int, video_sizes: list[tuple[int, int]]) -> list[int]:
    """Tokens each video of a sample keeps.

    Args:
        cfg: the PactConfig (``evs_pruning_rate``, ``target_tokens``, ``target_ratio``).
        n: the sample's visual tokens (images included).
        video_sizes: (frames F, tokens per frame S) of each video.
    Returns:
        One count per video, each in [S, F * S].
    """
    budget = target_count(cfg, n)
    if budget is None:
        rate = float(cfg.evs_pruning_rate)
        return [evs_retained_count(s, f, rate) for f, s in video_sizes]
    video_total = sum(f * s for f, s in video_sizes)
    rest = max(0, budget - (n - video_total))  # images keep all their tokens
    # proportional shares (integer arithmetic, so one video gets exactly `rest`), first frame at least
    return [max(s, min(f * s, (f * s * rest) // video_total)) for f, s in video_sizes]


@register("evs", "none")
class EVS(Method):
    """Efficient Video Sampling on the video tokens of every sample (images untouched)."""

    name = "evs"
    needs_merge = False
    # Frames that nothing tells apart from images (InternVL, SmolVLM2: video_frames_as_images): refused.
    families = tuple(f for f, a in ADAPTERS.items() if a.has_video and not a.video_frames_as_images)
    inputs = "video"
    """The kind of visual input the method reduces (tests feed such configs videos)."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        if getattr(config, "progressive", False):
            raise ValueError("evs prunes each video once: set progressive=false")

    def install(self, model: Any, adapter: Any) -> list[Any]:
        if adapter.family not in self.families:
            why = (
                "its video frames reach the language model as images that nothing in the call tells "
                "apart from images, so the frames of one video cannot be found"
                if adapter.has_video
                else "the family takes no videos"
            )
            raise ValueError(
                f"evs does not support the {adapter.family!r} model family: {why} "
                f"(supported: {', '.join(self.families)})"
            )
        return []

    def reduce(self, signals: Signals) -> Reduction:
        n = signals.num_visual
        groups = full_grids(signals, "evs needs the full frame grids")
        dev = signals.hidden.device
        features = signals.hidden[signals.visual_mask]
        keep = torch.ones(n, dtype=torch.bool, device=dev)
        scores = torch.full((n,), EVS_FIRST_FRAME_SCORE, dtype=torch.float32, device=dev)
        videos = video_runs(groups)
        counts = video_keep_counts(self.config, n, [(len(v), v[0].size) for v in videos])
        for frames, count in zip(videos, counts, strict=True):  # a loop over videos, not tokens
            start, per_frame = frames[0].start, frames[0].size
            stop = start + per_frame * len(frames)
            video_scores = evs_dissimilarity(features[start:stop].reshape(len(frames), per_frame, -1))
            kept = evs_keep(video_scores, count)
            keep[start:stop] = False
            keep[start + kept] = True
            scores[start:stop] = video_scores.reshape(-1)
        return pruned_reduction(keep.nonzero().squeeze(1), n, signals.sizes, scores)
