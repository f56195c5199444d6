"""Qwen3.5's own hard part: the hybrid decoder (Gated DeltaNet linear-attention layers between
softmax-attention layers). The family-parametrized suites run every other engine guarantee on it.

- A linear layer >= L runs on the reduced sequence as if the removed tokens had never been there:
  its conv and recurrent states after a reduced prefill equal those of the stock text model run on
  the physically shortened input (an independent construction), so decoding continues from them.
- Left padding never enters a linear layer's conv/recurrence: the engine gives it the reduced
  layout's 2-D padding mask (and, in cached steps, the stock one); its states in a batch equal
  those of the sample alone.
- Proportional attention acts in the full-attention layers only (no softmax in linear layers).
- Queries/keys at a linear layer are the DeltaNet's own (tests/test_qk_contract.py checks them
  against the kernel's inputs; here: an adapter that skips the convolution fails that contract).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import pytest
import torch
from conftest import ATTENTION, PairMerge, greedy, inputs_for, model_for, one_image

import pact
import pact.api
from pact import testing
from pact.methods.base import Method, Signals
from pact.models import get_adapter
from pact.models.qwen3_5 import Qwen3_5Adapter
from pact.ops.reduction import Reduction

FAMILY = "qwen3_5"
BOTH = ("qwen3_5", "qwen3_5_moe")  # the MoE variant: same decoder and tower, expert MLPs


class DropOdd(Method):
    """Test method: keep the even visual tokens, prune (drop) the odd ones."""

    name = "drop_odd"

    def reduce(self, s: Signals) -> Reduction:
        n = s.num_visual
        idx = torch.arange(n, device=s.hidden.device)
        kept = idx[::2]
        return Reduction(
            kept=kept,
            sizes=s.sizes[kept].float(),
            hidden=None,
            labels=torch.where(idx % 2 == 0, idx // 2, -1),
        )


def apply_method(model: Any, method_cls: type, layer: int, **config: Any) -> Method:
    c = pact.load_config(None, layer=layer, pruning="none", clustering="none", **config)
    method = method_cls(c)
    pact.api.apply(model, c, method=method)
    return method


def two_samples() -> list[dict]:
    return [
        one_image(FAMILY, 0, (96, 64), "What is in the image?"),
        one_image(FAMILY, 1, (64, 120), "Describe the picture in one sentence."),
    ]


def recorder(store: dict, key: Any, what: Any) -> Any:
    """A forward (pre-)hook storing ``what(args, kwargs_or_output)`` under ``key`` once; returns None."""

    def hook(module: Any, args: tuple, *rest: Any) -> None:
        store.setdefault(key, what(args, *rest))

    return hook


def linear_states(cache: Any, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(conv state (B, C, K), recurrent state (B, H, d_k, d_v)) of linear layer i."""
    return cache.layers[i].conv_states[0].clone(), cache.layers[i].recurrent_states[0].clone()


# ---------------------------------------------------------------------------------------------------
# The architecture the adapter and the engine rely on (transformers 5.23)


def test_layer_kinds_cache_layout_and_linear_layer_signature():
    model, _ = model_for(FAMILY)
    adapter = get_adapter(model)
    assert isinstance(adapter, Qwen3_5Adapter)
    assert type(get_adapter(model_for("qwen3_5_moe")[0])).__name__ == "Qwen3_5MoeAdapter"
    assert adapter.linear_attention_layers() == frozenset({0, 2})  # the tiny model: every 2nd is full
    assert adapter.full_attention_layers() == [1, 3]
    for i, layer in enumerate(adapter.layers):
        assert hasattr(layer, "linear_attn") == (i in {0, 2}) != hasattr(layer, "self_attn")
    params = inspect.signature(type(adapter.layers[0].linear_attn).forward).parameters
    assert {"hidden_states", "cache_params", "attention_mask"} <= set(params)
    # the stock model reads its cache length (positions, masks) from the first attention layer
    x = inputs_for(FAMILY, [one_image(FAMILY)])
    apply_method(model, PairMerge, layer=0)
    engine = pact.api.engine_of(model)
    assert engine.linear_layers == {0, 2} and engine.length_layer == 1
    with torch.no_grad():
        cache = model(**x, use_cache=True).past_key_values
    assert cache.get_seq_length() == cache.get_seq_length(1) < x["input_ids"].shape[1]
    # no DeepStack in Qwen3.5: nothing is injected after the first decoder layers
    assert not hasattr(model.config.vision_config, "deepstack_visual_indexes")
    # real checkpoints: three linear layers for every full-attention layer
    real = type(model.config.text_config)(num_hidden_layers=8)
    assert real.layer_types == ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + [
        "full_attention"
    ]


def test_real_layer_pattern_and_partial_rotary_run():
    """The released 3:1 pattern (full attention at 3, 7, ...) and RoPE on a quarter of each head:
    a reduction at a linear layer followed by two more linear layers, cached == uncached."""
    model, processor = testing.tiny_pair(
        FAMILY,
        text_overrides={
            "layer_types": ["linear_attention"] * 3 + ["full_attention"],
            "head_dim": 32,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 1, 1],
                "mrope_interleaved": True,
                "partial_rotary_factor": 0.25,
            },
        },
    )
    assert get_adapter(model).full_attention_layers() == [3]
    x = testing.build_inputs(FAMILY, processor, two_samples())
    pact.api.apply(model, "pact", layer=1)
    cached = greedy(model, x, n=3)
    assert torch.equal(cached, greedy(model, x, n=3, use_cache=False))
    assert sum(pact.api.stats(model).visual_after) < sum(pact.api.stats(model).visual_before)


# ---------------------------------------------------------------------------------------------------
# Linear layers >= L see the reduced sequence: their states are those of the shortened input


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", BOTH)
def test_reduced_prefill_states_equal_the_stock_model_on_the_shortened_input(family, attn):
    """Pruning at layer 0 (a linear layer): every layer's cache (conv + recurrent states of the
    linear layers, keys/values of the attention layers) equals the stock text model's on the input
    with the pruned tokens physically removed (kept tokens keep their M-RoPE ids)."""
    model, _ = model_for(family, attn)
    x = inputs_for(family, [one_image(family)])
    apply_method(model, DropOdd, layer=0)
    with torch.no_grad():
        cache = model(**x, use_cache=True).past_key_values
    record = pact.api.stats(model).records[0][0]
    pact.api.remove(model)

    core = model.model
    embeds = []
    handle = core.language_model.register_forward_pre_hook(
        lambda m, a, k: embeds.append(k["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        model(**x)
    handle.remove()
    visual = testing.patch_token_mask(model, x)[0]
    pos = visual.nonzero().flatten()
    removed = set(pos[[j for j in range(len(pos)) if j not in set(record.kept.tolist())]].tolist())
    keep = torch.tensor([t for t in range(x["input_ids"].shape[1]) if t not in removed])
    rope, _ = core.get_rope_index(
        x["input_ids"], mm_token_type_ids=x["mm_token_type_ids"], image_grid_thw=x["image_grid_thw"]
    )
    from transformers import DynamicCache

    short_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        core.language_model(
            inputs_embeds=embeds[0][:, keep],
            position_ids=rope[:, :, keep],
            past_key_values=short_cache,
            use_cache=True,
        )
    for i in (0, 2):
        for mine, theirs in zip(linear_states(cache, i), linear_states(short_cache, i), strict=True):
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)
    for i in (1, 3):
        torch.testing.assert_close(cache.layers[i].keys, short_cache.layers[i].keys, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_linear_layer_states_in_a_left_padded_batch_equal_each_sample_alone(attn, layer):
    """The conv and recurrent state of every linear layer >= L after a reduced, re-left-padded
    prefill are the sample's own (padding zeroed by the reduced layout's 2-D mask), and the
    linear layers receive exactly that mask."""
    model, _ = model_for(FAMILY, attn)
    samples = [*two_samples(), {"question": "Is there a red circle on the left? Answer yes or no."}]
    x = inputs_for(FAMILY, samples)
    apply_method(model, PairMerge, layer=layer)
    masks: dict[int, Any] = {}
    layers = get_adapter(model).layers
    handles = [
        layers[i].linear_attn.register_forward_pre_hook(
            recorder(masks, i, lambda a, k: k.get("attention_mask")), with_kwargs=True
        )
        for i in (0, 2)
    ]
    try:
        with torch.no_grad():
            batch_cache = model(**x, use_cache=True).past_key_values
    finally:
        for h in handles:
            h.remove()
    lay = pact.api.engine_of(model).layout
    for i in (0, 2):
        if i >= layer:
            assert torch.equal(masks[i], lay.slot_orig >= 0)
        else:
            assert torch.equal(masks[i], x["attention_mask"])  # stock
    for b, sample in enumerate(samples):
        with torch.no_grad():
            alone = model(**inputs_for(FAMILY, [sample]), use_cache=True).past_key_values
        for i in (0, 2):
            for mine, theirs in zip(linear_states(batch_cache, i), linear_states(alone, i), strict=True):
                torch.testing.assert_close(mine[b], theirs[0], atol=1e-5, rtol=1e-4)


def test_linear_layers_get_the_stock_mask_in_cached_steps():
    """A multi-token cached step on a left-padded batch (chunked continuation): the linear layers get
    the step's 2-D padding mask whatever the engine did to the text-level mask (reduction at layer
    0 replaces it with a 4-D one), so the padded new token never enters the recurrence; a
    single-token step gets None, as stock."""
    model, _ = model_for(FAMILY)
    x = inputs_for(FAMILY, two_samples())
    seen: list[Any] = []
    layer2 = get_adapter(model).layers[2].linear_attn
    handle = layer2.register_forward_pre_hook(
        lambda m, a, k: seen.append(k.get("attention_mask")), with_kwargs=True
    )
    apply_method(model, PairMerge, layer=0)
    try:
        with torch.no_grad():
            out = model(**x, use_cache=True)
            step = torch.tensor([[5, 7], [6, 8]])
            mask = torch.cat([x["attention_mask"], torch.tensor([[0, 1], [1, 1]])], dim=1)
            model(
                input_ids=step,
                attention_mask=mask,
                past_key_values=out.past_key_values,
                mm_token_type_ids=torch.zeros_like(step),
                use_cache=True,
            )
            one = torch.tensor([[9], [9]])
            model(
                input_ids=one,
                attention_mask=torch.cat([mask, torch.ones_like(one)], dim=1),
                past_key_values=out.past_key_values,
                mm_token_type_ids=torch.zeros_like(one),
                use_cache=True,
            )
    finally:
        handle.remove()
    assert torch.equal(seen[1], torch.tensor([[0, 1], [1, 1]]))
    assert seen[2] is None


@pytest.mark.parametrize("layer", [0, 1])
def test_cached_step_positions_continue_the_unreduced_timeline(layer):
    """The stock model reads its cache length from the first attention layer (1). With a reduction
    at or before it, a cached call without attention_mask/position_ids would restart its positions
    at the reduced length; the engine supplies the unreduced timeline's ids instead, so the step
    equals the same step given the 2-D mask (positions from the mask's cumsum, stock)."""
    model, _ = model_for(FAMILY)
    x = inputs_for(FAMILY, [one_image(FAMILY)])
    apply_method(model, PairMerge, layer=layer)
    step = torch.tensor([[5]])
    logits = []
    for with_mask in (True, False):
        with torch.no_grad():
            cache = model(**x, use_cache=True).past_key_values
            assert cache.get_seq_length() < x["input_ids"].shape[1]  # layer 1's cache is reduced
            kwargs = {"attention_mask": torch.ones(1, x["input_ids"].shape[1] + 1)} if with_mask else {}
            out = model(input_ids=step, past_key_values=cache, use_cache=True, **kwargs)
        logits.append(out.logits)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# Proportional attention: full-attention layers only


@pytest.mark.parametrize("attn", ATTENTION)
def test_proportional_attention_acts_in_full_attention_layers_only(attn):
    """Merging at layer 0 with and without proportional attention: the linear layer 0 computes the
    same output (no softmax, no bias, never given ``pact_key_bias``), the first full-attention layer
    (1) is where the outputs part; its mask carries log(2) on each merged key."""
    model, _ = model_for(FAMILY, attn)
    x = inputs_for(FAMILY, [one_image(FAMILY)])
    layers = get_adapter(model).layers
    outs: dict[bool, dict[int, torch.Tensor]] = {}
    linear_kwargs: list[set] = []
    for proportional in (True, False):
        got: dict[int, torch.Tensor] = {}
        apply_method(model, PairMerge, layer=0, proportional_attention=proportional)
        pact.api.engine_of(model).set_fast_sdpa(False)  # read the explicit masks
        handles = [
            layer.register_forward_hook(recorder(got, i, lambda a, o: o.clone()))
            for i, layer in enumerate(layers)
        ]
        handles += [
            layers[i].register_forward_pre_hook(
                lambda m, a, k: linear_kwargs.append(set(k)), with_kwargs=True
            )
            for i in (0, 2)
        ]
        masks: dict[int, torch.Tensor] = {}
        handles.append(
            layers[1].register_forward_pre_hook(
                recorder(masks, 1, lambda a, k: k["attention_mask"]), with_kwargs=True
            )
        )
        try:
            with torch.no_grad():
                model(**x)
        finally:
            for h in handles:
                h.remove()
        outs[proportional] = got
        lay = pact.api.engine_of(model).layout
        merged = lay.visual & (lay.sizes == 2)
        last = masks[1][:, 0, -1].float()
        expected = math.log(2.0) if proportional else 0.0
        assert torch.allclose(last[merged], torch.full_like(last[merged], expected), atol=1e-2)
        pact.api.remove(model)
    assert torch.equal(outs[True][0], outs[False][0])
    assert not torch.allclose(outs[True][1], outs[False][1])
    assert all("pact_key_bias" not in k for k in linear_kwargs)


def test_fast_sdpa_path_gives_the_bias_to_attention_layers_only():
    model, _ = model_for(FAMILY, "sdpa")
    x = inputs_for(FAMILY, two_samples())
    apply_method(model, PairMerge, layer=0)
    seen: dict[int, set] = {}
    layers = get_adapter(model).layers
    handles = [
        layer.register_forward_pre_hook(recorder(seen, i, lambda a, k: set(k)), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            model(**x)
    finally:
        for h in handles:
            h.remove()
    assert ["pact_key_bias" in seen[i] for i in range(4)] == [False, True, False, True]


# ---------------------------------------------------------------------------------------------------
# Queries and keys at a linear layer


class _SkipsTheConvolution(Qwen3_5Adapter):
    """A wrong reading of a linear layer: the projections without the causal convolution."""

    def _linear_queries_keys(self, layer, hidden):
        net = layer.linear_attn
        mixed = net.in_proj_qkv(layer.input_layernorm(hidden[None]))[0]
        q, k, _ = torch.split(mixed, [net.key_dim, net.key_dim, net.value_dim], dim=-1)
        q = torch.nn.functional.normalize(q.reshape(q.shape[0], -1, net.head_k_dim), dim=-1)
        k = torch.nn.functional.normalize(k.reshape(k.shape[0], -1, net.head_k_dim), dim=-1)
        return q, k


def test_linear_layer_qk_contract_catches_a_wrong_reading():
    from test_qk_contract import contract_errors

    model, _ = model_for(FAMILY)
    x = inputs_for(FAMILY, [one_image(FAMILY)])
    assert contract_errors(Qwen3_5Adapter(model), x, 0) == []
    assert contract_errors(Qwen3_5Adapter(model), x, 2) == []
    errors = contract_errors(_SkipsTheConvolution(model), x, 0)
    assert len(errors) == 2 and all("max |diff|" in e for e in errors)


def test_linear_layer_qk_have_no_rope_and_unit_norm():
    model, _ = model_for(FAMILY)
    adapter = get_adapter(model)
    hidden = torch.randn(7, 64)
    cos, sin = torch.ones(7, 8), torch.zeros(7, 8)
    with torch.no_grad():
        q, k, q_rope, k_rope = adapter.queries_keys(adapter.layers[0], hidden, cos, sin, True, True)
    assert q.shape == k.shape == (7, 2, 16)
    assert torch.equal(q, q_rope) and torch.equal(k, k_rope)
    torch.testing.assert_close(k.norm(dim=-1), torch.ones(7, 2), atol=1e-4, rtol=0)
    # the causal convolution: a token's q/k depend on the tokens before it, never after
    with torch.no_grad():
        q5, _, _, _ = adapter.queries_keys(adapter.layers[0], hidden[:5], None, None, True, False)
    torch.testing.assert_close(q5, q[:5])


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_pact_runs_at_linear_and_full_attention_layers(layer):
    model, _ = model_for(FAMILY)
    x = inputs_for(FAMILY, two_samples())
    pact.api.apply(model, "pact", layer=layer)
    cached = greedy(model, x, n=3)
    st = pact.api.stats(model)
    assert st.layers == [layer] and sum(st.visual_after) < sum(st.visual_before)
    assert torch.equal(cached, greedy(model, x, n=3, use_cache=False))


# ---------------------------------------------------------------------------------------------------
# Inputs


def test_placeholder_ids_outside_the_processor_s_visual_spans_are_no_candidates():
    """A <|video_pad|> id typed as text (mm_token_type_ids 0: e.g. generated, then fed back by an
    uncached generate) receives no vision feature: it is not a reduction candidate."""
    model, _ = model_for(FAMILY)
    x = inputs_for(FAMILY, [one_image(FAMILY)])
    ids = torch.cat([x["input_ids"], torch.tensor([[testing.token_id("<|video_pad|>")]])], dim=1)
    types = torch.cat([x["mm_token_type_ids"], torch.zeros(1, 1, dtype=x["mm_token_type_ids"].dtype)], dim=1)
    adapter = get_adapter(model)
    mask = adapter.candidate_mask(ids, {"mm_token_type_ids": types})
    assert int(mask.sum()) == int((x["input_ids"] == testing.token_id("<|image_pad|>")).sum())
    assert not bool(mask[0, -1])
