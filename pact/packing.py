"""Model-free bookkeeping of a reduction step: per-sample plans, batch packing, step records.

The engine (``pact/engine.py``) owns the hooks, the model calls (queries/keys, rotary tables, masks)
and the per-call state; everything here is a pure function of tensors, so it is unit-tested on
hand-made layouts without a model (tests/test_packing.py).

One reduction step, per batch::

    plan_sample(slots, vis_pos, sizes, reduction)   per sample: which old slots stay, in which order,
                                                    which rows are replaced or inserted, new sizes,
                                                    old slot -> new position (removable non-candidate
                                                    slots, e.g. image newlines, go when the Reduction
                                                    asks: ``drop_removable``)
    pack_batch(plans, old_length)                   left-pad the samples to a common length R'
    pack_hidden(hidden, packing)                    (B, R, D) -> (B, R', D), replaced/inserted rows
    gather_layout(layout, packing)                  the Layout of the new slots (no mask: the engine's)
    step_record(layer, reduction, orig_vis, ...)    the step in ORIGINAL visual-token indices

Conventions: B samples, R slots per sample in the current (left-padded) layout, T the prefill's
input length, n a sample's valid (non-padding) slots, N its current visual tokens, N0 its original
visual tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pact.ops.reduction import Reduction

# ---------------------------------------------------------------------------------------------------
# Layout and records


@dataclass
class Layout:
    """The current (possibly reduced, left-padded) token layout of the batch, R slots per sample.

    slot_orig: (B, R) long, original sequence index of the token in each slot, -1 for padding (a
        new token, ``Reduction.extra``: the index of the token whose slot it was placed after).
    visual: (B, R) bool, current visual tokens (reduction candidates).
    visual_index: (B, R) long, original visual-token index (per sample) of visual slots, else -1.
    sizes: (B, R) float32, original tokens each slot stands for (1 for padding).
    cos, sin: (B, R, head_dim) rotary tables of each slot.
    positions: (A, B, R) long rotary position ids (A = 3 for M-RoPE, else 1).
    key_bias: (B, R) float32, 0 / log(size) / -inf (padding), added to every query's logit on a key.
    orig_to_slot: (B, T) long, slot holding the representative of each original position.
    mask: what layers >= L receive as attention_mask (None: the sdpa fast path, or not built yet).
    removable: (B, R) bool, non-candidate slots a Reduction may remove with ``drop_removable``
        (the adapter's ``removable_mask``: image newlines), or None when there are none.
    """

    slot_orig: torch.Tensor
    visual: torch.Tensor
    visual_index: torch.Tensor
    sizes: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor
    key_bias: torch.Tensor
    orig_to_slot: torch.Tensor
    mask: torch.Tensor | None = None
    removable: torch.Tensor | None = None


@dataclass
class ReductionRecord:
    """What one reduction step did to one sample, in ORIGINAL visual-token indices.

    The engine keeps records on the model's device; ``Engine.stats`` hands out CPU copies
    (``to_cpu``).

    Attributes:
        layer: decoder layer the step ran before.
        kept: LongTensor[R], original visual indices of the visual tokens still in the sequence
            after this step (a merged token is listed under its center's index).
        labels: LongTensor[N0], for every original visual token the index into ``kept`` of the
            token representing it after this step, -1 if it was pruned and dropped.
        sizes: FloatTensor[R], how many original visual tokens each kept token stands for.
        scores: FloatTensor[N0] importance scores of this step (NaN for tokens already gone), or None.
        order: LongTensor[R], the order in which the kept tokens were placed in the sequence
            (``kept[order[0]]`` first), or None for sequence order (``Reduction.order``).
        extra: number of new tokens the step added after the kept visual tokens (``Reduction.extra``);
            they represent no original token, so ``labels`` never point to them.
        removed_slots: non-candidate slots (image newlines) the step removed with the visual tokens
            (``Reduction.drop_removable``); they are no visual tokens, so no other field counts them.
    """

    layer: int
    kept: torch.Tensor
    labels: torch.Tensor
    sizes: torch.Tensor
    scores: torch.Tensor | None = None
    order: torch.Tensor | None = None
    extra: int = 0
    removed_slots: int = 0

    def to_cpu(self) -> ReductionRecord:
        """A detached CPU copy (sizes and scores as float32)."""
        return ReductionRecord(
            layer=self.layer,
            kept=self.kept.detach().cpu(),
            labels=self.labels.detach().cpu(),
            sizes=self.sizes.detach().float().cpu(),
            scores=None if self.scores is None else self.scores.detach().float().cpu(),
            order=None if self.order is None else self.order.detach().cpu(),
            extra=self.extra,
            removed_slots=self.removed_slots,
        )


def step_record(
    layer: int,
    reduction: Reduction,
    orig_vis: torch.Tensor,
    num_original: int,
    previous: ReductionRecord | None,
    removed_slots: int = 0,
) -> ReductionRecord:
    """One sample's step in original visual-token indices, composed with its previous step.

    Args:
        layer: decoder layer of the step.
        reduction: the step's Reduction over the sample's N current visual tokens.
        orig_vis: (N,) long, original visual index of each current visual token, in sequence order.
        num_original: N0, the sample's original visual tokens.
        previous: the sample's record of the previous step (None: this is its first step). The
            current visual tokens are exactly the tokens it kept (possibly reordered).
        removed_slots: non-candidate slots the step removed (``SamplePlan.removed_slots``).

    Returns:
        ReductionRecord on ``orig_vis``'s device; ``labels`` (N0,) maps every original token to its
        representative after this step, through the previous step's representative.
    """
    dev = orig_vis.device
    labels_cur = reduction.labels.to(dev)
    if previous is None:
        labels = torch.full((num_original,), -1, dtype=torch.long, device=dev)
        labels[orig_vis] = labels_cur
    else:
        # original token -> its previous representative (original index) -> current index -> label
        current_of = torch.full((num_original,), -1, dtype=torch.long, device=dev)
        current_of[orig_vis] = torch.arange(orig_vis.numel(), device=dev)
        rep_orig = previous.kept[previous.labels.clamp(min=0)]
        labels = torch.where(previous.labels >= 0, labels_cur[current_of[rep_orig]], -1)
    scores = None
    if reduction.scores is not None:
        scores = torch.full((num_original,), float("nan"), device=dev)
        scores[orig_vis] = reduction.scores.to(dev).float()
    return ReductionRecord(
        layer=layer,
        kept=orig_vis[reduction.kept],
        labels=labels,
        sizes=reduction.sizes,
        scores=scores,
        order=reduction.order,
        extra=reduction.num_extra,
        removed_slots=removed_slots,
    )


# ---------------------------------------------------------------------------------------------------
# Initial layout


def initial_layout(
    valid: torch.Tensor,
    candidates: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    removable: torch.Tensor | None = None,
) -> Layout:
    """The unreduced layout of a prefill: slot t holds original token t.

    Args:
        valid: (B, T) bool, the prefill's attention mask (False: padding).
        candidates: (B, T) bool, visual patch tokens (reduction candidates), False on padding.
        positions: (A, B, T) long rotary position ids.
        cos, sin: (B or 1, T, head_dim) rotary tables the model computed (expanded to B).
        removable: (B, T) bool, non-candidate slots a Reduction may remove (image newlines), or
            None (none). Never a candidate nor padding.
    """
    B, T = valid.shape
    dev = valid.device
    arange = torch.arange(T, device=dev)
    return Layout(
        slot_orig=torch.where(valid, arange[None], -1),
        visual=candidates,
        visual_index=torch.where(candidates, candidates.long().cumsum(1) - 1, -1),
        sizes=torch.ones(B, T, dtype=torch.float32, device=dev),
        cos=cos.expand(B, -1, -1),
        sin=sin.expand(B, -1, -1),
        positions=positions,
        key_bias=torch.where(valid, 0.0, float("-inf")).float(),
        orig_to_slot=arange[None].expand(B, T).clone(),
        removable=None if removable is None else removable & valid & ~candidates,
    )


def first_positions(valid: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B,) long, the (first axis) position id of each sample's first valid token.

    valid: (B, T) bool; positions: (A, B, T) long. A sample without valid tokens gets slot 0's."""
    first_valid = valid.long().argmax(1)
    return positions[0].gather(1, first_valid[:, None])[:, 0]


def renumbered_positions(first: torch.Tensor, slot_ok: torch.Tensor) -> torch.Tensor:
    """(1, B, R) long contiguous positions over each sample's non-padding slots, from ``first``.

    first: (B,) long, position of each sample's first token; slot_ok: (B, R) bool (False: padding,
    which gets 0). What the stock model gives a prompt that is as short as the reduced one."""
    counted = first[:, None] + slot_ok.long().cumsum(1) - 1
    return torch.where(slot_ok, counted, 0)[None]


# ---------------------------------------------------------------------------------------------------
# Per-sample plan


@dataclass
class SamplePlan:
    """Where one sample's tokens go in a reduction step (n old valid slots, n_new new positions).

    slots: (n,) long, the sample's valid slots in the old layout.
    source: (n_new,) long, old slot each new position is read from (a new token: the slot of the
        token right before it, normally the last kept visual token).
    is_new: (n_new,) bool, positions of new tokens (``Reduction.extra``).
    sizes: (n_new,) float32, size of each new position (1 for new tokens).
    target: (n,) long, new position representing each old token (a dropped token: the new position
        of the nearest kept token before it, the first one if none).
    rows: (new positions (k,), hidden rows (k, D)) to write over the gathered hidden states:
        ``Reduction.hidden`` at the kept visual tokens, ``Reduction.extra`` at the new tokens.
    removed_slots: how many removable non-candidate slots (image newlines) the plan removes.
    """

    slots: torch.Tensor
    source: torch.Tensor
    is_new: torch.Tensor
    sizes: torch.Tensor
    target: torch.Tensor
    rows: list[tuple[torch.Tensor, torch.Tensor]]
    removed_slots: int = 0


def plan_sample(
    slots: torch.Tensor,
    vis_pos: torch.Tensor,
    sizes: torch.Tensor,
    reduction: Reduction | None,
    *,
    layer: int,
    sample: int,
    removable: torch.Tensor | None = None,
) -> SamplePlan:
    """The new order of one sample after ``reduction``.

    Non-visual tokens stay in sequence order (except the ``removable`` ones when
    ``reduction.drop_removable``: they go); the kept visual ones stay in the slots the kept visual
    tokens occupy, permuted by ``reduction.order``; ``reduction.extra`` tokens go right after the
    last kept visual token (where the last visual token was when none is kept). A removed token is
    represented by its cluster's kept token, a dropped one (or a removed non-candidate slot) by the
    nearest kept token before it.

    Args:
        slots: (n,) long, the sample's valid slots in the old layout, increasing.
        vis_pos: (N,) long, increasing indices into ``slots`` of the current visual tokens.
        sizes: (n,) float32, current size of each token.
        reduction: the method's Reduction over the N visual tokens (validated), or None to keep
            every token (a sample without visual tokens).
        layer, sample: only for the error message.
        removable: (M,) long, increasing indices into ``slots`` of the sample's removable
            non-candidate slots (disjoint from ``vis_pos``), or None.

    Raises:
        ValueError: the step would leave the sample without any token.
    """
    dev = slots.device
    n = int(slots.numel())
    keep_flag = torch.ones(n, dtype=torch.bool, device=dev)
    rep = torch.arange(n, device=dev)
    new_sizes = sizes.clone()
    kept_pos = vis_pos[:0]
    if reduction is not None:
        kept_pos = vis_pos[reduction.kept.to(dev)]  # indices into slots
        keep_flag[vis_pos] = False
        keep_flag[kept_pos] = True
        new_sizes[kept_pos] = reduction.sizes.to(new_sizes)
        labels = reduction.labels.to(dev)
        if kept_pos.numel():
            rep[vis_pos] = torch.where(labels >= 0, kept_pos[labels.clamp(min=0)], -1)
        else:  # every visual token removed
            rep[vis_pos] = -1
    removed_slots = 0
    if reduction is not None and reduction.drop_removable and removable is not None and removable.numel():
        removable = removable.to(dev)
        keep_flag[removable] = False
        rep[removable] = -1  # represented by the nearest kept token before, as a dropped token
        removed_slots = int(removable.numel())
    if not bool(keep_flag.any()):
        raise ValueError(
            f"the reduction at layer {layer} removed every token of sample {sample}; a prompt needs at "
            "least one non-visual token (or keep some visual tokens)"
        )
    plan = _arrange(slots, keep_flag, rep, new_sizes, vis_pos, kept_pos, reduction)
    plan.removed_slots = removed_slots
    return plan


def _arrange(
    slots: torch.Tensor,
    keep_flag: torch.Tensor,
    rep: torch.Tensor,
    sizes: torch.Tensor,
    vis_pos: torch.Tensor,
    kept_pos: torch.Tensor,
    red: Reduction | None,
) -> SamplePlan:
    """``plan_sample`` once the kept tokens are known. Every index points into the n valid slots:
    keep_flag (n,) bool; rep (n,) representative (-1: dropped); sizes (n,) after the step; vis_pos
    (N,); kept_pos (R,) kept visual tokens (increasing)."""
    dev = keep_flag.device
    n = int(keep_flag.numel())
    keep = torch.nonzero(keep_flag, as_tuple=False).flatten()  # increasing
    source = keep.clone()
    at_kept = torch.searchsorted(keep, kept_pos)  # where the kept visual tokens sit in `keep`
    if red is not None and red.order is not None and kept_pos.numel():
        source[at_kept] = kept_pos[red.order.to(dev)]
    is_new = torch.zeros(source.numel(), dtype=torch.bool, device=dev)
    n_extra = 0 if red is None else red.num_extra
    if n_extra:
        # after the last kept visual token; none kept: where the last visual token was
        last = at_kept[-1] + 1 if kept_pos.numel() else torch.searchsorted(keep, vis_pos[-1])
        at = int(last)
        anchor = source[max(at - 1, 0) : max(at, 1)]  # the token before the new ones (their position)
        source = torch.cat([source[:at], anchor.expand(n_extra), source[at:]])
        is_new = torch.cat([is_new[:at], torch.ones(n_extra, dtype=torch.bool, device=dev), is_new[at:]])
    positions = torch.arange(source.numel(), device=dev)
    new_of = torch.full((n,), -1, dtype=torch.long, device=dev)
    new_of[source[~is_new]] = positions[~is_new]
    before = (torch.searchsorted(keep, torch.arange(n, device=dev), right=True) - 1).clamp(min=0)
    target = torch.where(rep >= 0, new_of[rep.clamp(min=0)], new_of[keep[before]])
    new_sizes = torch.where(is_new, 1.0, sizes[source])
    rows = []
    if red is not None and red.hidden is not None and kept_pos.numel():
        rows.append((new_of[kept_pos], red.hidden))
    if n_extra:
        rows.append((positions[is_new], red.extra))
    return SamplePlan(
        slots=slots, source=slots[source], is_new=is_new, sizes=new_sizes, target=target, rows=rows
    )


# ---------------------------------------------------------------------------------------------------
# Batch packing


@dataclass
class BatchPacking:
    """The samples' plans left-padded to a common length R' (padding first, as the prompt's).

    index: (B, R') long, old slot each new slot is read from (0 for padding).
    slot_ok: (B, R') bool, non-padding new slots.
    is_new: (B, R') bool, new tokens (``Reduction.extra``).
    sizes: (B, R') float32, size of each new slot (1 for padding).
    old_to_new: (B, R) long, new slot representing each old valid slot (0 for old padding).
    rows: (sample, new slots (k,), hidden rows (k, D)) to write over the gathered hidden states.
    """

    index: torch.Tensor
    slot_ok: torch.Tensor
    is_new: torch.Tensor
    sizes: torch.Tensor
    old_to_new: torch.Tensor
    rows: list[tuple[int, torch.Tensor, torch.Tensor]]


def pack_batch(plans: list[SamplePlan], old_length: int) -> BatchPacking:
    """Left-pad the per-sample plans of one step (one per sample, B >= 1) to the longest one.

    old_length: R, slots per sample in the old layout."""
    dev = plans[0].source.device
    B = len(plans)
    R_new = max(int(p.source.numel()) for p in plans)
    index = torch.zeros(B, R_new, dtype=torch.long, device=dev)
    slot_ok = torch.zeros(B, R_new, dtype=torch.bool, device=dev)
    is_new = torch.zeros(B, R_new, dtype=torch.bool, device=dev)
    sizes = torch.ones(B, R_new, dtype=torch.float32, device=dev)
    old_to_new = torch.zeros(B, old_length, dtype=torch.long, device=dev)
    rows = []
    for b, plan in enumerate(plans):
        off = R_new - int(plan.source.numel())
        index[b, off:] = plan.source
        slot_ok[b, off:] = True
        is_new[b, off:] = plan.is_new
        sizes[b, off:] = plan.sizes
        old_to_new[b, plan.slots] = plan.target + off
        for where, hidden_rows in plan.rows:
            rows.append((b, where + off, hidden_rows))
    return BatchPacking(
        index=index, slot_ok=slot_ok, is_new=is_new, sizes=sizes, old_to_new=old_to_new, rows=rows
    )


def pack_hidden(hidden: torch.Tensor, packing: BatchPacking) -> torch.Tensor:
    """(B, R, D) hidden states -> (B, R', D): gathered, padding zeroed, the plans' rows written in
    (cast to ``hidden.dtype``)."""
    new_hidden = take_rows(hidden, packing.index) * packing.slot_ok[..., None].to(hidden.dtype)
    for b, where, rows in packing.rows:
        new_hidden[b, where] = rows.to(hidden.dtype)
    return new_hidden


def gather_layout(layout: Layout, packing: BatchPacking) -> Layout:
    """The layout of the new slots: slot r of sample b holds old slot ``packing.index[b, r]`` (a new
    token: the slot of the kept token before it, whose position and rotary rows it takes). Positions
    and cos/sin are gathered (position_mode center/mean; the engine renumbers them itself); the
    mask is left to the engine (None)."""
    index, slot_ok = packing.index, packing.slot_ok
    visual = layout.visual.gather(1, index) & slot_ok & ~packing.is_new
    removable = None
    if layout.removable is not None:
        removable = layout.removable.gather(1, index) & slot_ok & ~packing.is_new
    return Layout(
        slot_orig=torch.where(slot_ok, layout.slot_orig.gather(1, index), -1),
        visual=visual,
        visual_index=torch.where(visual, layout.visual_index.gather(1, index), -1),
        sizes=packing.sizes,
        cos=take_rows(layout.cos, index),
        sin=take_rows(layout.sin, index),
        positions=layout.positions.gather(2, index[None].expand(layout.positions.shape[0], -1, -1)),
        key_bias=torch.where(slot_ok, packing.sizes.log(), float("-inf")).float(),
        orig_to_slot=packing.old_to_new.gather(1, layout.orig_to_slot),
        removable=removable,
    )


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, R, ...) gathered along dim 1 with index (B, R') -> (B, R', ...)."""
    idx = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, idx)


__all__ = [
    "BatchPacking",
    "Layout",
    "ReductionRecord",
    "SamplePlan",
    "first_positions",
    "gather_layout",
    "initial_layout",
    "pack_batch",
    "pack_hidden",
    "plan_sample",
    "renumbered_positions",
    "step_record",
    "take_rows",
]
