"""CDPruner (NeurIPS'25, ``Theia-4869/CDPruner``): keep the visual tokens that maximise the
conditional diversity of the kept set -- greedy MAP of a DPP whose kernel is the cosine similarity of
the visual tokens weighted by their relevance to the instruction (``pact.ops.dpp``).

Official (LLaVA-1.5 / LLaVA-NeXT, ``llava/model/llava_arch.py::encode_images``): before the language
model, per encoder image (each LLaVA-NeXT crop), T = ``visual_token_num`` tokens; similarity of the
projector outputs (float32 cosine); relevance = the negated mean cosine between the CLIP vision
embeddings of the patches and the CLIP text embeddings of the question, min-max normalised; kernel
``r_i S_ij r_j``; the kept tokens in index order.

Here, at ``layer`` (0 in ``cdpruner.json``: the LLM input embeddings, i.e. the projector outputs):

* similarity: cosine of the visual tokens' hidden states entering ``layer`` (official at layer 0);
* relevance: there is no CLIP text tower in these models, so the instruction is represented by the
  model's own input embeddings of its text tokens after the sample's last visual token (the question
  and the template's tail), compared with the visual tokens' hidden states in the same space; not
  negated by default (``cdpruner_negate_relevance``: the official negation compensates CLIP's
  inverted patch-text similarity, which the LLM's embedding space does not have); min-max
  normalised over the sample's visual tokens (official: over the whole batch of images);
* budget per visual grid (LLaVA-1.5 image, LLaVA-NeXT base crop and unpadded crop grid, Qwen image,
  InternVL tile, video frame): ``int(size * keep_ratio)`` (official 64 of 576: ``keep_ratio``
  0.1112); with ``target_tokens`` / ``target_ratio`` the sample's budget is split over its grids by
  size (largest remainder) and met exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from pact.methods.base import PRUNING, Method, Signals, declare, register
from pact.methods.budget import pruned_reduction, split_budget, target_count
from pact.methods.layout import sample_groups
from pact.ops.dpp import dpp_greedy_map, instruction_relevance, relevance_weights
from pact.ops.reduction import Reduction
from pact.ops.scoring import keep_count

declare(
    PRUNING,
    "cdpruner",
    "whole method",
    "CDPruner: conditional-DPP greedy MAP (similarity x instruction relevance) per image",
)


def instruction_mask(visual_mask: torch.Tensor) -> torch.Tensor:
    """(T,) bool: the text tokens after the sample's last visual token (the instruction)."""
    idx = visual_mask.nonzero()
    out = torch.zeros_like(visual_mask)
    if idx.numel():
        out[int(idx[-1]) + 1 :] = True
    return out & ~visual_mask


@register("cdpruner", "none")
class CDPruner(Method):
    """CDPruner (see the module docstring). Pure pruning: kept tokens keep their hidden states."""

    name = "cdpruner"
    needs_merge = False

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        if getattr(config, "progressive", False):
            raise ValueError("cdpruner selects the visual tokens once: set progressive=false")

    def relevance(self, signals: Signals) -> torch.Tensor:
        """(N,) min-max normalised relevance of the visual tokens to the instruction (ones without
        instruction tokens: the kernel is then the similarity alone)."""
        hidden = signals.hidden
        visual = hidden[signals.visual_mask]
        text = hidden[instruction_mask(signals.visual_mask)]
        if text.shape[0] == 0:
            return torch.ones(visual.shape[0], device=hidden.device)
        negate = bool(self.config.cdpruner_negate_relevance)
        return instruction_relevance(visual, text, negate=negate)

    def reduce(self, signals: Signals) -> Reduction:
        cfg = self.config
        n = signals.num_visual
        device = signals.hidden.device
        visual = signals.hidden[signals.visual_mask]
        rel = self.relevance(signals)
        quality = relevance_weights(rel, cfg.cdpruner_theta)
        groups = sample_groups(signals)
        sizes = [g.size for g in groups]
        if sum(sizes) != n:
            raise ValueError(f"{self.name}: the visual grids hold {sum(sizes)} tokens, the sample has {n}")
        target = target_count(cfg, n)
        if target is None:
            budgets = [keep_count(s, float(cfg.keep_ratio)) for s in sizes]
        else:
            budgets = split_budget(target, [s / n for s in sizes] if n else [])
        kept = []
        for g, budget in zip(groups, budgets, strict=True):
            sel = dpp_greedy_map(
                visual[g.start : g.start + g.size], quality[g.start : g.start + g.size], budget
            )
            kept.append(sel + g.start)
        kept_all = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long, device=device)
        return pruned_reduction(kept_all, n, signals.sizes, rel)
