"""VisionZip (CVPR'25, ``dvlab-research/VisionZip``): per encoder image, keep the dominant tokens
(highest vision-encoder attention) and merge the others into a few contextual tokens by key
similarity, before the language model sees them (``layer`` 0, renumbered positions).

Reads, through the vision-side capture of ``pact.methods.vision`` (hooks installed at
``pact.apply``, the encoder's own q/k recomputed, no eager switch), at the layer whose output feeds
the projector (CLIP: layer -2, as the official ``attentions[-2]`` / ``layers[-2].metric``; Qwen: the
last block, as the official Qwen2.5-VL port):

* the dominant score: the [CLS] attention over the patches summed over heads (official); encoders
  without [CLS] (SigLIP, the Qwen ViTs) the attention each patch receives from the patches of its
  image, averaged over heads (``pact.ops.vision.mean_received_attention``: the Qwen2.5-VL port's
  head-mean column sum up to a per-image constant, and the paper's fallback), Qwen's merged token
  taking the mean over its 2 x 2 patches as the port does;
* that layer's keys averaged over heads (the official ``raw_key_states.mean(1)``; Qwen: post-RoPE,
  averaged over the 2 x 2 patches too);
* the features to merge: the projector's input (the select layer's outputs, official LLaVA), merged
  then sent through the model's own projector; on M-RoPE families (Qwen) by default the LLM input
  embeddings, which is where the Qwen2.5-VL port merges (``visionzip_features``).

Budget per encoder image (LLaVA-1.5 image, each LLaVA-NeXT crop, Qwen image, InternVL tile):
``T = int(V * keep_ratio)`` of its V encoder tokens, ``int(T * visionzip_contextual_ratio)`` of them
contextual (official 64 = 54 + 10 on LLaVA-1.5: ``keep_ratio`` 0.1112, ratio 0.15625; LLaVA-NeXT
160 = 5 x (27 + 5): ``keep_ratio`` 0.0556), chosen among the image's tokens present in the sequence.
With ``target_tokens`` / ``target_ratio`` the sample's budget is split over its encoder images by
their tokens in the sequence (largest remainder) and met exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from pact.methods.base import PRUNING, Signals, declare, register
from pact.methods.budget import split_budget, target_count
from pact.methods.layout import sample_groups
from pact.methods.vision import SignalSpec, VisionMethod
from pact.models.vision_probe import VisionProbe
from pact.ops.reduction import Reduction
from pact.ops.visionzip import visionzip_counts, visionzip_crop

declare(
    PRUNING,
    "visionzip",
    "whole method",
    "VisionZip: encoder-attention dominant tokens + key-similarity contextual merges (vision side)",
)


@register("visionzip", "none")
class VisionZip(VisionMethod):
    """VisionZip (see the module docstring): dominant + contextual tokens per encoder image.

    Output order within each image grid (``Reduction.order``): the dominant tokens in index order,
    then the contextual tokens in target order, as the official code emits them. A contextual token
    stands at its target's slot; ``sizes`` count its members (the official code has no proportional
    attention: ``visionzip.json`` turns it off).
    """

    name = "visionzip"
    needs_merge = True
    keys_of = ("attn",)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._mrope = False
        self._key_heads = 1

    def merge_space(self) -> str:
        """ "encoder" (projector input, then projected) or "projector" (LLM input embeddings)."""
        space = getattr(self.config, "visionzip_features", "auto")
        if space == "auto":
            return "projector" if self._mrope else "encoder"
        return space

    def wants_features(self) -> bool:
        return self.merge_space() == "encoder"

    def install(self, model: Any, adapter: Any) -> list[Any]:
        self._mrope = bool(getattr(adapter, "mrope", False))
        return super().install(model, adapter)

    def signal_layers(self, probe: VisionProbe) -> dict[str, int | SignalSpec]:
        layer = probe.select_layer()
        self._key_heads = int(probe.attention(layer).num_heads)
        return {"attn": SignalSpec(layer, "sum")}

    def _crop_totals(self, signals: Signals, sig: dict[str, torch.Tensor], crops: list[int]) -> list[int]:
        """Tokens each encoder image keeps: the budget's share, or ``int(V * keep_ratio)``."""
        n = signals.num_visual
        present = [int((sig["crop"] == c).sum()) for c in crops]
        target = target_count(self.config, n)
        if target is not None:
            return split_budget(target, [p / n for p in present])
        cap_crop = self.captured(signals)["crop"]
        ratio = float(self.config.keep_ratio)
        return [min(int(int((cap_crop == c).sum()) * ratio), p) for c, p in zip(crops, present, strict=True)]

    def reduce(self, signals: Signals) -> Reduction:
        cfg = self.config
        sig = self.token_signals(signals)
        n = signals.num_visual
        device = signals.hidden.device
        attn = sig["attn"][:, 0]
        keys = sig["attn_keys"].reshape(n, self._key_heads, -1).mean(1)
        embeds = sig["embeds"].float()
        encoder = self.merge_space() == "encoder"
        feats = sig["features"] if encoder else embeds
        share = float(cfg.visionzip_contextual_ratio)
        crops = torch.unique(sig["crop"]).tolist()
        kept, hidden, sizes, contextual = [], [], [], []
        rep = torch.full((n,), -1, dtype=torch.long, device=device)  # representative of each token
        for c, total in zip(crops, self._crop_totals(signals, sig, crops), strict=True):
            members = (sig["crop"] == c).nonzero().squeeze(1)
            n_dom, n_ctx = visionzip_counts(total, share)
            red, ctx = visionzip_crop(
                attn[members], keys[members], feats[members], n_dom, n_ctx, merge_mean=bool(cfg.merge_mean)
            )
            glob = members[red.kept]
            rows = embeds[glob].clone()  # dominant tokens keep their own embeddings, bit for bit
            if bool(ctx.any()):
                merged = red.hidden[ctx]
                rows[ctx] = self.capture.project(merged) if encoder else merged
            valid = red.labels >= 0
            rep[members[valid]] = glob[red.labels[valid]]
            kept.append(glob)
            hidden.append(rows)
            sizes.append(red.sizes)
            contextual.append(ctx)
        if not kept:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return Reduction(kept=empty, sizes=torch.zeros(0, device=device), hidden=None, labels=rep)
        all_kept = torch.cat(kept)
        by_index = torch.argsort(all_kept)
        all_kept = all_kept[by_index]
        slot = torch.full((n,), -1, dtype=torch.long, device=device)
        slot[all_kept] = torch.arange(all_kept.numel(), device=device)
        labels = torch.where(rep >= 0, slot[rep.clamp(min=0)], rep)
        is_ctx = torch.cat(contextual)[by_index]
        # within each grid (image, crop grid, frame, tile): dominant tokens, then contextual ones
        grid = torch.zeros(n, dtype=torch.long, device=device)
        for ordinal, g in enumerate(sample_groups(signals)):
            grid[g.start : g.start + g.size] = ordinal
        key = grid[all_kept] * (2 * n) + is_ctx.long() * n + all_kept
        order = torch.argsort(key)
        in_order = bool(torch.equal(order, torch.arange(order.numel(), device=device)))
        return Reduction(
            kept=all_kept,
            sizes=torch.cat(sizes)[by_index],
            hidden=torch.cat(hidden)[by_index],
            labels=labels,
            scores=attn.float(),
            order=None if in_order else order,
        )
