"""The q/k contract of every adapter: the queries and keys an adapter recomputes (which EUTI,
DBDPC, FastV and the clustering baselines score and cluster) are exactly those the model's
attention function receives in a real forward: after the input norm, the projections, any per-head
q/k norms and RoPE. Compared against ``pact.testing.attention_qk``, which records what the stock
attention call was given, never against the adapter's own formula."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, inputs_for, model_for, one_image

from pact import testing
from pact.models import ADAPTERS, get_adapter
from pact.models.base import ModelAdapter
from pact.models.qwen2_vl import Qwen2VLAdapter


def contract_errors(adapter: ModelAdapter, inputs, layer_index: int) -> list[str]:
    """Differences between ``adapter.queries_keys`` and the real attention inputs at one layer."""
    real = testing.attention_qk(adapter.model, inputs, layer_index, adapter)
    layer = adapter.layers[layer_index]
    errors = []
    for b in range(real["hidden"].shape[0]):
        with torch.no_grad():
            _, _, q, k = adapter.queries_keys(
                layer, real["hidden"][b], real["cos"][b], real["sin"][b], True, True
            )
        for name, mine, theirs in (("queries", q, real["queries"][b]), ("keys", k, real["keys"][b])):
            theirs = theirs.transpose(0, 1)  # (H, T, d) -> (T, H, d)
            if mine.shape != theirs.shape or not torch.allclose(mine, theirs, rtol=1e-5, atol=1e-6):
                diff = (mine - theirs).abs().max().item() if mine.shape == theirs.shape else "shape"
                errors.append(f"layer {layer_index} sample {b} {name}: max |diff| {diff}")
    return errors


def test_every_adapter_has_a_tiny_model_in_this_test():
    assert set(ADAPTERS) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_queries_keys_are_what_attention_receives(family):
    model, _ = model_for(family)
    adapter = get_adapter(model)
    x = inputs_for(family, [one_image(family), {"question": "Only text here."}])
    for layer_index in (0, len(adapter.layers) - 1):
        assert contract_errors(adapter, x, layer_index) == []


def _tiny_qwen3_vl():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    cfg = Qwen3VLConfig(
        text_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "vocab_size": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "deepstack_visual_indexes": [0],
        },
        image_token_id=500,
        video_token_id=501,
    )
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    for layer in model.model.language_model.layers:  # non-trivial per-head norm weights
        layer.self_attn.q_norm.weight.data.uniform_(0.5, 1.5)
        layer.self_attn.k_norm.weight.data.uniform_(0.5, 1.5)
    return model


class _Qwen3Probe(Qwen2VLAdapter):
    """A Qwen3-VL adapter written as 'class names only' (the contract must hold through the base)."""

    family = "qwen3_vl_probe"
    class_names = ("Qwen3VLForConditionalGeneration",)


class _IgnoresQkNorms(_Qwen3Probe):
    """The old base formula: k_proj(input_layernorm(h)), q/k norms ignored."""

    def queries_keys(self, layer, hidden, cos, sin, want_queries, want_keys):
        x = layer.input_layernorm(hidden[None])
        d = self.head_dim(layer)
        q = layer.self_attn.q_proj(x).view(1, x.shape[1], -1, d).transpose(1, 2)
        k = layer.self_attn.k_proj(x).view(1, x.shape[1], -1, d).transpose(1, 2)
        qr, kr = self.apply_rotary_fn(layer)(q, k, cos[None], sin[None])
        return q.transpose(1, 2)[0], k.transpose(1, 2)[0], qr.transpose(1, 2)[0], kr.transpose(1, 2)[0]


def test_contract_catches_an_adapter_that_ignores_qk_norms():
    """Qwen3's attention normalises each head's q and k before RoPE. An adapter that forgets it
    runs without error; the contract test must fail on it, and pass with the base adapter."""
    model = _tiny_qwen3_vl()
    x = {"input_ids": torch.randint(0, 400, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    assert contract_errors(_Qwen3Probe(model), x, 1) == []
    errors = contract_errors(_IgnoresQkNorms(model), x, 1)
    assert len(errors) == 4 and all("max |diff|" in e for e in errors)


def test_unknown_attention_structure_is_refused_at_apply():
    import pact

    model, _ = model_for("qwen2_vl")
    attn = get_adapter(model).layers[2].self_attn
    attn.gate_proj = torch.nn.Linear(4, 4)  # something queries_keys does not model
    try:
        with pytest.raises(ValueError, match=r"layer 2's attention .* gate_proj .* does not model"):
            pact.apply(model, "pact", layer=1)
        assert "_pact_engine" not in model.__dict__
    finally:
        del attn.gate_proj


def test_adapter_can_declare_what_it_cannot_handle(monkeypatch):
    import pact

    model, _ = model_for("llava")
    adapter_cls = type(get_adapter(model))
    monkeypatch.setattr(adapter_cls, "unsupported_reason", lambda self: "sliding-window layers")
    with pytest.raises(
        ValueError, match="cannot reduce tokens in this LlavaForConditionalGeneration: sliding"
    ):
        pact.apply(model, "pact", layer=1)
    pact.apply(model, "no_reduction")  # nothing to reduce: accepted
    pact.remove(model)
