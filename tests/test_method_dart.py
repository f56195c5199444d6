"""DART: the pivot / least-similar rule on hand-made tokens (pivot order included), its counts, and on
models against a plain transcription of the official ``get_retained_image_token`` fed the model's own
layer K-1 keys and final-normed layer K-1 outputs."""

from __future__ import annotations

import pytest
import torch
from conftest import inputs_for, model_for, one_image

import pact
import pact.api
from pact import testing
from pact.methods.dart import dart_select, key_l1_norms, per_pivot_counts, pivot_order


def hand_made() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """9 tokens: text, 6 visual (v0..v5 at positions 1..6), 2 text. Keys (1 head, d=2) make v2
    (position 3) the visual pivot and position 8 the text pivot; features are 2-D directions."""
    keys = torch.zeros(9, 1, 2)
    keys[:, 0, 0] = torch.tensor([9.0, 1.0, 1.0, 5.0, 1.0, 1.0, 1.0, 2.0, 3.0])  # pos 0 is text before
    features = torch.tensor(
        [
            [0.3, 0.3],  # text before the image: never a pivot, never kept or dropped
            [1.0, 0.1],  # v0: close to the text pivot
            [-1.0, 0.0],  # v1: opposite the text pivot
            [0.0, 1.0],  # v2: the visual pivot
            [0.0, -1.0],  # v3: opposite the visual pivot
            [-1.0, -1.0],  # v4
            [1.0, 1.0],  # v5
            [0.5, 0.5],
            [1.0, 0.0],  # the text pivot
        ]
    )
    visual = torch.zeros(9, dtype=torch.bool)
    visual[1:7] = True
    return features, keys, visual


def test_pivots_take_their_least_similar_tokens_in_the_official_order():
    features, keys, visual = hand_made()
    # CPython iterates the set {3, 8} as [8, 3]: the text pivot (1, 0) goes first and takes the 2
    # least similar: v1 (cos -1) and v4 (-0.71); then the visual pivot (0, 1) takes v3 (-1) and
    # v0 (0.0995) of v0, v3, v5. Kept: v2 + v1, v4, v3, v0 -> visual indices 0..4 (v5 dropped).
    assert pivot_order([3, 8]) == [8, 3]
    cfg = pact.load_config("dart", dart_pivot_image_tokens=1, dart_pivot_text_tokens=1, keep_ratio=0.7)
    assert per_pivot_counts(cfg, 6, 1, 2) == [2, 2]  # int(6 * 0.7 / 2) = 2
    assert dart_select(features, keys, visual, cfg).tolist() == [0, 1, 2, 3, 4]
    # (image pivot first, the other order, would keep v2, v3, v4, v1, v5 and drop v0)


def test_budget_splits_the_rest_over_the_pivots_in_order():
    features, keys, visual = hand_made()
    cfg = pact.load_config("dart", dart_pivot_image_tokens=1, dart_pivot_text_tokens=1, target_tokens=4)
    # K = 4: the visual pivot v2, then 3 over 2 pivots: the text pivot (first) takes v1, v4; the
    # visual pivot takes v3.
    assert per_pivot_counts(cfg, 6, 1, 2) == [2, 1]
    assert dart_select(features, keys, visual, cfg).tolist() == [1, 2, 3, 4]
    assert dart_select(features, keys, visual, cfg.replace(target_tokens=1)).tolist() == [2]
    assert dart_select(features, keys, visual, cfg.replace(target_tokens=0)).tolist() == []


def test_official_counts():
    cfg = pact.load_config("dart")
    # Qwen2-VL scripts: TOKEN_TOPK = int(N (1 - 0.778) / 8)
    assert per_pivot_counts(cfg, 576, 4, 8) == [15] * 8
    # LLaVA scripts' max_num_trunction=128 (16 per pivot, 4 + 128 tokens) is the budget 132
    assert per_pivot_counts(cfg.replace(target_tokens=132), 576, 4, 8) == [16] * 8


def official_dart(last_layer_state, k_states, start, length, p_img, p_txt, topk):
    """ZichenWen1/DART ``get_retained_image_token`` (one sample): k_states (H, T, d), last_layer_state
    (T, D) = norm(layer K-1 output). Returns the kept visual positions, sorted."""
    any_states = k_states.permute(1, 0, 2).reshape(k_states.shape[1], -1)
    img = any_states[start : start + length]
    txt = any_states[start + length :]
    image_indices = (torch.norm(img, p=1, dim=-1).topk(p_img).indices + start).tolist()
    query_indices = (torch.norm(txt, p=1, dim=-1).topk(p_txt).indices + start + length).tolist()
    indices_set = set(image_indices + query_indices)
    valid = set(range(start, start + length)) - set(image_indices)
    valid_list = list(valid)
    for item in list(indices_set):
        vectors = last_layer_state[valid_list, :]
        cos = -torch.nn.functional.cosine_similarity(last_layer_state[item, :], vectors, dim=-1)
        real = [valid_list[i] for i in cos.topk(topk).indices]
        indices_set.update(real)
        valid.difference_update(real)
        valid_list = list(valid)
    indices_set.difference_update(query_indices)
    return sorted(indices_set)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl"])
def test_dart_is_the_official_rule_on_a_model(family):
    model, _ = model_for(family)
    x = inputs_for(family, [one_image(family)])
    keys = testing.attention_qk(model, x, 1)["keys"][0]  # (H_kv, T, d) as layer 1's attention got them
    hidden = testing.attention_qk(model, x, 2)["hidden"][0]  # the output of layer 1
    with torch.no_grad():
        state = model.model.language_model.norm(hidden)
    visual = testing.patch_token_mask(model, x)[0]
    pos = visual.nonzero().flatten()
    start, length = int(pos[0]), pos.numel()
    assert int(pos[-1]) == start + length - 1  # one contiguous image, as the official code assumes
    cfg = pact.load_config("dart", keep_ratio=0.6)
    topk = int(length * 0.6 / 8)
    assert topk >= 1
    want = official_dart(state, keys, start, length, 4, 4, topk)
    pact.api.apply(model, cfg)
    with torch.no_grad():
        model(**x)
    st = pact.api.stats(model)
    assert st.layers == [2]
    assert (pos[st.records[0][0].kept]).tolist() == want
    assert st.visual_after == [4 + 8 * topk]


def test_key_norm_reads_every_head():
    keys = torch.tensor([[[1.0, -2.0], [3.0, 0.0]], [[0.0, 0.0], [-1.0, 1.0]]])
    assert key_l1_norms(keys).tolist() == [6.0, 2.0]


def test_dart_refuses_bad_settings():
    with pytest.raises(ValueError, match="layer must be >= 1"):
        pact.load_config("dart", layer=0)
    with pytest.raises(ValueError, match="at least one pivot"):
        pact.load_config("dart", dart_pivot_image_tokens=0, dart_pivot_text_tokens=0)
    with pytest.raises(ValueError, match="dart_pivot_text_tokens"):
        pact.load_config("dart", dart_pivot_text_tokens=-1)
    model, _ = model_for("llava")
    with pytest.raises(ValueError, match="set progressive=false"):
        pact.api.apply(model, pact.load_config("dart", progressive=True))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_dart_keeps_original_positions(family):
    # the official code gathers the kept tokens' position ids (LLaVA: keep_indexs; Qwen: the (t, h, w)
    # triples): position_mode "center", the default of dart.json
    model, _ = model_for(family)
    x = inputs_for(family, [one_image(family)])
    pact.api.apply(model, pact.load_config("dart", keep_ratio=0.5))
    assert pact.load_config("dart").position_mode == "center"
    with torch.no_grad():
        model(**x)
    engine = pact.api.engine_of(model)
    lay = engine.layout
    valid = lay.slot_orig[0] >= 0
    original = engine.state.prefill.positions[:, 0]  # (A, T) the stock positions of the prompt
    assert torch.equal(lay.positions[:, 0, valid], original[:, lay.slot_orig[0, valid]])
    assert int(valid.sum()) < x["input_ids"].shape[1]
