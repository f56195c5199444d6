"""DivPrune: the greedy max-min rule on hand-made points, against a plain transcription of the
official ``DivPrune`` (full distance matrix), its keep count, and on models (the selection made on
the LLM input embeddings of the visual tokens, every family, positions renumbered)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAMILIES, inputs_for, model_for, one_image

import pact
import pact.api
from pact import testing
from pact.methods.divprune import divprune_count
from pact.ops.diversity import farthest_point_selection


def official_divprune(x: torch.Tensor, count: int) -> list[int]:
    """vbdi/divprune ``DivPrune`` in plain form: the whole cosine-distance matrix, the first pick by
    the second-smallest entry of each column, then the max over columns of the min over the selected
    rows (float32 here)."""
    unit = x.float() / x.float().norm(dim=1, keepdim=True)
    dist = 1.0 - unit @ unit.T
    picks: list[int] = []
    for i in range(count):
        scores = dist.topk(2, dim=0, largest=False).values[1] if i == 0 else dist[picks].min(dim=0).values
        picks.append(int(torch.argmax(scores)))
    return picks


def test_farthest_point_order_on_hand_made_points():
    # unit-ish 2-D points; cosine distances by hand:
    #   a=(1,0) b=(1,0.01) c=(0,1) d=(-1,0) e=(1,1)/sqrt2
    # nearest-neighbour distances: a,b ~5e-5; c -> e 0.293; d -> c 1.0; e -> c 0.293  => d first
    # then the farthest from {d}: a (2.0) beats b (1.99995); then from {d, a}: c (1.0) beats
    # e (0.293) and b (5e-5); then e, then b.
    pts = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [-1.0, 0.0], [0.7071, 0.7071]])
    assert farthest_point_selection(pts, 5).tolist() == [3, 0, 2, 4, 1]
    assert farthest_point_selection(pts, 3).sort().values.tolist() == [0, 2, 3]
    assert farthest_point_selection(pts, 0).tolist() == []
    assert farthest_point_selection(pts[:1], 1).tolist() == [0]
    # scale does not matter (cosine), the dtype is float32 inside
    assert farthest_point_selection(pts.double() * 7.0, 5).tolist() == [3, 0, 2, 4, 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_farthest_point_equals_the_official_full_matrix_rule(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(60, 16, generator=g)
    for count in (1, 6, 30, 60):
        assert farthest_point_selection(x, count).tolist() == official_divprune(x, count)


def test_ties_go_to_the_lower_index_and_duplicates_are_never_repeated():
    # Four copies of one direction and two of another: after the two directions are taken, every
    # remaining point is at distance 0 from a selected one; the official rule would pick index 0
    # again (its own distance is 0 too), here the lowest unselected index comes next.
    x = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 2)
    picked = farthest_point_selection(x, 6).tolist()
    assert picked[:2] == [0, 4]
    assert sorted(picked) == list(range(6)) and picked[2:] == [1, 2, 3, 5]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="count must be in"):
        farthest_point_selection(torch.randn(3, 2), 4)
    with pytest.raises(ValueError, match="features must be"):
        farthest_point_selection(torch.randn(3), 1)
    with pytest.raises(ValueError, match="non-finite"):
        farthest_point_selection(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1)


def test_keep_count_is_the_official_round_and_budgets_are_exact():
    cfg = pact.load_config("divprune")
    assert divprune_count(cfg, 576) == round(0.098 * 576) == 56
    assert divprune_count(cfg.replace(keep_ratio=0.5), 5) == 2  # Python's round: 2.5 -> 2
    assert divprune_count(cfg.replace(keep_ratio=0.5), 7) == 4  # 3.5 -> 4
    assert divprune_count(cfg.replace(target_tokens=10), 576) == 10
    assert divprune_count(cfg.replace(target_ratio=0.9), 576) == math.floor(576 * 0.1 + 1e-9)


def layer_input(model, x, layer: int) -> torch.Tensor:
    """(B, T, D) hidden states entering decoder ``layer`` of the stock model."""
    return testing.attention_qk(model, x, layer)["hidden"]


@pytest.mark.parametrize("family", FAMILIES)
def test_divprune_selects_on_the_llm_input_embeddings(family):
    model, _ = model_for(family)
    x = inputs_for(family, [one_image(family, 0), one_image(family, 1, size=(64, 120))], padding_side="left")
    embeds = layer_input(model, x, 0)
    visual = testing.patch_token_mask(model, x)
    cfg = pact.load_config("divprune", keep_ratio=0.3)
    pact.api.apply(model, cfg)
    with torch.no_grad():
        model(**x)
    st = pact.api.stats(model)
    assert st.layers == [0]
    for b in range(2):
        rows = embeds[b, visual[b]]
        want = sorted(official_divprune(rows, round(0.3 * rows.shape[0])))
        assert st.records[0][b].kept.tolist() == want


def test_divprune_at_a_decoder_layer_reads_that_layers_input():
    model, _ = model_for("qwen2_vl")
    x = inputs_for("qwen2_vl", [one_image("qwen2_vl")])
    hidden = layer_input(model, x, 1)
    visual = testing.patch_token_mask(model, x)
    pact.api.apply(model, pact.load_config("divprune", layer=1, target_tokens=5, position_mode="center"))
    with torch.no_grad():
        model(**x)
    st = pact.api.stats(model)
    assert st.layers == [1] and st.visual_after == [5]
    assert st.records[0][0].kept.tolist() == sorted(official_divprune(hidden[0, visual[0]], 5))


def test_divprune_renumbered_equals_the_stock_model_on_the_shortened_prompt():
    # layer 0 + renumber: what the official code computes (tokens removed before the LLM, positions
    # 0..R-1). The logits of the kept positions equal the stock model fed only the kept embeddings.
    model, _ = model_for("llava")
    x = inputs_for("llava", [one_image("llava")])
    embeds = layer_input(model, x, 0)
    pact.api.apply(model, pact.load_config("divprune", keep_ratio=0.25))
    with torch.no_grad():
        reduced = model(**x).logits
    kept = pact.api.stats(model).records[0][0].kept
    pact.api.remove(model)
    visual = testing.patch_token_mask(model, x)[0]
    vis_pos = visual.nonzero().flatten()
    keep = ~visual
    keep[vis_pos[kept]] = True
    with torch.no_grad():
        stock = model.model.language_model(inputs_embeds=embeds[:, keep]).last_hidden_state
        stock_logits = model.lm_head(stock)
    torch.testing.assert_close(reduced[:, keep], stock_logits, rtol=1e-4, atol=1e-4)


def test_divprune_refuses_settings_it_would_ignore():
    with pytest.raises(ValueError, match="pruning_selection='iqr'"):
        pact.load_config("divprune", pruning_selection="iqr")
    model, _ = model_for("llava")
    with pytest.raises(ValueError, match="layer=40 but the model has only"):
        pact.api.apply(model, pact.load_config("divprune", layer=40))


def test_divprune_selects_once_over_every_image_of_a_sample():
    model, _ = model_for("qwen2_vl")
    sample = {
        "question": "Compare the two pictures.",
        "images": [testing.sample_image(0, size=(96, 64)), testing.sample_image(1, size=(64, 120))],
    }
    x = inputs_for("qwen2_vl", [sample])
    embeds = layer_input(model, x, 0)
    visual = testing.patch_token_mask(model, x)
    pact.api.apply(model, pact.load_config("divprune", keep_ratio=0.25))
    with torch.no_grad():
        model(**x)
    rows = embeds[0, visual[0]]
    want = sorted(official_divprune(rows, round(0.25 * rows.shape[0])))
    assert pact.api.stats(model).records[0][0].kept.tolist() == want
