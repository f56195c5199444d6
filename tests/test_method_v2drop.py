"""V2Drop: the schedule (official counts, depth scaling, budgets), the variation rule on hand-made
hidden states, and on models (the first stage against the stock model's layer inputs)."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, inputs_for, model_for, one_image

import pact
import pact.api
from pact import testing
from pact.methods.base import Signals, build_method
from pact.ops.stages import budget_counts, layer_mean_from, relative_counts, scale_layers


def test_official_schedule_counts_and_depth_scaling():
    # LLaVA-1.5-7B: 576 -> 288 (layer 3) -> 144 (17) -> max(1, 0) = 1 (22)
    assert relative_counts(576, [0.5, 0.5, 0.0]) == [288, 144, 1]
    # Qwen2-VL port: q = 0.25, 0.05, 0
    assert relative_counts(1000, [0.25, 0.05, 0.0]) == [250, 12, 1]
    assert scale_layers([3, 17, 22], 32, 32) == [3, 17, 22]
    assert scale_layers([3, 17, 22], 32, 28) == [3, 15, 19]  # floor(l * 28 / 32 + 1/2)
    assert scale_layers([3, 17, 22], 32, 6) == [1, 3, 4]
    assert scale_layers([3, 16, 22], 0, 28) == [3, 16, 22]
    with pytest.raises(ValueError, match="only 6 decoder layers"):
        scale_layers([3, 17, 22], 0, 6)
    with pytest.raises(ValueError, match="strictly increasing"):
        scale_layers([1, 2], 32, 4)  # both land on layer 0


def test_budget_keeps_the_largest_schedule_not_above_the_layer_mean():
    # n = 10, stages before layers 1 and 2 of a 3-layer model, both keeping lambda of the current:
    # lambda = 0.6 -> [6, 3], mean (6 + 3) / 2 = 4.5 > 4; just below 0.6 -> [5, 2], mean 3.5.
    counts = budget_counts(10, 4, [1, 2], 3, lambda lam: relative_counts(10, [lam, lam]))
    assert counts == [5, 2]
    assert layer_mean_from(10, counts, [1, 2], 3) == 3.5
    # one stage: the mean is the count itself
    assert budget_counts(10, 4, [1], 3, lambda lam: relative_counts(10, [lam])) == [4]
    # V2Drop always keeps a token: a budget of 0 gives the smallest schedule
    assert budget_counts(10, 0, [1, 2], 3, lambda lam: relative_counts(10, [lam, lam])) == [1, 1]


def signals(layer: int, hidden: torch.Tensor, context: dict, cfg) -> Signals:
    """One sample whose tokens are all visual (hidden (N, D))."""
    n = hidden.shape[0]
    return Signals(
        layer=layer,
        sample=0,
        hidden=hidden,
        visual_mask=torch.ones(n, dtype=torch.bool),
        sizes=torch.ones(n),
        positions=torch.arange(n)[None],
        visual_index=torch.arange(n),
        config=cfg,
        qk_fn=lambda *a: (None, None, None, None),
        cos_sin_fn=lambda: (None, None),
        layer_input_fn=lambda j: None,
        context=context,
        num_layers=4,
    )


def test_the_largest_variation_across_the_previous_layer_stays():
    cfg = pact.load_config("v2drop", v2drop_layers="2", v2drop_keep_ratios="0.5", v2drop_depth=0)
    method = build_method(cfg)
    assert method.layers(4) == [1, 2]  # the identity step at L-1 records its inputs
    before = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
    # changes: |(3,4)| = 5, |(0,0.5)| = 0.5, |(1,0)| = 1, |(0,-6)| = 6 -> the top 2 are tokens 0 and 3
    after = before + torch.tensor([[3.0, 4.0], [0.0, 0.5], [1.0, 0.0], [0.0, -6.0]])
    context: dict = {}
    first = method.reduce(signals(1, before, context, cfg))
    assert first.kept.tolist() == [0, 1, 2, 3]
    red = method.reduce(signals(2, after, context, cfg))
    assert red.kept.tolist() == [0, 3]
    torch.testing.assert_close(red.scores, torch.tensor([5.0, 0.5, 1.0, 6.0]))


@pytest.mark.parametrize("family", FAMILIES)
def test_first_stage_is_the_variation_of_the_stock_models_layer_inputs(family):
    model, _ = model_for(family)
    x = inputs_for(family, [one_image(family)])
    prev = testing.attention_qk(model, x, 1)["hidden"][0]
    cur = testing.attention_qk(model, x, 2)["hidden"][0]
    visual = testing.patch_token_mask(model, x)[0]
    change = (cur[visual].float() - prev[visual].float()).norm(dim=-1)
    n = int(visual.sum())
    cfg = pact.load_config("v2drop", v2drop_layers="2,3", v2drop_keep_ratios="0.5,0", v2drop_depth=0)
    pact.api.apply(model, cfg)
    with torch.no_grad():
        model(**x)
    st = pact.api.stats(model)
    assert st.layers == [1, 2, 3]
    kept = st.records[1][0].kept
    assert kept.tolist() == sorted(change.topk(n // 2).indices.tolist())
    assert st.visual_after == [1]  # max(1, int(n/2 * 0)) at the last stage


def test_v2drop_refuses_bad_settings():
    with pytest.raises(ValueError, match="give one ratio per stage layer"):
        pact.load_config("v2drop", v2drop_keep_ratios="0.5")
    with pytest.raises(ValueError, match="strictly increasing"):
        pact.load_config("v2drop", v2drop_layers="5,4,6")
    with pytest.raises(ValueError, match="must be in"):
        pact.load_config("v2drop", v2drop_keep_ratios="0.5,1.5,0")
    with pytest.raises(ValueError, match="comma-separated layer indices"):
        pact.load_config("v2drop", v2drop_layers="3;17")
    model, _ = model_for("llava")
    with pytest.raises(ValueError, match="must be >= 1"):
        pact.api.apply(
            model,
            pact.load_config("v2drop", v2drop_layers="0,2", v2drop_keep_ratios="0.5,0.5", v2drop_depth=0),
        )
    with pytest.raises(ValueError, match="but the model has only"):
        pact.api.apply(model, pact.load_config("v2drop", v2drop_depth=0))
    with pytest.raises(ValueError, match="set progressive=false"):
        pact.api.apply(model, pact.load_config("v2drop", progressive=True))


def test_later_stage_reads_the_reduced_models_own_layer_change():
    # stages before layers 2 and 3 (absolute): at layer 3 the variation is between the hidden states
    # the REDUCED model feeds layer 3 and layer 2 (after the drop at 2), read here from the model's
    # own output_hidden_states: hidden_states[i] is the output of layer i - 1.
    model, _ = model_for("llava")
    x = inputs_for("llava", [one_image("llava")])
    cfg = pact.load_config("v2drop", v2drop_layers="2,3", v2drop_keep_ratios="0.5,0.5", v2drop_depth=0)
    pact.api.apply(model, cfg)
    with torch.no_grad():
        hs = model(**x, output_hidden_states=True).hidden_states
    st = pact.api.stats(model)
    assert st.layers == [1, 2, 3]
    visual = testing.patch_token_mask(model, x)[0]
    vis_pos = visual.nonzero().flatten()
    kept2 = st.records[1][0].kept  # original visual indices kept at layer 2
    keep = ~visual
    keep[vis_pos[kept2]] = True
    rows_after = torch.searchsorted(keep.nonzero().flatten(), vis_pos[kept2])  # their rows after layer 2
    prev = hs[2][0, vis_pos[kept2]]  # input of layer 2 (identity layout), rows of the kept tokens
    cur = hs[3][0, rows_after]  # input of layer 3
    change = (cur.float() - prev.float()).norm(dim=-1)
    want = kept2[change.topk(kept2.numel() // 2).indices].sort().values
    assert st.records[2][0].kept.tolist() == want.tolist()
