"""PACT through the engine on every family, attention-backend checks and bad inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, greedy, inputs_for, model_for, one_image

import pact
import pact.api
from pact import testing
from pact.engine import Engine
from pact.methods.base import build_method
from pact.methods.pact import Identity, Pact


def pact_cfg(**kw):
    return pact.load_config("configs/pact.json", layer_for_reduction=2, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_pact_reduces_and_reports_per_sample(family):
    model, _ = model_for(family)
    samples = [
        one_image(family, 0, (96, 64)),
        one_image(family, 1, (64, 120), "Describe the picture in one sentence."),
    ]
    x = inputs_for(family, samples)
    pact.api.apply(model, pact_cfg())
    cached = greedy(model, x)
    st = pact.api.stats(model)
    assert st.visual_before == testing.patch_token_mask(model, x).sum(1).tolist()
    assert all(0 < a < b for a, b in zip(st.visual_after, st.visual_before, strict=True))
    assert st.layers == [2] and 0 < st.reduction_ratio < 1
    for b, rec in enumerate(st.records[0]):
        assert rec.kept.numel() == st.visual_after[b]
        assert rec.scores is not None and rec.scores.shape == (st.visual_before[b],)
        members = rec.labels[rec.labels >= 0]
        assert torch.equal(torch.bincount(members, minlength=rec.kept.numel()).float(), rec.sizes)
        # each kept token (a cluster center) represents itself
        assert torch.equal(rec.labels[rec.kept], torch.arange(rec.kept.numel()))
    assert torch.equal(cached, greedy(model, x, use_cache=False))


def test_method_selection_from_config():
    assert isinstance(build_method(pact_cfg()), Pact)
    euti = build_method(pact_cfg(clustering="none"))
    assert euti.prune and not euti.cluster and not euti.needs_merge
    dbdpc = build_method(pact_cfg(pruning="none"))
    assert dbdpc.cluster and not dbdpc.prune
    assert isinstance(build_method(pact_cfg(pruning="none", clustering="none")), Identity)


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_pact_ablations_run(family):
    model, _ = model_for(family)
    x = inputs_for(family, [one_image(family)])
    n = testing.patch_token_mask(model, x).sum().item()
    for overrides, after in [
        ({"clustering": "none", "keep_ratio": 0.5}, int(n * 0.5)),  # EUTI only: exactly int(N * keep)
        ({"pruning": "none", "cutoff": 0.5}, None),  # DBDPC only
        ({"retrieval": False}, None),
    ]:
        pact.api.apply(model, pact_cfg(**overrides))
        greedy(model, x, n=2)
        st = pact.api.stats(model)
        assert st.visual_after[0] < n
        if after is not None:
            assert st.visual_after == [after]


# ---------------------------------------------------------------------------------------------------
# Attention backends


def test_flash_attention_with_proportional_attention_fails_at_apply():
    model, _ = model_for("qwen2_vl")
    text_cfg = model.config.get_text_config()
    text_cfg._attn_implementation = "flash_attention_2"  # not executed: the check happens at apply
    with pytest.raises(ValueError, match=r"proportional_attention=false.*attn_implementation='sdpa'"):
        pact.api.apply(model, pact_cfg())
    assert pact.api.engine_of(model) is None
    # without proportional attention (or with a pruning-only method) flash is accepted
    pact.api.apply(model, pact_cfg(proportional_attention=False))
    engine = pact.api.engine_of(model)
    assert engine.flash and not engine.proportional
    pact.api.apply(model, pact_cfg(clustering="none"))
    # the mask path for flash: a 2-D padding mask (or None without padding), never a float bias
    engine = pact.api.engine_of(model)
    bias = torch.tensor([[float("-inf"), 0.0, 0.7], [0.0, 0.0, 0.0]])
    valid = torch.isfinite(bias)
    mask = engine._mask(bias, valid, 3, torch.float32)
    assert mask.dtype == torch.bool and torch.equal(mask, valid)
    assert engine._mask(bias[1:], valid[1:], 3, torch.float32) is None
    text_cfg._attn_implementation = "sdpa"
    pact.api.apply(model, pact_cfg())
    mask = pact.api.engine_of(model)._mask(bias, valid, 3, torch.float32)
    assert mask.shape == (2, 1, 3, 3) and mask.dtype == torch.float32


def test_unknown_attention_backend_is_rejected():
    model, _ = model_for("llava")
    model.config.get_text_config()._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="set_attn_implementation"):
        pact.api.apply(model, pact_cfg())


# ---------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_every_visual_token_removed_still_gives_valid_output(family):
    model, _ = model_for(family)
    x = inputs_for(family, [one_image(family), {"question": "Only text here."}])
    pact.api.apply(model, pact_cfg(clustering="none", keep_ratio=0.0))
    with torch.no_grad():
        logits = model(**x).logits
    assert logits.shape[:2] == x["input_ids"].shape and torch.isfinite(logits).all()
    st = pact.api.stats(model)
    assert st.visual_after == [0, 0] and st.visual_before[0] > 0 and st.reduction_ratio == 1.0
    assert (st.records[0][0].labels == -1).all() and st.records[0][1] is None
    assert torch.equal(greedy(model, x, n=3), greedy(model, x, n=3, use_cache=False))


def test_one_visual_token(monkeypatch):
    model, _ = model_for("llava_onevision")
    x = inputs_for("llava_onevision", [one_image("llava_onevision")])
    pact.api.apply(model, pact_cfg())
    engine = pact.api.engine_of(model)
    stock = engine.adapter.candidate_mask

    def only_first(input_ids, inputs):
        mask = stock(input_ids, inputs)
        first = mask.float().argmax(1)
        out = torch.zeros_like(mask)
        out[torch.arange(mask.shape[0]), first] = True
        return out

    monkeypatch.setattr(engine.adapter, "candidate_mask", only_first)
    greedy(model, x, n=2)
    st = pact.api.stats(model)
    assert st.visual_before == [1] and st.visual_after in ([0], [1])


def test_nan_hidden_states_raise_a_clear_error():
    model, _ = model_for("internvl")
    x = inputs_for("internvl", [one_image("internvl")])
    pact.api.apply(model, pact_cfg())
    layer = model.model.language_model.layers[1]
    handle = layer.register_forward_hook(lambda mod, args, out: out * float("nan"))
    try:
        with pytest.raises(ValueError, match=r"non-finite.*layer 2"), torch.no_grad():
            model(**x)
    finally:
        handle.remove()


def test_no_visual_tokens_means_no_reduction():
    model, _ = model_for("qwen2_vl")
    x = inputs_for("qwen2_vl", [{"question": "Just text."}, {"question": "More text, longer prompt."}])
    with torch.no_grad():
        stock = model(**x).logits
        pact.api.apply(model, pact_cfg())
        assert torch.equal(model(**x).logits, stock)
    st = pact.api.stats(model)
    assert st.visual_before == [0, 0] and st.layers == [] and st.seconds_reducing == 0.0


def test_engine_state_is_per_call():
    model, _ = model_for("llava")
    pact.api.apply(model, pact_cfg())
    engine: Engine = pact.api.engine_of(model)
    greedy(model, inputs_for("llava", [one_image("llava")]), n=2)
    first = engine.state
    assert first.prefill.active and first.reduced.layout is not None
    assert engine.layout is first.reduced.layout
    with pytest.raises(AttributeError):
        engine.layout = None  # a read-only view for tests and tools
    greedy(model, inputs_for("llava", [{"question": "text"}]), n=2)
    assert engine.state is not first and not engine.state.prefill.active and engine.layout is None
