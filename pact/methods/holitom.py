"""HoliTom (Shao et al., NeurIPS 2025, "Holistic Token Merging for Fast Video Large Language
Models"; official code cokeshao/HoliTom on LLaVA-OneVision / LLaVA-Video): outer-LLM temporal
segmentation and spatio-temporal merging of each video, plus an inner-LLM merge at one layer.

Outer part (before decoder layer ``cfg.layer``, 0 in configs/holitom.json), per video of the sample
(the "frame" groups of one video index of ``Signals.groups()``, ``pact.methods.evs.video_runs``;
images are left untouched, as the official code only touches videos), by
``pact.ops.video.holitom_video``. On Qwen3-VL / Qwen3.5 / GLM-4.1V a text timestamp lies between
frames: the video's visual tokens are still consecutive among the visual tokens, every output token
sits at a visual slot of its own frame (a merged static token at its center in the window's first
frame, with the center's (t, h, w) ids), so the reordering within a window never moves a token past
a timestamp, and the timestamps stay:

1. frames are segmented by the cosine similarity of each token with the same position in the next
   frame (threshold ``holitom_tau``; dynamic programming maximising the tokens saved);
2. in a window of several frames, the positions static over the whole window are averaged over its
   frames and clustered by DPC-KNN (``holitom_k`` neighbours), each center blended with its
   members' mean (``holitom_beta``);
3. every frame keeps ``ceil(S_dyn * r)`` of its dynamic tokens by the vision encoder's attention
   (mean attention each patch receives in the layer feeding the projector, pooled like the
   features: what the official modified SigLIP returns); ``holitom_dominant_share`` D > 0 replaces
   a share by DPC-KNN contextual tokens, as the official option;
4. the retain ratio r is ``holitom_retain_ratio`` raised by the static savings; the output order is
   the official one (each window: its static tokens, then each frame's tokens), with
   ``position_mode: "renumber"`` (the tokens are removed before the LLM: contiguous positions on
   LLaVA-OneVision).

Inner part (``holitom_inner_layer`` k, default 18 as the official HOLITOM_k; null: "HoliTom (w/o
M)"): at layer k, the last token's head-mean attention at layer k - 1 (recomputed from that layer's
post-RoPE q/k, float32) keeps ``round(N (1 - holitom_inner_ratio))`` visual tokens; every other one
is averaged, in ascending order, into its most similar kept token (cosine of the hidden states
entering layer k): ``h <- (h + h_other) / 2`` (``pact.ops.video.sequential_pair_merge``).

Budget (``target_tokens`` / ``target_ratio``): the videos share the sample's budget minus its image
tokens (as EVS), which sets r per video (``K_video / N_video``); HoliTom's own rounding makes the
count approximate. The inner merge reduces further at layer k (it is not part of the budget).
"""

from __future__ import annotations

from typing import Any

import torch

from pact.methods.base import CLUSTERING, Signals, declare, register
from pact.methods.budget import target_count
from pact.methods.evs import video_runs
from pact.methods.layer_inputs import LayerInputs
from pact.methods.layout import full_grids
from pact.methods.vision import VisionMethod
from pact.ops.reduction import Reduction
from pact.ops.scoring import fastv_scores, topk_indices
from pact.ops.video import holitom_video, sequential_pair_merge

declare(
    CLUSTERING,
    "holitom",
    "whole method",
    "HoliTom: temporal segmentation + static/dynamic video token merging, then inner-LLM merging",
)


def _reduction_from_plan(
    n: int,
    sizes: torch.Tensor,
    hidden: torch.Tensor,
    placed: torch.Tensor,
    placed_hidden: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor | None = None,
) -> Reduction:
    """A Reduction whose output tokens sit at the visual indices ``placed`` (in placement order).

    Args:
        n: visual tokens. sizes: (N,) current sizes. hidden: (N, D) current hidden states (dtype).
        placed: (R,) distinct visual indices, in the order the tokens are placed.
        placed_hidden: (R, D) float32 their new hidden states. labels: (N,) index into ``placed`` of
            each token's output token, -1 dropped.
    """
    dev = placed.device
    kept, by_index = torch.sort(placed)
    slot = torch.empty_like(by_index)
    slot[by_index] = torch.arange(by_index.numel(), device=dev)  # placed[i] == kept[slot[i]]
    new_labels = torch.where(labels >= 0, slot[labels.clamp(min=0)], torch.full_like(labels, -1))
    new_sizes = torch.zeros(kept.numel(), dtype=torch.float32, device=dev)
    keep = new_labels >= 0
    new_sizes.index_add_(0, new_labels[keep], sizes[keep].float())
    order = slot if bool((slot != torch.arange(slot.numel(), device=dev)).any()) else None
    return Reduction(
        kept=kept,
        sizes=new_sizes,
        hidden=placed_hidden[by_index].to(hidden.dtype),
        labels=new_labels,
        scores=scores,
        order=order,
    )


@register("none", "holitom")
class HoliTom(VisionMethod):
    """HoliTom's outer-LLM video merging (+ its inner-LLM merge at ``holitom_inner_layer``)."""

    name = "holitom"
    needs_merge = True  # merged tokens have sizes > 1 (proportional attention, if asked for, matters)
    inputs = "video"
    """The kind of visual input the method reduces (tests feed such configs videos)."""
    why_not = (
        "HoliTom merges the frames of videos: the family takes no videos, or its video frames reach the "
        "language model as images that nothing in the call tells apart from images"
    )

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.layer_inputs = LayerInputs(self.name)  # layer k - 1's input for the inner merge (install)

    @classmethod
    def supports(cls, adapter: Any) -> bool:
        return super().supports(adapter) and adapter.has_video and not adapter.video_frames_as_images

    def layers(self, num_layers: int) -> list[int]:
        first = int(self.config.layer)
        inner = self.config.holitom_inner_layer
        for key, value in (("layer", first), ("holitom_inner_layer", inner)):
            if value is not None and value >= num_layers:
                raise ValueError(
                    f"{key}={value} but the model has only {num_layers} decoder layers: use a layer in "
                    f"[0, {num_layers - 1}]"
                )
        return [first] if inner is None else [first, int(inner)]

    def install(self, model: Any, adapter: Any) -> list[Any]:
        """The vision capture hooks, and for the inner merge a pre-hook on decoder layer k - 1 that
        keeps the (reduced) hidden states and rotary tables that layer receives: ``Signals`` only
        gives earlier layers' inputs from before the first reduction, and the official inner merge
        reads layer k - 1 after the outer one. Registered after the engine's own pre-hook, so it
        sees exactly what the layer gets."""
        handles = super().install(model, adapter)
        inner = self.config.holitom_inner_layer
        layers = [int(inner) - 1] if inner is not None and inner - 1 < len(adapter.layers) else []
        return handles + self.layer_inputs.attach(adapter, layers)

    def finish(self, context: dict[str, Any]) -> None:
        self.layer_inputs.clear()

    def reduce(self, signals: Signals) -> Reduction:
        if signals.layer == int(self.config.layer):
            return self.outer(signals)
        return self.inner(signals)

    def retain_ratios(self, n: int, video_sizes: list[int]) -> list[float]:
        """r of each video: ``holitom_retain_ratio``, or the videos' share of the budget."""
        budget = target_count(self.config, n)
        if budget is None:
            return [float(self.config.holitom_retain_ratio)] * len(video_sizes)
        video_total = sum(video_sizes)
        rest = max(0, budget - (n - video_total))  # images keep all their tokens
        return [min(1.0, rest / video_total)] * len(video_sizes)

    def outer(self, signals: Signals) -> Reduction:
        cfg = self.config
        n = signals.num_visual
        groups = full_grids(signals, "holitom needs the full frame grids for its outer merge")
        hidden = signals.hidden[signals.visual_mask]
        dev = hidden.device
        videos = video_runs(groups)
        attention = self.token_signals(signals)["attn"][:, 0].float() if videos else None
        scores = attention if attention is not None else torch.zeros(n, device=dev)
        ratios = self.retain_ratios(n, [len(v) * v[0].size for v in videos])
        # Output tokens in placement order: tokens outside videos stay as they are; each video's
        # output tokens fill its span in HoliTom's order.
        placed: list[torch.Tensor] = []
        new_hidden: list[torch.Tensor] = []
        labels = torch.full((n,), -1, dtype=torch.long, device=dev)
        position, cursor = 0, 0

        def keep_as_is(a: int, b: int) -> None:
            nonlocal position
            run = torch.arange(a, b, device=dev)
            placed.append(run)
            new_hidden.append(hidden[a:b].float())
            labels[a:b] = torch.arange(position, position + b - a, device=dev)
            position += b - a

        for frames, ratio in zip(videos, ratios, strict=True):  # a loop over videos, not tokens
            start, per_frame = frames[0].start, frames[0].size
            stop = start + per_frame * len(frames)
            keep_as_is(cursor, start)
            plan = holitom_video(
                hidden[start:stop].reshape(len(frames), per_frame, -1),
                attention[start:stop].reshape(len(frames), per_frame),
                retain_ratio=ratio,
                tau=float(cfg.holitom_tau),
                beta=float(cfg.holitom_beta),
                k=int(cfg.holitom_k),
                dominant_share=float(cfg.holitom_dominant_share),
            )
            placed.append(plan.placed + start)
            new_hidden.append(plan.hidden)
            labels[start:stop] = torch.where(plan.labels >= 0, plan.labels + position, -1)
            position += plan.placed.numel()
            cursor = stop
        keep_as_is(cursor, n)
        return _reduction_from_plan(
            n, signals.sizes, hidden, torch.cat(placed), torch.cat(new_hidden), labels, scores
        )

    def inner_attention(self, signals: Signals) -> torch.Tensor:
        """float32 (N,): head-mean attention of the sample's last token over its visual tokens at
        layer k - 1 (post-RoPE q/k of the hidden states that layer received, recomputed exactly as
        the layer computes them, softmax in float32)."""
        q, k = self.layer_inputs.queries_keys(signals, signals.layer - 1)
        scale = signals.attention_scale(signals.layer - 1)
        # layer k - 1 ran on these tokens (nothing is reduced between it and layer k): its own mask
        visibility = signals.attention_visibility(signals.layer - 1)
        return fastv_scores(q, k, signals.visual_mask, variant="original", scale=scale, visibility=visibility)

    def inner(self, signals: Signals) -> Reduction:
        n = signals.num_visual
        attn = self.inner_attention(signals)
        keep = topk_indices(attn, round(n * (1 - float(self.config.holitom_inner_ratio))))
        rest = torch.ones(n, dtype=torch.bool, device=attn.device)
        rest[keep] = False
        others = rest.nonzero().squeeze(1)
        hidden = signals.hidden[signals.visual_mask]
        target, merged = sequential_pair_merge(hidden, keep, others)
        labels = torch.empty(n, dtype=torch.long, device=attn.device)
        labels[keep] = torch.arange(keep.numel(), device=attn.device)
        labels[others] = target
        return _reduction_from_plan(n, signals.sizes, hidden, keep, merged, labels, scores=attn)
