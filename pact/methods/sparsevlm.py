"""SparseVLM (ICML'25, ``Gumpest/SparseVLMs``): text-guided progressive pruning inside the language
model, with the pruned tokens recycled into a few merged tokens (``pact.ops.sparsevlm``).

At each pruning layer l (``sparsevlm_layers``, official 2, 6, 15 of LLaVA-1.5-7B's 32; on a model of
n layers each is scaled to ``round(l * n / sparsevlm_reference_depth)``), as the official code, layer
l runs on every current token and its OUTPUT is pruned (the reduction runs before layer l + 1):

1. the text raters (chosen once per sample from the input embeddings: the text tokens after the
   last visual token whose mean softmax relevance to the visual tokens is above average) rate the
   visual tokens with layer l's attention -- one (raters x keys) float32 slice of the causal
   softmax, computed from the queries/keys layer l computes on its input (so it runs on sdpa; it
   equals the eager model's ``output_attentions`` rows), averaged over heads and raters. Layer l's
   input is the engine's ``Signals.layer_input`` at the first stage; at later stages (after a
   reduction, where the engine keeps no earlier input) the method records it with a forward
   pre-hook on layer l, installed at ``pact.apply``;
2. the top tokens are kept: the official schedule of ``sparsevlm_budget`` (64 -> 66, 30, 17 of
   576 ...; scaled by N / 576 for a sample of N visual tokens) or, ``sparsevlm_count: "rank"``,
   ``int(rank * sparsevlm_rank_scale)`` of the raters x visual attention; at most N - 1;
3. recycling (``sparsevlm_recycle``): the best 30 % (+1) of the pruned tokens by that score are
   clustered by DPC-KNN into a tenth (+1) and each cluster becomes one token, the plain mean of its
   members' layer-l outputs, standing at its center's slot and placed after the kept visual tokens
   (``Reduction.order``): it stays a visual token for the next stage, as in the official code.

Positions: the official code truncates the position ids to the new length (contiguous), i.e.
``position_mode: "renumber"`` in ``sparsevlm.json``.

Budgets (``target_tokens`` T / ``target_ratio``): the schedule is scaled so that the layer-mean
number of kept visual tokens (recycled tokens not counted, as the official budget labels) is T; the
evaluation metrics report the achieved layer mean (``pact.eval.metrics.layer_mean_visual``).
"""

from __future__ import annotations

from typing import Any

import torch

from pact.methods.base import PRUNING, Method, Signals, declare, register
from pact.methods.budget import target_count
from pact.methods.layer_inputs import LayerInputs
from pact.ops.reduction import Reduction
from pact.ops.scoring import topk_indices
from pact.ops.sparsevlm import (
    SPARSEVLM_SCHEDULES,
    dpc_knn,
    rank_count,
    rater_attention,
    recycle_count,
    text_raters,
)

declare(
    PRUNING,
    "sparsevlm",
    "whole method",
    "SparseVLM: text-rater attention, progressive pruning at several layers, DPC-KNN recycling",
)

_CTX = "sparsevlm"


def official_layers(spec: str, num_layers: int, reference_depth: int) -> list[int]:
    """The pruning layers l of a model with ``num_layers`` layers (``spec``: "2,6,15"); each stage
    prunes layer l's output, i.e. before layer l + 1, which must exist."""
    given = [int(x) for x in spec.split(",")]
    if reference_depth > 0:
        given = [round(layer * num_layers / reference_depth) for layer in given]
    layers = sorted(set(given))
    if not layers or layers[-1] + 1 >= num_layers:
        raise ValueError(
            f"sparsevlm_layers={spec!r} gives pruning layers {layers}: pruning a layer's output needs "
            f"the next layer, but the model has only {num_layers} decoder layers"
        )
    return layers


def stage_counts(n: int, layers: list[int], num_layers: int, budget: int, target: int | None) -> list[int]:
    """Kept visual tokens after each stage for a sample of ``n`` visual tokens: the official schedule
    of ``budget`` scaled by n / 576, or (``target`` T) scaled so that the layer-mean count is T.
    ``layers``: the layers each stage's tokens enter first (pruning layer + 1)."""
    table = SPARSEVLM_SCHEDULES[budget]
    stages = list(table[: len(layers)]) + [table[-1]] * max(0, len(layers) - len(table))
    base = [t * n / 576 for t in stages]
    if target is not None:
        spans = [b - a for a, b in zip(layers, [*layers[1:], num_layers], strict=True)]
        weight = sum(s * b for s, b in zip(spans, base, strict=True))
        factor = max(0.0, (target * num_layers - layers[0] * n) / weight) if weight > 0 else 0.0
        base = [b * factor for b in base]
    return [max(0, round(b)) for b in base]


@register("sparsevlm", "none")
class SparseVLM(Method):
    """SparseVLM (see the module docstring)."""

    name = "sparsevlm"
    needs_merge = True

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.layer_inputs = LayerInputs(self.name)  # the later pruning layers' inputs (install)
        if int(config.sparsevlm_budget) not in SPARSEVLM_SCHEDULES:
            raise ValueError(
                f"sparsevlm_budget={config.sparsevlm_budget}: allowed values are the official budgets "
                f"{sorted(SPARSEVLM_SCHEDULES)}"
            )

    def stages(self, num_layers: int) -> list[int]:
        """The pruning layers l (each stage prunes layer l's output)."""
        return official_layers(
            str(self.config.sparsevlm_layers), num_layers, int(self.config.sparsevlm_reference_depth)
        )

    def layers(self, num_layers: int) -> list[int]:
        return [layer + 1 for layer in self.stages(num_layers)]

    def input_layers(self, num_layers: int) -> list[int]:
        # the raters read the input embeddings; the first stage reads its layer's input (kept by the
        # engine before any reduction)
        return sorted({0, self.stages(num_layers)[0]})

    def install(self, model: Any, adapter: Any) -> list[Any]:
        """Record the input of every later pruning layer (after a reduction the engine keeps none):
        a forward pre-hook, registered after the engine's, so it sees what the layer receives."""
        return self.layer_inputs.attach(adapter, self.stages(len(adapter.layers))[1:])

    def finish(self, context: dict[str, Any]) -> None:
        self.layer_inputs.clear()

    def _state(self, signals: Signals) -> dict[str, Any]:
        """Per-sample state of this call: N before the first stage and the raters (as offsets into
        the text after the last visual token)."""
        states = signals.context.setdefault(_CTX, {})
        if signals.sample not in states:
            embeds = signals.layer_input(0)
            vis = signals.visual_mask
            last = int(vis.nonzero()[-1]) if bool(vis.any()) else -1
            text = embeds[last + 1 :]
            raters = text_raters(embeds[vis], text).nonzero().squeeze(1)
            states[signals.sample] = {"n": signals.num_visual, "text": text.shape[0], "raters": raters}
        return states[signals.sample]

    def layer_qk(self, signals: Signals) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-RoPE (queries, keys) of the pruning layer l = ``signals.layer - 1`` on its input (the
        same tokens and positions as now: nothing is reduced between layer l and layer l + 1)."""
        layer = signals.layer - 1
        stages = self.stages(signals.num_layers)
        if layer == stages[0]:
            return signals.qk_at(layer, rope=True)
        return self.layer_inputs.queries_keys(signals, layer)

    def scores(self, signals: Signals) -> torch.Tensor:
        """(R, N) float32 attention of the raters (rows) to the visual tokens at pruning layer l."""
        st = self._state(signals)
        t = signals.visual_mask.shape[0]
        rows = st["raters"] + (t - st["text"])
        q, k = self.layer_qk(signals)
        bias = None
        if self.config.proportional_attention:
            bias = torch.zeros(t, device=q.device)
            bias[signals.visual_mask] = signals.sizes.float().log()
        layer = signals.layer - 1  # ran on these tokens: its own scale and mask (Gemma 3: window, blocks)
        probs = rater_attention(
            q,
            k,
            rows,
            bias,
            scale=signals.attention_scale(layer),
            visibility=signals.attention_visibility(layer),
        )
        return probs[:, signals.visual_mask]

    def reduce(self, signals: Signals) -> Reduction:
        cfg = self.config
        n = signals.num_visual
        device = signals.hidden.device
        st = self._state(signals)
        relation = self.scores(signals)
        score = relation.mean(dim=0) if relation.shape[0] else torch.zeros(n, device=device)
        layers = self.stages(signals.num_layers)
        stage = layers.index(signals.layer - 1)
        prune = True
        if cfg.sparsevlm_count == "rank":
            count, rank = rank_count(relation, float(cfg.sparsevlm_rank_scale))
            prune = rank != n
        else:
            target = target_count(cfg, st["n"])
            count = stage_counts(
                st["n"],
                self.layers(signals.num_layers),
                signals.num_layers,
                int(cfg.sparsevlm_budget),
                target,
            )[stage]
        if not prune or relation.shape[0] == 0:  # no rater, or nothing to prune (rank = N)
            idx = torch.arange(n, device=device)
            return Reduction(
                kept=idx, sizes=signals.sizes.float(), hidden=None, labels=idx.clone(), scores=score
            )
        kept = torch.sort(topk_indices(score, max(0, min(count, n - 1)))).values
        is_pruned = torch.ones(n, dtype=torch.bool, device=device)
        is_pruned[kept] = False
        pruned = is_pruned.nonzero().squeeze(1)
        hidden = signals.hidden[signals.visual_mask].float()
        sizes = signals.sizes.float()
        n_cand, n_clusters = recycle_count(pruned.numel()) if cfg.sparsevlm_recycle else (0, 0)
        labels = torch.full((n,), -1, dtype=torch.long, device=device)
        if n_clusters:
            cand = pruned[torch.sort(score[pruned], descending=True, stable=True).indices[:n_cand]]
            centers, member_of = dpc_knn(hidden[cand], n_clusters)
            slots_tok = cand[centers]  # each cluster stands at its center's slot
        else:
            slots_tok = kept[:0]
        all_kept = torch.sort(torch.cat([kept, slots_tok])).values
        slot = torch.full((n,), -1, dtype=torch.long, device=device)
        slot[all_kept] = torch.arange(all_kept.numel(), device=device)
        labels[kept] = slot[kept]
        new_hidden = hidden[all_kept].clone()
        new_sizes = sizes[all_kept].clone()
        if n_clusters:
            cluster_slot = slot[slots_tok]  # (k,)
            labels[cand] = cluster_slot[member_of]
            ones = torch.ones(n_cand, device=device)
            count_k = torch.zeros(n_clusters, device=device).index_add_(0, member_of, ones)
            mean = torch.zeros(n_clusters, hidden.shape[1], device=device).index_add_(
                0, member_of, hidden[cand]
            )
            new_hidden[cluster_slot] = mean / count_k[:, None]  # the official plain mean
            new_sizes[cluster_slot] = torch.zeros(n_clusters, device=device).index_add_(
                0, member_of, sizes[cand]
            )
        # kept tokens in index order, then the recycled ones in the centers' score order
        rank_of = torch.full((n,), 0, dtype=torch.long, device=device)
        rank_of[slots_tok] = torch.arange(1, slots_tok.numel() + 1, device=device)
        key = rank_of[all_kept] * (n + 1) + all_kept * (rank_of[all_kept] == 0)
        order = torch.argsort(key)
        in_order = bool(torch.equal(order, torch.arange(order.numel(), device=device)))
        return Reduction(
            kept=all_kept,
            sizes=new_sizes,
            hidden=new_hidden if n_clusters else None,
            labels=labels,
            scores=score,
            order=None if in_order else order,
        )
