"""PyramidDrop: the schedule (official counts, depth scaling, budgets), the last-token attention row on
hand-made queries/keys, the row against an eager model's ``output_attentions`` (the first stage, sdpa
model), and renumbered positions."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAMILIES, greedy, inputs_for, model_for, one_image

import pact
import pact.api
from pact import testing
from pact.methods.base import Signals, build_method
from pact.methods.pdrop import pyramid
from pact.models import get_adapter
from pact.ops.stages import absolute_counts, budget_counts, layer_mean_from, relative_counts, scale_layers


def test_official_schedule_counts_and_depth_scaling():
    assert absolute_counts(576, [0.5, 0.25, 0.125]) == [288, 144, 72]
    assert scale_layers([8, 16, 24], 32, 32) == [8, 16, 24]
    assert scale_layers([8, 16, 24], 32, 28) == [7, 14, 21]
    assert scale_layers([8, 16, 24], 32, 6) == [2, 3, 5]  # floor(1.5 + .5), floor(3 + .5), floor(4.5 + .5)
    assert pyramid(576, 0.5, 3) == [288, 144, 72]


def test_budget_is_the_layer_mean_from_the_first_stage():
    # n = 100, stages before layers 2 and 4 of a 6-layer model (4 layers from the first stage):
    # mean = (2 c1 + 2 c2) / 4 with c1 = int(100 lam), c2 = int(100 lam^2); K = 30 needs c1 + c2 <= 60:
    # lam = 0.43 gives 43 + 18 = 61 (too many), just below 0.43 gives 42 + 18 = 60: mean 30.0.
    counts = budget_counts(100, 30, [2, 4], 6, lambda lam: pyramid(100, lam, 2))
    assert layer_mean_from(100, counts, [2, 4], 6) <= 30
    assert counts == [42, 18]
    assert budget_counts(100, 100, [2, 4], 6, lambda lam: pyramid(100, lam, 2)) == [100, 100]


def signals(
    hidden_len: int, q: torch.Tensor, k: torch.Tensor, visual: torch.Tensor, cfg, layer: int
) -> Signals:
    n = int(visual.sum())
    return Signals(
        layer=layer,
        sample=0,
        hidden=torch.zeros(hidden_len, 2),
        visual_mask=visual,
        sizes=torch.ones(n),
        positions=torch.arange(hidden_len)[None],
        visual_index=torch.arange(n),
        config=cfg,
        qk_fn=lambda j, h, rope, wq, wk: (q, k, q, k),
        cos_sin_fn=lambda: (None, None),
        layer_input_fn=lambda j: None,
        context={},
        num_layers=4,
    )


def test_the_last_tokens_attention_ranks_the_visual_tokens():
    # one head, d = 1, scale 1: the last token's query is 1, so its logits are the keys. Keys: text 0,
    # visual ln 2, ln 4, 0, last token 0 -> attention (1, 2, 4, 1, 1) / 9; keep int(3 * 0.34) = 1.
    k = torch.tensor([0.0, math.log(2), math.log(4), 0.0, 0.0]).view(5, 1, 1)
    q = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]).view(5, 1, 1)
    visual = torch.tensor([False, True, True, True, False])
    cfg = pact.load_config("pdrop", pdrop_layers="1", pdrop_keep_ratios="0.34", pdrop_depth=0)
    red = build_method(cfg).reduce(signals(5, q, k, visual, cfg, 1))
    torch.testing.assert_close(red.scores, torch.tensor([2.0, 4.0, 1.0]) / 9)
    assert red.kept.tolist() == [1]


@pytest.mark.parametrize("family", FAMILIES)
def test_first_stage_row_equals_eager_output_attentions(family):
    model, _ = model_for(family, "eager")
    x = inputs_for(family, [one_image(family)])
    with torch.no_grad():
        attentions = model(**x, output_attentions=True).attentions
    # hybrid decoders (Qwen3.5) return the softmax-attention layers' weights only
    linear = get_adapter(model).linear_attention_layers()
    attention_layers = [i for i in range(len(get_adapter(model).layers)) if i not in linear]
    attn = attentions[attention_layers.index(1)]  # (1, H, T, T), stock eager, layer 1
    visual = testing.patch_token_mask(model, x)[0]
    want = attn[0, :, -1, :].float().mean(0)[visual]
    model.set_attn_implementation("sdpa")
    cfg = pact.load_config("pdrop", pdrop_layers="1,2", pdrop_keep_ratios="0.5,0.25", pdrop_depth=0)
    pact.api.apply(model, cfg)
    with torch.no_grad():
        model(**x)
    st = pact.api.stats(model)
    first = st.records[0][0]
    torch.testing.assert_close(first.scores, want, rtol=1e-5, atol=1e-6)
    n = int(visual.sum())
    assert first.kept.tolist() == sorted(want.topk(int(n * 0.5)).indices.tolist())
    assert st.layers == [1, 2] and st.visual_after == [int(n * 0.25)]


def test_positions_are_renumbered_after_every_stage():
    # renumber (official): after each stage the reduced prompt is numbered contiguously (left padding
    # offsets a sample as the stock model does). (No cached == uncached check: without a cache every
    # step re-ranks with the newest token as "last instruction token", a different selection.)
    model, _ = model_for("llava")
    x = inputs_for("llava", [one_image("llava"), one_image("llava", 1, size=(64, 120))], padding_side="left")
    cfg = pact.load_config("pdrop", pdrop_layers="1,2", pdrop_keep_ratios="0.5,0.25", pdrop_depth=0)
    assert cfg.position_mode == "renumber"
    pact.api.apply(model, cfg)
    assert greedy(model, x, 2).shape == (2, 2)
    lay = pact.api.engine_of(model).layout
    for b in range(2):
        valid = lay.slot_orig[b] >= 0
        pos = lay.positions[0, b, valid]
        assert pos.tolist() == list(range(int(pos[0]), int(pos[0]) + int(valid.sum())))


def test_pdrop_refuses_bad_settings():
    with pytest.raises(ValueError, match="give one ratio per stage layer"):
        pact.load_config("pdrop", pdrop_keep_ratios="0.5,0.25")
    with pytest.raises(ValueError, match="strictly increasing"):
        pact.load_config("pdrop", pdrop_layers="8,8,24")
    with pytest.raises(ValueError, match="comma-separated fractions"):
        pact.load_config("pdrop", pdrop_keep_ratios="half,0.25,0.1")
    model, _ = model_for("llava")
    with pytest.raises(ValueError, match="but the model has only"):
        pact.api.apply(model, pact.load_config("pdrop", pdrop_depth=0))
    with pytest.raises(ValueError, match="set progressive=false"):
        pact.api.apply(model, pact.load_config("pdrop", progressive=True))


@pytest.mark.parametrize("name", ["pdrop", "v2drop"])
def test_budget_is_met_as_a_layer_mean_on_a_model(name):
    # the 4-layer tiny model: PyramidDrop's 8, 16, 24 of 32 scale to layers 1, 2, 3; V2Drop's 3 of 32
    # would land on layer 0 (refused: it needs a previous layer), so it gets absolute layers 1, 2, 3
    model, _ = model_for("qwen2_vl")
    x = inputs_for("qwen2_vl", [one_image("qwen2_vl", 0), one_image("qwen2_vl", 1, size=(64, 120))])
    extra = {"v2drop_layers": "1,2,3", "v2drop_depth": 0} if name == "v2drop" else {}
    cfg = pact.load_config(name, target_tokens=7, **extra)
    pact.api.apply(model, cfg)
    with torch.no_grad():
        model(**x)
    st = pact.api.stats(model)
    stages = [1, 2, 3]
    for b, before in enumerate(st.visual_before):
        counts = [
            len(step[b].kept) for step, layer in zip(st.records, st.layers, strict=True) if layer in stages
        ]
        assert layer_mean_from(before, counts, stages, 4) <= 7
        if name == "pdrop":  # the run follows the pyramid schedule solved for the budget
            assert counts == budget_counts(before, 7, stages, 4, lambda lam, n=before: pyramid(n, lam, 3))
        else:
            assert counts == budget_counts(
                before, 7, stages, 4, lambda lam, n=before: relative_counts(n, [lam] * 3)
            )
