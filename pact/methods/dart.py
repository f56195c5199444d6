"""DART (EMNLP 2025, "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More"; official code ``ZichenWen1/DART``): keep the visual tokens least duplicated with a few
pivot tokens.

What the official ``get_retained_image_token`` computes (LLaVA ``modeling_llama_self.py``, Qwen2-VL /
Qwen2.5-VL ``modeling_qwen2_vl_self.py``), before decoder layer K = ``layer`` (2 by default):

1. Pivots: the ``dart_pivot_image_tokens`` visual tokens and the ``dart_pivot_text_tokens`` tokens
   after the image with the largest L1 norm of their layer K-1 keys (post-RoPE, the keys that layer's
   attention returns, all heads concatenated).
2. Features: the output of layer K-1 (= the hidden states entering layer K) passed through the
   model's FINAL norm (``self.norm``).
3. The pivots, in the iteration order of the Python set of their sequence positions (reproduced
   here), each take the ``TOKEN_TOPK = int(N * (1 - reduction_ratio) / P)`` visual tokens (P pivots;
   ``keep_ratio`` = 1 - reduction_ratio) least cosine-similar to them among those not yet taken
   (the visual pivots excluded).
4. Kept: the visual pivots and every taken token, in sequence order; kept tokens keep their
   original position ids (``position_mode: "center"``; the official code gathers them).

Budget (``target_tokens`` / ``target_ratio``): exactly K tokens: the visual pivots (at most K) and
the rest split over the pivots in processing order (the first ``R mod P`` take one more).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pact.methods.base import PRUNING, Method, Signals, declare, register
from pact.methods.budget import pruned_reduction, target_count
from pact.ops.diversity import least_similar_to_pivots
from pact.ops.reduction import Reduction
from pact.ops.scoring import topk_indices

declare(
    PRUNING,
    "dart",
    "whole method",
    "DART: keep the visual tokens least cosine-similar to key-norm pivot tokens (layer K-1 keys)",
)


def key_l1_norms(keys: torch.Tensor) -> torch.Tensor:
    """(T, H_kv, d) keys -> float32 (T,) L1 norm over all heads concatenated (the official norm of the
    repeated heads is n_rep times this: the same ranking)."""
    return keys.float().abs().sum(dim=(1, 2))


def pivot_order(positions: list[int]) -> list[int]:
    """The pivots' processing order: the official code iterates ``list(set(image + text))`` of their
    sequence positions; CPython's iteration order of a set of ints is deterministic, so this is it."""
    return list(set(positions))


def per_pivot_counts(cfg: Any, n: int, image_pivots: int, pivots: int) -> list[int]:
    """How many tokens each of ``pivots`` pivots takes (in processing order) for N = ``n`` visual tokens.

    No budget: ``int(n * keep_ratio / pivots)`` each (official ``TOKEN_TOPK``). Budget K: the
    ``K - image_pivots`` tokens left after the visual pivots, split as evenly as possible.
    """
    if pivots == 0:
        return []
    budget = target_count(cfg, n)
    if budget is None:
        return [int(n * float(cfg.keep_ratio) / pivots)] * pivots
    rest = max(0, budget - image_pivots)
    return [rest // pivots + (1 if p < rest % pivots else 0) for p in range(pivots)]


def dart_select(
    features: torch.Tensor,
    keys: torch.Tensor,
    visual_mask: torch.Tensor,
    cfg: Any,
) -> torch.Tensor:
    """Ascending indices (into the visual tokens) that DART keeps.

    Args:
        features: (T, D) the normed layer K-1 outputs of the sample's valid tokens.
        keys: (T, H_kv, d) layer K-1's post-RoPE keys of the same tokens.
        visual_mask: (T,) bool, the candidates.
        cfg: the config (pivot counts, keep_ratio or a budget).
    """
    vis = visual_mask.nonzero().flatten()
    n = vis.numel()
    norms = key_l1_norms(keys)
    budget = target_count(cfg, n)
    n_image = min(int(cfg.dart_pivot_image_tokens), n if budget is None else min(n, budget))
    image_local = topk_indices(norms[vis], n_image)  # ascending visual indices
    after = torch.arange(int(vis[-1]) + 1, visual_mask.numel(), device=vis.device)
    text_local = topk_indices(norms[after], min(int(cfg.dart_pivot_text_tokens), after.numel()))
    image_pos = vis[image_local].tolist()
    text_pos = after[text_local].tolist()
    order = pivot_order(image_pos + text_pos)
    counts = per_pivot_counts(cfg, n, n_image, len(order))
    candidates = torch.ones(n, dtype=torch.bool, device=vis.device)
    candidates[image_local] = False
    cand_pos = vis[candidates]
    taken: list[torch.Tensor] = []
    # Pivots with equal counts run as one greedy pass; different counts (a budget's remainder) in
    # consecutive groups, each group seeing what the previous left.
    start = 0
    while start < len(order):
        stop = start
        while stop < len(order) and counts[stop] == counts[start]:
            stop += 1
        got = least_similar_to_pivots(features, order[start:stop], cand_pos, counts[start])
        if got.numel():
            taken.append(got)
            cand_pos = cand_pos[~torch.isin(cand_pos, got)]
        start = stop
    kept_pos = torch.cat([vis[image_local], *taken]) if taken else vis[image_local]
    local = torch.searchsorted(vis, kept_pos)
    return local.sort().values


@register("dart", "none")
class DART(Method):
    """Duplication-aware pruning before layer K from layer K-1's keys and normed outputs."""

    name = "dart"
    needs_merge = False

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        if config.progressive:
            raise ValueError(
                "pruning='dart' prunes once, before layer K, from layer K-1's keys: set progressive=false"
            )
        self.final_norm: nn.Module | None = None

    def input_layers(self, num_layers: int) -> list[int]:
        return [int(self.config.layer) - 1]

    def install(self, model: Any, adapter: Any) -> list[Any]:
        norm = getattr(adapter.text_model, "norm", None)
        if not isinstance(norm, nn.Module):
            raise ValueError(
                f"pruning='dart' reads the language model's final norm (`norm`), which this "
                f"{type(adapter.text_model).__name__} does not have"
            )
        self.final_norm = norm
        return []

    def reduce(self, signals: Signals) -> Reduction:
        if self.final_norm is None:
            raise RuntimeError("DART reads the model's final norm: run it through pact.apply")
        prev = signals.layer - 1
        _, keys = signals.qk_at(prev, rope=True)
        if keys.shape[0] != signals.visual_mask.shape[0]:
            raise ValueError("DART needs the unreduced sequence at layer K-1 (one reduction step only)")
        with torch.no_grad():
            features = self.final_norm(signals.hidden.detach()[None])[0]
        kept = dart_select(features, keys.detach(), signals.visual_mask, self.config)
        return pruned_reduction(kept, signals.num_visual, signals.sizes)
