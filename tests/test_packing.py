"""pact.packing without a model: per-sample plans, batch packing, layouts and step records on
hand-made layouts, every expected value worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from pact.ops.reduction import Reduction
from pact.packing import (
    ReductionRecord,
    first_positions,
    gather_layout,
    initial_layout,
    pack_batch,
    pack_hidden,
    plan_sample,
    renumbered_positions,
    step_record,
)

L = torch.tensor  # short for hand-written index lists


def red(kept, labels, sizes=None, hidden=None, order=None, extra=None, scores=None) -> Reduction:
    kept = L(kept, dtype=torch.long)
    sizes = torch.ones(kept.numel()) if sizes is None else L(sizes, dtype=torch.float32)
    return Reduction(
        kept=kept,
        sizes=sizes,
        hidden=hidden,
        labels=L(labels, dtype=torch.long),
        order=None if order is None else L(order, dtype=torch.long),
        extra=extra,
        scores=scores,
    )


# One sample, 6 valid tokens [text, v0, v1, v2, v3, text] sitting in old slots 2..7 (2 pad slots).
SLOTS = torch.arange(2, 8)
VIS_POS = L([1, 2, 3, 4])
ONES = torch.ones(6)


def test_pruning_keeps_sequence_order_and_dropped_tokens_point_to_the_kept_token_before():
    plan = plan_sample(SLOTS, VIS_POS, ONES, red([1, 3], [-1, 0, -1, 1]), layer=1, sample=0)
    # stays: text(0), v1(2), v3(4), text(5) -> old slots 2, 4, 6, 7
    assert plan.source.tolist() == [2, 4, 6, 7]
    assert not plan.is_new.any()
    assert plan.sizes.tolist() == [1, 1, 1, 1]
    # v0 dropped -> text before it (new 0); v2 dropped -> v1 (new 1)
    assert plan.target.tolist() == [0, 0, 1, 1, 2, 3]
    assert plan.rows == []
    assert plan.slots is SLOTS


def test_merged_tokens_take_their_sizes_and_replacement_rows_at_their_new_positions():
    rows = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    plan = plan_sample(
        SLOTS, VIS_POS, ONES, red([0, 2], [0, 0, 1, 1], [2, 2], hidden=rows), layer=1, sample=0
    )
    assert plan.source.tolist() == [
        2,
        3,
        5,
        7,
    ]  # text, v0 (center of {v0, v1}), v2 (center of {v2, v3}), text
    assert plan.sizes.tolist() == [1, 2, 2, 1]
    assert plan.target.tolist() == [0, 1, 1, 2, 2, 3]  # each member -> its center's new position
    ((where, written),) = plan.rows
    assert where.tolist() == [1, 2] and written is rows


def test_order_permutes_the_kept_visual_tokens_within_their_slots():
    # keep v0, v1, v3 (positions 1, 2, 4), place them as v3, v0, v1; v2 dropped
    plan = plan_sample(
        SLOTS, VIS_POS, ONES, red([0, 1, 3], [0, 1, -1, 2], order=[2, 0, 1]), layer=1, sample=0
    )
    assert (plan.source - 2).tolist() == [0, 4, 1, 2, 5]
    # v0 -> new 2, v1 -> new 3, v3 -> new 1; dropped v2 -> the kept token before it in the
    # sequence (v1), wherever v1 was placed (new 3)
    assert plan.target.tolist() == [0, 2, 3, 3, 1, 4]


def test_extra_tokens_go_after_the_last_kept_visual_token_and_stand_for_nothing():
    extra = torch.full((2, 3), 7.0)
    plan = plan_sample(SLOTS, VIS_POS, ONES, red([0, 2], [0, -1, 1, -1], extra=extra), layer=1, sample=0)
    # text, v0, v2, new, new, text; the new tokens read the slot of v2 (position 3 -> slot 5)
    assert (plan.source - 2).tolist() == [0, 1, 3, 3, 3, 5]
    assert plan.is_new.tolist() == [False, False, False, True, True, False]
    assert plan.sizes.tolist() == [1, 1, 1, 1, 1, 1]
    assert plan.target.tolist() == [0, 1, 1, 2, 2, 5]  # no old token maps to a new one
    ((where, written),) = plan.rows
    assert where.tolist() == [3, 4] and written is extra


def test_every_visual_token_removed_extra_goes_where_the_visual_tokens_were():
    extra = torch.zeros(1, 3)
    plan = plan_sample(SLOTS, VIS_POS, ONES, red([], [-1, -1, -1, -1], extra=extra), layer=1, sample=0)
    # text, new (at the first text token's position), text
    assert (plan.source - 2).tolist() == [0, 0, 5]
    assert plan.is_new.tolist() == [False, True, False]
    assert plan.target.tolist() == [0, 0, 0, 0, 0, 2]
    assert [w.tolist() for w, _ in plan.rows] == [[1]]  # no hidden rows: nothing is kept


def test_every_visual_token_removed_without_extra():
    plan = plan_sample(SLOTS, VIS_POS, ONES, red([], [-1, -1, -1, -1]), layer=1, sample=0)
    assert (plan.source - 2).tolist() == [0, 5]
    assert plan.target.tolist() == [0, 0, 0, 0, 0, 1]


def test_a_sample_without_visual_tokens_stays_as_it_is():
    plan = plan_sample(SLOTS, VIS_POS[:0], ONES * 3, None, layer=1, sample=0)
    assert plan.source.tolist() == SLOTS.tolist()
    assert plan.target.tolist() == list(range(6))
    assert plan.sizes.tolist() == [3] * 6 and plan.rows == []


def test_a_step_that_removes_every_token_is_refused_with_the_layer_and_sample():
    with pytest.raises(ValueError, match="layer 3 removed every token of sample 1"):
        plan_sample(torch.arange(2), L([0, 1]), torch.ones(2), red([], [-1, -1]), layer=3, sample=1)


def test_pack_batch_left_pads_and_composes_old_to_new():
    # sample 0: 6 valid tokens in slots 2..7 (pruned to 4); sample 1: 8 valid tokens, no visual
    p0 = plan_sample(SLOTS, VIS_POS, ONES, red([1, 3], [-1, 0, -1, 1]), layer=1, sample=0)
    p1 = plan_sample(torch.arange(8), L([], dtype=torch.long), torch.ones(8), None, layer=1, sample=1)
    packing = pack_batch([p0, p1], old_length=8)
    assert packing.index.tolist() == [[0, 0, 0, 0, 2, 4, 6, 7], list(range(8))]
    assert packing.slot_ok.tolist() == [[False] * 4 + [True] * 4, [True] * 8]
    # sample 0: old slots 2..7 -> new 4 + target; old padding slots 0, 1 -> 0
    assert packing.old_to_new.tolist() == [[0, 0, 4, 4, 5, 5, 6, 7], list(range(8))]
    assert packing.sizes.tolist() == [[1.0] * 8, [1.0] * 8]

    hidden = torch.arange(2 * 8 * 2, dtype=torch.float64).view(2, 8, 2)
    new_hidden = pack_hidden(hidden, packing)
    assert new_hidden.dtype == torch.float64
    assert new_hidden[0, :4].eq(0).all()  # padding rows are zero
    assert torch.equal(new_hidden[0, 4:], hidden[0, [2, 4, 6, 7]])
    assert torch.equal(new_hidden[1], hidden[1])


def test_pack_hidden_writes_merged_and_new_rows_in_the_hidden_dtype():
    rows = torch.tensor([[0.5, 0.25], [1.5, 2.5]])  # float32, as methods return means
    extra = torch.tensor([[9.0, 9.0]])
    plan = plan_sample(
        SLOTS, VIS_POS, ONES, red([0, 2], [0, 0, 1, 1], [2, 2], rows, extra=extra), layer=1, sample=0
    )
    packing = pack_batch([plan], old_length=8)
    hidden = torch.randn(1, 8, 2, dtype=torch.bfloat16)
    new_hidden = pack_hidden(hidden, packing)
    assert new_hidden.dtype == torch.bfloat16 and new_hidden.shape == (1, 5, 2)
    # text, v0 (merged), v2 (merged), new, text
    assert torch.equal(new_hidden[0, 1:3], rows.bfloat16())
    assert torch.equal(new_hidden[0, 3], extra[0].bfloat16())
    assert torch.equal(new_hidden[0, [0, 4]], hidden[0, [2, 7]])
    assert packing.is_new[0].tolist() == [False, False, False, True, False]
    assert packing.sizes[0].tolist() == [1, 2, 2, 1, 1]


def _two_sample_layout():
    """B=2, T=5. Sample 0: [pad, t, v, v, t]; sample 1: [t, v, v, v, t]. 1-D positions."""
    valid = L([[False, True, True, True, True], [True] * 5])
    cand = L([[False, False, True, True, False], [False, True, True, True, False]])
    positions = L([[[0, 0, 1, 2, 3], [0, 1, 2, 3, 4]]])  # (1, B, T): stock left-padding ids
    cos = torch.arange(5, dtype=torch.float32).view(1, 5, 1).expand(1, 5, 4) + 0.5
    return valid, cand, positions, cos, -cos


def test_initial_layout_numbers_the_visual_tokens_of_each_sample():
    valid, cand, positions, cos, sin = _two_sample_layout()
    lay = initial_layout(valid, cand, positions, cos, sin)
    assert lay.slot_orig.tolist() == [[-1, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    assert lay.visual_index.tolist() == [[-1, -1, 0, 1, -1], [-1, 0, 1, 2, -1]]
    assert lay.key_bias.tolist() == [[-math.inf, 0, 0, 0, 0], [0] * 5]
    assert lay.cos.shape == (2, 5, 4) and torch.equal(lay.sin[1], -cos[0])
    assert lay.orig_to_slot.tolist() == [list(range(5))] * 2
    assert lay.mask is None
    assert first_positions(valid, positions).tolist() == [0, 0]


def test_gather_layout_over_two_steps_composes_orig_to_slot():
    valid, cand, positions, cos, sin = _two_sample_layout()
    lay = initial_layout(valid, cand, positions, cos, sin)
    # step 1: sample 0 merges its two visual tokens into the first (size 2); sample 1 keeps v0 and v2
    # and adds one new token after them
    plans = [
        plan_sample(L([1, 2, 3, 4]), L([1, 2]), torch.ones(4), red([0], [0, 0], [2]), layer=1, sample=0),
        plan_sample(
            L([0, 1, 2, 3, 4]),
            L([1, 2, 3]),
            torch.ones(5),
            red([0, 2], [0, -1, 1], extra=torch.ones(1, 4)),
            layer=1,
            sample=1,
        ),
    ]
    packing = pack_batch(plans, old_length=5)
    new = gather_layout(lay, packing)
    # sample 0: pad, pad, t, v (size 2), t; sample 1: t, v0, v2, new, t (R' = 5)
    assert new.slot_orig.tolist() == [[-1, -1, 1, 2, 4], [0, 1, 3, 3, 4]]
    assert new.visual.tolist() == [[False, False, False, True, False], [False, True, True, False, False]]
    assert new.visual_index.tolist() == [[-1, -1, -1, 0, -1], [-1, 0, 2, -1, -1]]
    assert new.sizes.tolist() == [[1, 1, 1, 2, 1], [1, 1, 1, 1, 1]]
    assert new.key_bias[0].tolist() == pytest.approx([-math.inf, -math.inf, 0, math.log(2), 0])
    assert new.positions.tolist() == [[[0, 0, 0, 1, 3], [0, 1, 3, 3, 4]]]  # new token: v2's position
    assert torch.equal(new.cos[1, :, 0], L([0.5, 1.5, 3.5, 3.5, 4.5]))
    # original position -> slot of its representative (sample 1's dropped v1 -> v0's slot)
    assert new.orig_to_slot.tolist() == [[0, 2, 3, 3, 4], [0, 1, 1, 2, 4]]

    # step 2 on the new layout: sample 1 keeps only v2 (its old v0 is dropped)
    plans = [
        plan_sample(L([2, 3, 4]), L([1]), new.sizes[0, [2, 3, 4]], red([0], [0], [2]), layer=2, sample=0),
        plan_sample(L([0, 1, 2, 3, 4]), L([1, 2]), torch.ones(5), red([1], [-1, 0]), layer=2, sample=1),
    ]
    newer = gather_layout(new, pack_batch(plans, old_length=5))
    assert newer.slot_orig.tolist() == [[-1, 1, 2, 4], [0, 3, 3, 4]]
    # sample 1: v0 (orig 1) and v1 (orig 2, already pointing to v0) now fall back to the text before
    assert newer.orig_to_slot.tolist() == [[0, 1, 2, 2, 3], [0, 0, 0, 1, 3]]


def test_renumbered_positions_are_contiguous_from_the_first_position():
    slot_ok = L([[False, False, True, True, True], [True] * 5])
    assert renumbered_positions(L([0, 3]), slot_ok).tolist() == [[[0, 0, 0, 1, 2], [3, 4, 5, 6, 7]]]


def test_step_record_composes_labels_through_the_previous_step():
    # N0 = 6 original visual tokens. Step 1 (all six current): keep 1 and 4; {0, 1, 2} -> 1,
    # {3, 4} -> 4, 5 dropped.
    r1 = red([1, 4], [0, 0, 0, 1, 1, -1], [3, 2], scores=torch.arange(6.0))
    rec1 = step_record(1, r1, torch.arange(6), 6, None)
    assert rec1.kept.tolist() == [1, 4] and rec1.labels.tolist() == [0, 0, 0, 1, 1, -1]
    assert rec1.scores.tolist() == [0, 1, 2, 3, 4, 5] and rec1.extra == 0 and rec1.layer == 1
    # Step 2, the current visual tokens are orig 4 then 1 (reordered by step 1): merge both into 4.
    r2 = red([0], [0, 0], [5], scores=L([7.0, 8.0]), extra=torch.zeros(1, 2))
    rec2 = step_record(2, r2, L([4, 1]), 6, rec1)
    assert rec2.kept.tolist() == [4]
    assert rec2.labels.tolist() == [0, 0, 0, 0, 0, -1]  # 5 stays dropped
    assert rec2.scores[[1, 4]].tolist() == [8.0, 7.0] and rec2.scores[[0, 2, 3, 5]].isnan().all()
    assert rec2.extra == 1 and rec2.layer == 2


def test_record_to_cpu_is_a_detached_float_copy():
    rec = ReductionRecord(
        layer=0, kept=L([0]), labels=L([0]), sizes=torch.ones(1, dtype=torch.bfloat16, requires_grad=True)
    )
    cpu = rec.to_cpu()
    assert cpu.sizes.dtype == torch.float32 and not cpu.sizes.requires_grad
    assert cpu.scores is None and cpu.order is None and cpu.extra == 0


# ---------------------------------------------------------------------------------------------------
# Removable non-candidate slots (image newlines): removed only when the Reduction asks

# One sample, 8 valid slots (no padding): [t, v0, v1, nl, v2, v3, nl, t]; the newlines (nl) are
# no visual tokens but removable.
NL_SLOTS = torch.arange(8)
NL_VIS = L([1, 2, 4, 5])
NL_REMOVABLE = L([3, 6])


def nl_red(drop: bool, extra: torch.Tensor | None = None) -> Reduction:
    r = red([1, 2], [-1, 0, 1, -1], extra=extra)  # keep v1 and v2, drop v0 and v3
    r.drop_removable = drop
    return r


def test_drop_removable_removes_the_newline_slots_and_maps_them_to_the_kept_token_before():
    plan = plan_sample(
        NL_SLOTS, NL_VIS, torch.ones(8), nl_red(True), layer=0, sample=0, removable=NL_REMOVABLE
    )
    # stays: t(0), v1(2), v2(4), t(7)
    assert plan.source.tolist() == [0, 2, 4, 7]
    assert plan.removed_slots == 2
    # v0 -> t (new 0); v1 -> 1; nl(3) -> v1 (new 1); v2 -> 2; v3 and nl(6) -> v2 (new 2); t -> 3
    assert plan.target.tolist() == [0, 0, 1, 1, 2, 2, 2, 3]


def test_removable_slots_stay_unless_the_reduction_asks():
    plan = plan_sample(
        NL_SLOTS, NL_VIS, torch.ones(8), nl_red(False), layer=0, sample=0, removable=NL_REMOVABLE
    )
    assert plan.source.tolist() == [0, 2, 3, 4, 6, 7]  # both newlines stay
    assert plan.removed_slots == 0
    assert plan.target.tolist() == [0, 0, 1, 2, 3, 3, 4, 5]
    # a sample without visual tokens has no Reduction: nothing is removed
    none = plan_sample(NL_SLOTS, NL_VIS[:0], torch.ones(8), None, layer=0, sample=0, removable=NL_REMOVABLE)
    assert none.source.tolist() == list(range(8)) and none.removed_slots == 0


def test_new_tokens_go_after_the_last_kept_visual_token_when_newlines_are_removed():
    extra = torch.full((1, 2), 9.0)
    plan = plan_sample(
        NL_SLOTS, NL_VIS, torch.ones(8), nl_red(True, extra), layer=0, sample=0, removable=NL_REMOVABLE
    )
    # t, v1, v2, new (reads v2's slot), t
    assert plan.source.tolist() == [0, 2, 4, 4, 7]
    assert plan.is_new.tolist() == [False, False, False, True, False]
    assert plan.target.tolist() == [0, 0, 1, 1, 2, 2, 2, 4]


def test_removing_every_slot_is_refused():
    r = red([], [-1])
    r.drop_removable = True
    with pytest.raises(ValueError, match="removed every token of sample 2"):
        plan_sample(L([0, 1]), L([0]), torch.ones(2), r, layer=0, sample=2, removable=L([1]))


def test_layouts_carry_the_removable_slots_and_step_records_count_them():
    # B=2, T=5. Sample 0: [pad, t, v, nl, t]; sample 1: [t, v, nl, v, nl].
    valid = L([[False, True, True, True, True], [True] * 5])
    cand = L([[False, False, True, False, False], [False, True, False, True, False]])
    removable = L([[True, False, False, True, False], [False, True, True, False, True]])
    positions = torch.arange(5).view(1, 1, 5).expand(1, 2, 5)
    cos = torch.zeros(1, 5, 4)
    lay = initial_layout(valid, cand, positions, cos, cos, removable=removable)
    # padding and candidates are never removable
    assert lay.removable.tolist() == [[False, False, False, True, False], [False, False, True, False, True]]
    r0 = red([0], [0])
    r0.drop_removable = True
    plans = [
        plan_sample(L([1, 2, 3, 4]), L([1]), torch.ones(4), r0, layer=0, sample=0, removable=L([2])),
        plan_sample(
            L([0, 1, 2, 3, 4]),
            L([1, 3]),
            torch.ones(5),
            red([1], [-1, 0]),
            layer=0,
            sample=1,
            removable=L([2, 4]),
        ),
    ]
    new = gather_layout(lay, pack_batch(plans, old_length=5))
    # R' = 4. sample 0: pad, t, v, t (its newline removed); sample 1: t, nl, v, nl (v0 dropped)
    assert new.slot_orig.tolist() == [[-1, 1, 2, 4], [0, 2, 3, 4]]
    assert new.removable.tolist() == [[False] * 4, [False, True, False, True]]
    # sample 0's newline (orig 3) -> the kept v before it; sample 1's dropped v0 -> the text before
    assert new.orig_to_slot.tolist() == [[0, 1, 2, 2, 3], [0, 0, 1, 2, 3]]
    rec = step_record(0, r0, L([0]), 1, None, plans[0].removed_slots)
    assert rec.removed_slots == 1 and rec.to_cpu().removed_slots == 1
    assert plans[1].removed_slots == 0
