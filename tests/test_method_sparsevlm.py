"""SparseVLM: raters, counts, layers and DPC-KNN on hand-made inputs; the raters' attention slice
against the eager model's own attentions; recycling and order on a tiny LLaVA-1.5; refused settings."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import pact
import pact.api
from pact import testing
from pact.eval.metrics import layer_mean_visual
from pact.methods.sparsevlm import official_layers, stage_counts
from pact.ops.sparsevlm import dpc_knn, rank_count, rater_attention, recycle_count, text_raters


def test_text_raters_by_hand():
    visual = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    # logits rows: [2, 0, 0] and [0, 0, 2]; softmax over text then mean over visual:
    # token 0: (e^2 + 1) / 2 / (e^2 + 2), token 1: 1 / (e^2 + 2), token 2 like token 0
    e = math.exp(2.0)
    m = torch.tensor([(e / (e + 2) + 1 / (e + 2)) / 2, 1 / (e + 2), (e / (e + 2) + 1 / (e + 2)) / 2])
    assert text_raters(visual, text).tolist() == (m > m.mean()).tolist() == [True, False, True]
    assert text_raters(visual, text[:0]).tolist() == []


def test_counts_layers_and_recycling_sizes():
    assert stage_counts(576, [2, 6, 15], 32, 64, None) == [66, 30, 17]
    assert stage_counts(576, [2, 6, 15], 32, 192, None) == [300, 200, 110]
    assert stage_counts(288, [2, 6, 15], 32, 128, None) == [152, 55, 18]  # halves, rounded
    # a budget T: the layer-mean of the kept counts is T (up to rounding)
    counts = stage_counts(576, [3, 7, 16], 32, 64, 100)  # pruning after layers 2, 6, 15
    steps = [(3, counts[0]), (7, counts[1]), (16, counts[2])]
    assert abs(layer_mean_visual(576, steps, 32) - 100) < 1
    assert official_layers("2,6,15", 32, 32) == [2, 6, 15]
    assert official_layers("2,6,15", 28, 32) == [2, 5, 13]
    assert official_layers("2,6,15", 6, 32) == [0, 1, 3]
    with pytest.raises(ValueError, match="the model has only 6 decoder layers"):
        official_layers("2,6,15", 6, 0)
    with pytest.raises(ValueError, match="needs the next layer"):
        official_layers("1,5", 6, 0)
    assert recycle_count(510) == (154, 16)  # int(0.3 * 510) + 1, int(154 / 10) + 1
    assert recycle_count(36) == (11, 2)
    assert recycle_count(1) == (1, 1)
    assert recycle_count(0) == (0, 0)


def test_rank_count():
    relation = torch.tensor([[0.1, 0.2, 0.3], [0.2, 0.4, 0.6]])  # rank 1
    assert rank_count(relation, 13.5) == (13, 1)
    assert rank_count(torch.eye(3), 2.0, 0.5) == (6, 3)


def test_dpc_knn_separates_two_groups():
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0], [5.1, 5.0]])
    centers, labels = dpc_knn(x, 2)
    assert labels[:3].unique().numel() == 1 and labels[3:].unique().numel() == 1
    assert int(labels[0]) != int(labels[3])
    assert labels[centers].tolist() == [0, 1]
    # every point has one neighbour 0.1 away (k = 2 nearest, itself included): equal densities, so
    # the lower index counts as denser; point 0 is then the densest (parent distance = the largest
    # distance), point 3's nearest denser point is in the other group: centers 0 and 3
    assert centers.tolist() == [0, 3]
    _, one_l = dpc_knn(x, 1)
    assert one_l.tolist() == [0] * 5


def test_rater_attention_is_the_causal_softmax_by_hand():
    q = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]])  # (T=3, H=1, d=2)
    k = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[0.0, 0.0]]])
    probs = rater_attention(q, k, torch.tensor([1, 2]), scale=1.0)
    # row 1 sees keys 0, 1: logits 0, 1; row 2 sees keys 0..2: logits 1, 1, 0
    e = math.e
    torch.testing.assert_close(probs[0], torch.tensor([1 / (1 + e), e / (1 + e), 0.0]))
    torch.testing.assert_close(probs[1], torch.tensor([e, e, 1.0]) / (2 * e + 1))
    bias = torch.tensor([0.0, math.log(2.0), 0.0])  # a key of size 2 counts twice
    torch.testing.assert_close(
        rater_attention(q, k, torch.tensor([1]), bias, scale=1.0)[0],
        torch.tensor([1.0, 2 * e, 0.0]) / (1 + 2 * e),
    )


# ---------------------------------------------------------------------------------------------------
# on a tiny LLaVA-1.5 with 4 decoder layers (pruning the outputs of layers 1 and 2)

_MODELS: dict[str, Any] = {}


def tiny_llava() -> tuple[Any, Any]:
    if "llava" not in _MODELS:
        _MODELS["llava"] = testing.tiny_pair("llava", num_hidden_layers=4)
    return _MODELS["llava"]


@pytest.fixture(autouse=True)
def _stock():
    yield
    for model, _ in _MODELS.values():
        pact.api.remove(model)
        model.set_attn_implementation("sdpa")


def two_images() -> Any:
    _, processor = tiny_llava()
    samples = [
        {"question": "What is in the image?", "images": [testing.sample_image(0, size=(96, 64))]},
        {"question": "Describe it in one sentence.", "images": [testing.sample_image(1, size=(64, 120))]},
    ]
    return testing.build_inputs("llava", processor, samples, padding_side="left")


CFG = {"sparsevlm_layers": "1,2", "sparsevlm_reference_depth": 0, "sparsevlm_budget": 64}


def spy(model: Any) -> list[tuple[Any, Any, Any]]:
    """(signals, relation, reduction) of every reduce call of the applied method."""
    method = pact.api.engine_of(model).method
    out: list[tuple[Any, Any, Any]] = []
    reduce, scores = method.reduce, method.scores
    last: dict[str, Any] = {}

    def scores_spy(signals: Any) -> Any:
        last["relation"] = scores(signals)
        return last["relation"]

    def reduce_spy(signals: Any) -> Any:
        red = reduce(signals)
        out.append((signals, last["relation"], red))
        return red

    method.scores, method.reduce = scores_spy, reduce_spy
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_rater_slice_equals_the_eager_models_attention(attn):
    model, _ = tiny_llava()
    x = two_images()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        stock = model(**x, output_attentions=True).attentions[1]  # (B, H, T, T), layer 1
    model.set_attn_implementation(attn)
    pact.api.apply(model, pact.load_config("sparsevlm", **CFG))
    calls = spy(model)
    with torch.no_grad():
        out = model(**x, output_attentions=attn == "eager")
    visual = testing.patch_token_mask(model, x)
    first = [c for c in calls if c[0].layer == 2]  # layer 1's output is pruned before layer 2
    assert len(first) == 2
    for b, (signals, relation, _) in enumerate(first):
        valid = x["attention_mask"][b].bool()
        st = signals.context["sparsevlm"][b]
        t = int(valid.sum())
        rows = (st["raters"] + (t - st["text"])).tolist()
        assert rows, "no rater"
        expected = stock[b][:, valid][:, :, valid].mean(0)[rows][:, visual[b][valid]]
        torch.testing.assert_close(relation, expected.float(), rtol=1e-4, atol=1e-6)
    if attn != "eager":
        return
    # second stage: layer 2 runs on the reduced, left-padded batch; its input was recorded by the
    # method's hook; the rows are the eager model's own attention over the reduced slots
    second = [c for c in calls if c[0].layer == 3]
    assert len(second) == 2
    for b, (signals, relation, _) in enumerate(second):
        st = signals.context["sparsevlm"][b]
        t = signals.visual_mask.shape[0]
        rows = (st["raters"] + (t - st["text"])).tolist()
        layer2 = out.attentions[2][b][:, -t:, -t:].mean(0)  # the sample's slots are the last t
        expected = layer2[rows][:, signals.visual_mask]
        torch.testing.assert_close(relation, expected.float(), rtol=1e-4, atol=1e-6)


def test_counts_recycling_and_order_on_llava():
    model, _ = tiny_llava()
    x = two_images()
    pact.api.apply(model, pact.load_config("sparsevlm", **CFG))
    calls = spy(model)
    with torch.no_grad():
        logits = model(**x).logits
    assert bool(torch.isfinite(logits).all())
    st = pact.api.stats(model)
    assert st.layers == [2, 3]  # the outputs of layers 1 and 2 are pruned
    for signals, _, red in calls:
        n = signals.num_visual
        n0 = signals.context["sparsevlm"][signals.sample]["n"]
        stage = [2, 3].index(signals.layer)
        keep = min(stage_counts(n0, [2, 3], 4, 64, None)[stage], n - 1)
        _, clusters = recycle_count(n - keep)
        assert red.kept.numel() == keep + clusters
        hidden = signals.hidden[signals.visual_mask].float()
        recycled = [r for r in range(red.kept.numel()) if int((red.labels == r).sum()) > 1]
        placed = red.kept[red.order] if red.order is not None else red.kept
        # the kept tokens come first in index order, the recycled ones after them
        assert placed[:keep].tolist() == sorted(placed[:keep].tolist())
        for r in recycled:
            members = (red.labels == r).nonzero().squeeze(1)
            torch.testing.assert_close(red.hidden[r], hidden[members].mean(0), rtol=1e-5, atol=1e-6)
            assert float(red.sizes[r]) == float(signals.sizes[members].sum())
    # two stages use the first two schedule entries: round(66 * 36 / 576) = 4 and round(30 * 36 / 576)
    # = 2 kept; the second stage prunes 4 (its 6 = 4 + 2 recycled of stage 1, minus 2), recycles the
    # best int(0.3 * 4) + 1 = 2 into int(2 / 10) + 1 = 1 token
    assert st.visual_after == [2 + 1, 2 + 1]


def test_rank_count_and_no_recycling_run():
    model, _ = tiny_llava()
    x = two_images()
    pact.api.apply(
        model, pact.load_config("sparsevlm", **CFG, sparsevlm_count="rank", sparsevlm_rank_scale=1.0)
    )
    with torch.no_grad():
        model(**x)
    after_rank = pact.api.stats(model).visual_after
    pact.api.remove(model)
    pact.api.apply(model, pact.load_config("sparsevlm", **CFG, sparsevlm_recycle=False))
    with torch.no_grad():
        model(**x)
    st = pact.api.stats(model)
    assert st.visual_after == [2, 2]  # no recycled token: round(30 * 36 / 576) = 2
    assert all(a < 36 for a in after_rank)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="sparsevlm_layers"):
        pact.load_config("sparsevlm", sparsevlm_layers="2;6")
    with pytest.raises(ValueError, match="sparsevlm_count"):
        pact.load_config("sparsevlm", sparsevlm_count="adaptive")
    model, _ = tiny_llava()
    with pytest.raises(ValueError, match="sparsevlm_budget=100"):
        pact.api.apply(model, pact.load_config("sparsevlm", sparsevlm_budget=100))
    with pytest.raises(ValueError, match="only 4 decoder layers"):  # 2, 6, 15 as given
        pact.api.apply(model, pact.load_config("sparsevlm", sparsevlm_reference_depth=0))


def test_a_budget_sets_the_layer_mean_of_the_kept_tokens():
    model, _ = tiny_llava()
    x = two_images()
    cfg = pact.load_config("sparsevlm", **CFG, target_tokens=24, sparsevlm_recycle=False)
    pact.api.apply(model, cfg)
    with torch.no_grad():
        model(**x)
    st = pact.api.stats(model)
    for b, n in enumerate(st.visual_before):  # layers 0..3; pruning before layers 1 and 3
        counts = [rec[b].kept.numel() for rec in st.records]
        assert abs(layer_mean_visual(n, [(2, counts[0]), (3, counts[1])], 4) - 24) <= 0.5
