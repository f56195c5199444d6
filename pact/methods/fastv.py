"""FastV: prune the visual tokens that receive the least attention.

Two variants (``cfg.fastv_variant``), both computed from the layer's own queries and keys, so they
run under SDPA (only the attention slice they need is computed, in float32 chunks; the model is never
switched to eager):

* ``"reference"`` (PACT's baseline, ``configs/fastv.json``): at layer L, the attention the prefix
  queries P (position 0 .. last visual token) pay to the keys of P (``euti_support="prefix"``,
  reference ``use_all_non_text_pruning=true``) or of the visual tokens only (``"visual"``: the
  softmax runs over the visual keys), causal if ``fastv_causal``, with post-RoPE queries/keys when
  ``euti_rope`` (the reference sets both), averaged over query rows and heads; times the hidden
  state's ``norm_order``-norm when ``multiply_by_norm``, as the reference's pruning branch does
  (``fastv.json`` sets it false).
* ``"original"`` (FastV, ECCV'24): the head-mean attention the LAST prompt token pays at layer L-1
  (K = L = 2 in the paper) with the model's post-RoPE queries/keys; the tokens are pruned before
  layer L. Not the reference's: ``euti_support``, ``euti_rope``, ``fastv_causal`` and
  ``multiply_by_norm`` do not apply (``euti_support="visual"`` is refused).

Keeps ``int(N * keep_ratio)`` tokens (or the budget, ``pact.methods.budget``); ties -> lower index.
"""

from __future__ import annotations

from typing import Any

import torch

from pact.methods.base import Method, Signals, register
from pact.methods.budget import pruned_reduction, select_by_scores
from pact.ops.reduction import Reduction
from pact.ops.scoring import fastv_scores


def fastv_token_scores(signals: Signals) -> torch.Tensor:
    """float32 (N,) FastV scores of the sample's visual tokens (variant from the config)."""
    cfg = signals.config
    if cfg.fastv_variant == "original":
        check_fastv_config(cfg)  # also reached as the pruning stage of a pruning + clustering pair
        prev = signals.layer - 1
        if prev < 0:
            raise ValueError("fastv_variant='original' reads the attention of layer L-1: set layer >= 1")
        q, k = signals.qk_at(prev, rope=True)
        if q.shape[0] != signals.visual_mask.shape[0]:
            raise ValueError(
                "fastv_variant='original' needs the unreduced sequence at layer L-1; it cannot follow "
                "another reduction step (set progressive=false)"
            )
        return fastv_scores(
            q,
            k,
            signals.visual_mask,
            variant="original",
            scale=signals.attention_scale(prev),
            visibility=signals.attention_visibility(prev),
        )
    rope = bool(cfg.euti_rope)
    scores = fastv_scores(
        signals.queries(rope=rope),
        signals.keys(rope=rope),
        signals.visual_mask,
        causal=bool(cfg.fastv_causal),
        support=cfg.euti_support,
        scale=signals.attention_scale(),
        visibility=signals.attention_visibility(),
    )
    if cfg.multiply_by_norm:
        # The reference's pruning branch multiplies FastV's scores too (fastv.json sets it false).
        hidden_v = signals.hidden[signals.visual_mask].float()
        scores = scores * torch.linalg.vector_norm(hidden_v, ord=float(cfg.norm_order), dim=-1)
    return scores


def check_fastv_config(cfg: Any) -> None:
    """Refuse settings FastV would otherwise silently ignore.

    Raises:
        ValueError: ``euti_support="visual"`` (reference ``use_all_non_text_pruning=false``) with
            ``fastv_variant="original"``, whose last-token row attends over every key.
    """
    if cfg.fastv_variant == "original" and cfg.euti_support == "visual":
        raise ValueError(
            "euti_support='visual' (reference use_all_non_text_pruning=false) restricts the reference "
            "FastV's softmax to the visual keys; fastv_variant='original' attends over every key: use "
            "euti_support='prefix' or fastv_variant='reference'"
        )


def fastv_input_layers(cfg: object) -> list[int]:
    """Layers whose inputs FastV reads: L-1 for the original variant."""
    if getattr(cfg, "fastv_variant", "reference") == "original":
        return [int(cfg.layer) - 1]
    return []


@register("fastv", "none")
class FastV(Method):
    """FastV pruning (reference or original variant)."""

    name = "fastv"
    needs_merge = False

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        if config.fastv_variant == "original" and config.progressive:
            raise ValueError(
                "fastv_variant='original' prunes once, from layer L-1's attention: set progressive=false"
            )
        check_fastv_config(config)

    def input_layers(self, num_layers: int) -> list[int]:
        return fastv_input_layers(self.config)

    def reduce(self, signals: Signals) -> Reduction:
        scores = fastv_token_scores(signals)
        kept = select_by_scores(scores, self.config)
        return pruned_reduction(kept, signals.num_visual, signals.sizes, scores)
