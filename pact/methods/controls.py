"""Simple controls that recent benchmarks find hard to beat: random pruning, norm pruning and
spatial pooling.

* ``random`` pruning keeps a uniformly random subset of ``int(N * keep_ratio)`` visual tokens (or the
  budget). The draw depends only on ``random_seed``, the layer and N -- not on the sample's place in
  the batch -- so a batch gives the same tokens as its samples run one by one.
* ``norm`` pruning (the reference's ``prune_with_norm``) keeps the tokens whose layer-L input hidden
  state has the largest p-norm (p = ``norm_order``).
* ``pooling`` clustering averages every ``pooling_stride`` x ``pooling_stride`` window of each image
  grid (see ``pact.methods.layout``) into one token of size = window size, placed at the window's
  central token (its position id). With a budget, the stride is the smallest integer whose token
  count is closest to the target (on a tie, the count not above it).
"""

from __future__ import annotations

from typing import Any

import torch

from pact.methods.base import CLUSTERING, PRUNING, Method, Signals, declare, register
from pact.methods.budget import cluster_reduction, pruned_reduction, select_by_scores, target_count
from pact.methods.layout import Group, full_grids
from pact.ops.pooling import grid_pool
from pact.ops.reduction import Reduction
from pact.ops.scoring import norm_scores, random_scores


def random_token_scores(signals: Signals) -> torch.Tensor:
    """float32 (N,) uniform scores from a CPU generator seeded by (random_seed, layer)."""
    seed = int(signals.config.random_seed) * 1_000_003 + int(signals.layer)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return random_scores(signals.num_visual, generator=gen).to(signals.hidden.device)


def norm_token_scores(signals: Signals) -> torch.Tensor:
    """float32 (N,) p-norms of the visual tokens' hidden states entering the layer."""
    return norm_scores(signals.hidden, signals.visual_mask, norm_order=float(signals.config.norm_order))


declare(PRUNING, "norm", "score pruner", "hidden-state norm pruning", score_fn=norm_token_scores)
declare(PRUNING, "random", "score pruner", "random pruning (seeded control)", score_fn=random_token_scores)
declare(CLUSTERING, "pooling", "whole method", "spatial pooling of stride x stride windows (control)")


@register("random", "none")
class RandomPruning(Method):
    """Keep a seeded random subset of the visual tokens."""

    name = "random"
    needs_merge = False

    def reduce(self, signals: Signals) -> Reduction:
        scores = random_token_scores(signals)
        return pruned_reduction(
            select_by_scores(scores, self.config), signals.num_visual, signals.sizes, scores
        )


@register("norm", "none")
class NormPruning(Method):
    """Keep the visual tokens with the largest hidden-state norm."""

    name = "norm"
    needs_merge = False

    def reduce(self, signals: Signals) -> Reduction:
        scores = norm_token_scores(signals)
        return pruned_reduction(
            select_by_scores(scores, self.config), signals.num_visual, signals.sizes, scores
        )


def pooling_windows(
    groups: list[Group], stride: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, labels) over the sample's original visual tokens: one window of each grid -> one token.

    kept: LongTensor[R] ascending representative indices (the window's central token); labels:
    LongTensor[N] index into kept of each token's window. One ``grid_pool`` call per grid.
    """
    kept_parts, label_parts, offset = [], [], 0
    for g in groups:
        kept, labels = grid_pool(g.rows, g.cols, stride, placement="center", device=device)
        kept_parts.append(kept + g.start)
        label_parts.append(labels + offset)
        offset += kept.numel()
    if not kept_parts:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty.clone()
    return torch.cat(kept_parts), torch.cat(label_parts)


def pooled_count(groups: list[Group], stride: int) -> int:
    """Tokens left after pooling ``groups`` with ``stride``."""
    return sum(-(-g.rows // stride) * -(-g.cols // stride) for g in groups)


def pooling_stride_for(groups: list[Group], target: int) -> int:
    """Smallest stride whose count is closest to ``target`` (ties: the count not above it)."""
    largest = max([max(g.rows, g.cols) for g in groups], default=1)
    best = None
    for stride in range(1, largest + 1):  # a loop over strides (a few dozen at most), not tokens
        count = pooled_count(groups, stride)
        key = (abs(count - target), count > target)
        if best is None or key < best[0]:
            best = (key, stride)
    return best[1] if best else 1


@register("none", "pooling")
class SpatialPooling(Method):
    """Average each stride x stride window of every image grid."""

    name = "pooling"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        if config.progressive:
            raise ValueError("pooling works on the full image grids: set progressive=false")

    def reduce(self, signals: Signals) -> Reduction:
        n = signals.num_visual
        groups = full_grids(signals, "spatial pooling needs the full image grids")
        target = target_count(self.config, n)
        stride = int(self.config.pooling_stride) if target is None else pooling_stride_for(groups, target)
        dev = signals.hidden.device
        kept, labels = pooling_windows(groups, stride, dev)
        hidden = signals.hidden[signals.visual_mask]
        everyone = torch.arange(n, device=dev)
        # grid_pool labels index the kept list; cluster_reduction wants subset indices of representatives
        return cluster_reduction(
            hidden, signals.sizes, n, everyone, kept, kept[labels], merge_mean=bool(self.config.merge_mean)
        )
