"""The softmax scale of the scores is the model's own (``self_attn.scaling``), not 1/sqrt(head_dim).

Every method that computes attention probabilities itself (EUTI; FastV's two variants; PDrop's and
HoliTom's last-token rows; SparseVLM's rater rows) reads the scale of the layer whose queries/keys it
uses, ``ModelAdapter.attention_scale`` through ``Signals.attention_scale(j)``. Checked against what the
model computes, on models whose scale differs from 1/sqrt(head_dim): a tiny Gemma 3 with
``query_pre_attn_scalar`` != head_dim (what Gemma 3 27B has: 168 vs 128) and the tiny Qwen2.5-VL with
every layer's ``self_attn.scaling`` set to another value. Each comparison also checks that the
default scale would have given another answer, so the tests fail without the scale. Where the scale
is exactly head_dim ** -0.5 (every registered family) the adapter answers None and the ops keep
their default arithmetic, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from conftest import FAMILIES, inputs_for, model_for, one_image
from test_family_gemma3 import (
    IMG,
    WINDOW,
    batch,
    greedy_cached,
    greedy_uncached,
    install,
    prompt,
    tiny_gemma3,
)
from test_method_holitom import video_sample

import pact
import pact.api
from pact import testing
from pact.models import get_adapter
from pact.models.gemma3 import Gemma3Adapter
from pact.ops.scoring import euti_scores, fastv_scores
from pact.ops.sparsevlm import rater_attention

ROWS = {"rtol": 1e-4, "atol": 1e-6}  # float32 attention rows: ours vs the eager model's


def scaled_gemma3(impl: str, *, head_dim: int = 16, scalar: int = 4, layers: int = 4) -> Any:
    """``tiny_gemma3`` (the family's tiny model, window 8) with ``head_dim`` and
    ``query_pre_attn_scalar`` replaced (``Gemma3Attention`` sets ``scaling = query_pre_attn_scalar **
    -0.5`` from the config). Layers 1 and 3 are global layers."""
    overrides = {"head_dim": head_dim, "query_pre_attn_scalar": scalar, "sliding_window": WINDOW}
    return testing.tiny_model(
        "gemma3", attn_implementation=impl, num_hidden_layers=layers, text_overrides=overrides
    )


@contextmanager
def rescaled(model: Any, factor: float) -> Iterator[None]:
    """Every decoder layer's ``self_attn.scaling`` multiplied by ``factor`` (restored afterwards)."""
    layers = get_adapter(model).layers
    saved = [layer.self_attn.scaling for layer in layers]
    try:
        for layer, s in zip(layers, saved, strict=True):
            layer.self_attn.scaling = s * factor
        yield
    finally:
        for layer, s in zip(layers, saved, strict=True):
            layer.self_attn.scaling = s


def spy(method: Any) -> list[tuple[Any, Any]]:
    """(signals, reduction) of every reduce call of ``method`` (this instance only)."""
    calls: list[tuple[Any, Any]] = []
    reduce = method.reduce

    def wrapped(signals: Any) -> Any:
        red = reduce(signals)
        calls.append((signals, red))
        return red

    method.reduce = wrapped
    return calls


def assert_default_scale_differs(default: torch.Tensor, expected: torch.Tensor) -> None:
    """The 1/sqrt(head_dim) answer is not the model's: the comparison above is not vacuous."""
    assert not torch.allclose(default, expected, rtol=1e-3, atol=1e-5), (default - expected).abs().max()


# --- (c) the default scale: None, so the ops' arithmetic is unchanged ------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_default_scale_is_none_on_every_family_and_layer(family):
    """Every layer of every tiny family: None (the ops' default arithmetic) where the module scales by
    head_dim ** -0.5 -- every family but Gemma 3, whose scale comes from ``query_pre_attn_scalar``;
    hybrid decoders' linear-attention layers (no ``self_attn``) included."""
    model, _ = model_for(family)
    adapter = get_adapter(model)
    for i, layer in enumerate(adapter.layers):
        attn = getattr(layer, "self_attn", None)
        default = attn is None or attn.scaling == adapter.head_dim(layer) ** -0.5
        assert default or family == "gemma3", (family, i)
        assert adapter.attention_scale(layer) == (None if default else attn.scaling), (family, i)


def test_gemma3_scale_is_none_when_the_scalar_is_head_dim_and_the_modules_otherwise():
    default = Gemma3Adapter(tiny_gemma3("eager"))  # query_pre_attn_scalar == head_dim == 16
    assert {default.attention_scale(layer) for layer in default.layers} == {None}
    adapter = Gemma3Adapter(scaled_gemma3("eager", scalar=24))
    assert [adapter.attention_scale(layer) for layer in adapter.layers] == [24**-0.5] * 4
    # the module's value, whatever the config says
    adapter.layers[2].self_attn.scaling = 0.3
    assert adapter.attention_scale(adapter.layers[2]) == 0.3


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -0.25])
def test_a_non_finite_or_non_positive_scale_is_refused(bad):
    adapter = Gemma3Adapter(tiny_gemma3("eager"))
    adapter.layers[2].self_attn.scaling = bad
    with pytest.raises(ValueError, match=rf"decoder layer 2's attention scale .* is {bad}"):
        adapter.attention_scale(adapter.layers[2])


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True, "0.1"])
def test_the_ops_refuse_a_bad_scale(bad):
    q, k = torch.randn(6, 2, 4), torch.randn(6, 1, 4)
    vis = torch.tensor([False, True, True, True, False, False])
    with pytest.raises(ValueError, match="scale must be"):
        euti_scores(torch.randn(6, 8), q, k, vis, scale=bad)
    with pytest.raises(ValueError, match="scale must be"):
        fastv_scores(q, k, vis, scale=bad)
    with pytest.raises(ValueError, match="scale must be"):
        rater_attention(q, k, torch.tensor([5]), scale=bad)


def test_the_ops_scale_by_hand():
    """One head, d = 4, keys e1, e2 and a query 2 e1 + e2 at the end: logits (2, 1) * s. With s = 1
    the last row is softmax(2, 1) = (e/(e+1), 1/(e+1)); with the default 1/2, softmax(1, 1/2)."""
    keys = torch.tensor([[[1.0, 0, 0, 0]], [[0, 1.0, 0, 0]], [[2.0, 1.0, 0, 0]]])
    queries = torch.zeros(3, 1, 4)
    queries[2, 0] = torch.tensor([2.0, 1.0, 0, 0])
    vis = torch.tensor([True, True, False])
    e = math.e
    one = torch.tensor([e * e / (e * e + e + math.exp(5)), e / (e * e + e + math.exp(5))])
    # the last query also sees its own key (2 e1 + e2: logit 5)
    torch.testing.assert_close(fastv_scores(queries, keys, vis, variant="original", scale=1.0), one)
    half = torch.tensor([e, e**0.5]) / (e + e**0.5 + e**2.5)
    torch.testing.assert_close(fastv_scores(queries, keys, vis, variant="original"), half)
    torch.testing.assert_close(rater_attention(queries, keys, torch.tensor([2]), scale=1.0)[0, :2], one)


def test_signals_give_each_layers_scale():
    """``Signals.attention_scale(j)``: ``scale_fn`` of layer j (default: this layer), else the
    adapter's answer for layer j, else (no model) None."""
    from pact.methods.base import Signals

    base = {
        "sample": 0,
        "hidden": torch.zeros(3, 4),
        "visual_mask": torch.tensor([False, True, True]),
        "sizes": torch.ones(2),
        "positions": torch.arange(3)[None],
        "visual_index": torch.arange(2),
        "config": None,
        "qk_fn": None,
        "cos_sin_fn": None,
        "layer_input_fn": None,
    }
    given = Signals(layer=3, scale_fn=lambda j: 0.1 * j, **base)
    assert given.attention_scale() == pytest.approx(0.3) and given.attention_scale(1) == pytest.approx(0.1)
    assert Signals(layer=3, **base).attention_scale(2) is None
    adapter = Gemma3Adapter(scaled_gemma3("eager", scalar=24))
    adapter.layers[1].self_attn.scaling = 0.7
    from_model = Signals(layer=3, adapter=adapter, **base)
    assert from_model.attention_scale() == 24**-0.5 and from_model.attention_scale(1) == 0.7


# --- (a) attention rows equal the eager model's output_attentions ----------------------------------


@pytest.mark.parametrize("read", [1, 2])
@pytest.mark.parametrize("config", ["pdrop", "fastv_original"])
def test_gemma3_last_token_row_equals_eager_attention(config, read):
    """PDrop's stage at layer ``read`` and FastV's original variant at layer ``read`` + 1 both read
    layer ``read``'s last-token row (1: a global layer; 2: a sliding one, whose window the row
    follows, ``tests/test_masked_scores.py``): equal to the eager model's ``output_attentions`` at
    scale 4 ** -0.5. The default-scale answer is computed under the same mask, so only the scale
    differs."""
    model = scaled_gemma3("eager")
    x = batch([prompt([5, 6, 20, 21, 22])])
    with torch.no_grad():
        attn = model(**x, output_attentions=True).attentions[read]  # (1, H, T, T)
    visual = x["input_ids"][0] == IMG
    expected = attn[0, :, -1].float().mean(0)[visual]
    model.set_attn_implementation("sdpa")
    overrides = (
        {"pdrop_layers": f"{read},3", "pdrop_keep_ratios": "0.5,0.25", "pdrop_depth": 0}
        if config == "pdrop"
        else {"layer": read + 1}
    )
    engine = install(model, config, **overrides)
    calls = spy(engine.method)
    with torch.no_grad():
        model(**x)
    signals, red = calls[0]
    torch.testing.assert_close(red.scores, expected, **ROWS)
    q, k = signals.qk_at(read, rope=True)
    assert signals.attention_scale(read) == 0.5
    rule = signals.attention_visibility(read)
    assert rule.window == (WINDOW if read == 2 else None)
    default = fastv_scores(q, k, signals.visual_mask, variant="original", visibility=rule)
    assert_default_scale_differs(default, expected)


@pytest.mark.parametrize(
    ("rope", "clustering"), [(False, "none"), (True, "none"), (False, "dbdpc"), (False, "kmeans")]
)
def test_gemma3_euti_equals_the_models_softmax_over_the_prefix(rope, clustering):
    """EUTI at layer 1: ||h_i|| * mean_h softmax_j(qbar_h . k_hj * scaling) over the prefix, from the
    queries/keys the stock layer computes (its q_norm / k_norm outputs, or what its attention function
    receives for ``euti_rope``) and the layer's ``scaling`` (4 ** -0.5, head_dim 16). Alone, in PACT
    (euti + dbdpc) and as the score pruner before another clustering (euti + kmeans)."""
    model = scaled_gemma3("sdpa")
    adapter = Gemma3Adapter(model)
    x = batch([prompt([5, 6, 20, 21, 22])])
    layer = adapter.layers[1]
    if rope:
        got = testing.attention_qk(model, x, 1, adapter=adapter)
        hidden, q, k = got["hidden"][0], got["queries"][0], got["keys"][0]  # (T, D), (H, T, d), (H_kv, T, d)
    else:
        seen: dict[str, torch.Tensor] = {}

        def grab(name: str) -> Any:
            def hook(module: Any, args: tuple, *rest: Any) -> None:
                # pre-hook (args, kwargs): the layer's input; forward hook (args, output): the norm's output
                seen[name] = (args[0] if args else rest[0]["hidden_states"]) if name == "h" else rest[0]

            return hook

        handles = [
            layer.register_forward_pre_hook(grab("h"), with_kwargs=True),
            layer.self_attn.q_norm.register_forward_hook(grab("q")),
            layer.self_attn.k_norm.register_forward_hook(grab("k")),
        ]
        try:
            with torch.no_grad():
                model(**x)
        finally:
            for h in handles:
                h.remove()
        hidden, q, k = seen["h"][0], seen["q"][0], seen["k"][0]
    visual = x["input_ids"][0] == IMG
    P = int(visual.nonzero()[-1]) + 1
    H = q.shape[0]
    k = k.repeat_interleave(H // k.shape[0], dim=0).float()  # (H, T, d)
    qbar = q[:, :P].float().mean(1)  # (H, d)
    probs = torch.softmax(torch.einsum("hd,htd->ht", qbar, k[:, :P]) * layer.self_attn.scaling, -1)
    norms = hidden[visual].float().norm(dim=-1)
    expected = probs.mean(0)[visual[:P]] * norms

    engine = install(model, "euti", layer=1, euti_rope=rope, clustering=clustering)
    calls = spy(engine.method)
    with torch.no_grad():
        model(**x)
    signals, red = calls[0]
    torch.testing.assert_close(red.scores, expected, rtol=1e-4, atol=1e-6)
    default = euti_scores(signals.hidden, signals.queries(rope), signals.keys(rope), signals.visual_mask)
    assert_default_scale_differs(default, expected)


QWEN = "qwen2_5_vl"
FACTOR = 3.0  # every layer's scaling = 3 / sqrt(head_dim)


def test_qwen_pdrop_and_fastv_rows_follow_the_modules_scaling():
    model, _ = model_for(QWEN, "eager")
    x = inputs_for(QWEN, [one_image(QWEN)])
    visual = testing.patch_token_mask(model, x)[0]
    with rescaled(model, FACTOR):
        with torch.no_grad():
            attn = model(**x, output_attentions=True).attentions[1]
        expected = attn[0, :, -1].float().mean(0)[visual]
        model.set_attn_implementation("sdpa")
        for config, overrides in (
            ("pdrop", {"pdrop_layers": "1,2", "pdrop_keep_ratios": "0.5,0.25", "pdrop_depth": 0}),
            ("fastv_original", {"layer": 2}),
        ):
            pact.api.apply(model, pact.load_config(config, **overrides))
            calls = spy(pact.api.engine_of(model).method)
            with torch.no_grad():
                model(**x)
            signals, red = calls[0]
            torch.testing.assert_close(red.scores, expected, **ROWS)
            head_dim = get_adapter(model).head_dim(get_adapter(model).layers[1])
            assert signals.attention_scale(1) == FACTOR * head_dim**-0.5
            q, k = signals.qk_at(1, rope=True)
            assert_default_scale_differs(
                fastv_scores(q, k, signals.visual_mask, variant="original"), expected
            )
            pact.api.remove(model)


def test_qwen_reference_fastv_is_the_mean_of_the_models_prefix_rows():
    """FastV's reference variant at layer 1 (causal, keys of the prefix P, post-RoPE, no norm): the
    head and row mean of the eager attention of the prefix queries (a causal row of a prefix query
    only sees prefix keys), at the visual keys."""
    model, _ = model_for(QWEN, "eager")
    x = inputs_for(QWEN, [one_image(QWEN)])
    visual = testing.patch_token_mask(model, x)[0]
    P = int(visual.nonzero()[-1]) + 1
    with rescaled(model, FACTOR):
        with torch.no_grad():
            attn = model(**x, output_attentions=True).attentions[1][0].float()  # (H, T, T)
        expected = attn[:, :P, :P].mean((0, 1))[visual[:P]]
        model.set_attn_implementation("sdpa")
        pact.api.apply(model, pact.load_config("fastv", layer=1))
        calls = spy(pact.api.engine_of(model).method)
        with torch.no_grad():
            model(**x)
    signals, red = calls[0]
    torch.testing.assert_close(red.scores, expected, **ROWS)
    default = fastv_scores(signals.queries(True), signals.keys(True), signals.visual_mask)
    assert_default_scale_differs(default, expected)


def test_qwen_sparsevlm_rater_rows_follow_the_modules_scaling():
    """SparseVLM's first stage rates with layer 1's attention (the raters' rows, head mean)."""
    model, _ = model_for(QWEN, "eager")
    x = inputs_for(QWEN, [one_image(QWEN)])
    visual = testing.patch_token_mask(model, x)[0]
    with rescaled(model, FACTOR):
        with torch.no_grad():
            attn = model(**x, output_attentions=True).attentions[1][0].float().mean(0)  # (T, T)
        model.set_attn_implementation("sdpa")
        cfg = {"sparsevlm_layers": "1,2", "sparsevlm_reference_depth": 0, "sparsevlm_budget": 64}
        pact.api.apply(model, pact.load_config("sparsevlm", **cfg))
        method = pact.api.engine_of(model).method
        relations: list[tuple[Any, torch.Tensor]] = []
        scores = method.scores
        method.scores = lambda s: relations.append((s, scores(s))) or relations[-1][1]
        with torch.no_grad():
            model(**x)
    signals, relation = relations[0]
    assert signals.layer == 2
    st = signals.context["sparsevlm"][0]
    rows = st["raters"] + (visual.numel() - st["text"])
    assert rows.numel()
    torch.testing.assert_close(relation, attn[rows][:, visual], **ROWS)
    q, k = signals.qk_at(1, rope=True)
    default = rater_attention(q, k, rows)[:, visual]
    assert_default_scale_differs(default, attn[rows][:, visual])


def test_qwen_holitom_inner_row_follows_the_modules_scaling():
    """HoliTom's inner merge at layer 3 reads layer 2's last-token row over the outer-merged slots
    (eager ``output_attentions`` with pact applied)."""
    model, processor = model_for(QWEN, "eager")
    x = testing.build_inputs(QWEN, processor, [video_sample(0)])
    with rescaled(model, FACTOR):
        pact.api.apply(model, pact.load_config("holitom", holitom_inner_layer=3, holitom_retain_ratio=0.6))
        method = pact.api.engine_of(model).method
        calls = spy(method)
        inner_attention, default = method.inner_attention, []

        def with_default(signals: Any) -> torch.Tensor:
            # the same row at the default scale, from the layer-2 input the method captured
            hidden, (cos, sin) = method.layer_inputs.get(2)
            t, adapter = signals.hidden.shape[0], get_adapter(model)
            qk = adapter.queries_keys(adapter.layers[2], hidden[0, -t:], cos[0, -t:], sin[0, -t:], True, True)
            default.append(fastv_scores(qk[2], qk[3], signals.visual_mask, variant="original"))
            return inner_attention(signals)

        method.inner_attention = with_default
        with torch.no_grad():
            attentions = model(**x, output_attentions=True).attentions
        (_, outer), (signals, inner) = calls
        head_dim = get_adapter(model).head_dim(get_adapter(model).layers[2])
        assert signals.attention_scale(2) == FACTOR * head_dim**-0.5
    first = int(testing.patch_token_mask(model, x)[0].nonzero()[0])
    slots = torch.arange(first, first + outer.kept.numel())
    expected = attentions[2][0, :, -1].float().mean(0)[slots]
    torch.testing.assert_close(inner.scores, expected, **ROWS)
    assert_default_scale_differs(default[0], expected)


# --- (d) Gemma 3 27B's shape: accepted, and PACT / FastV run end to end ----------------------------


@pytest.mark.parametrize("config", ["pact", "fastv"])
def test_gemma3_27b_shaped_scale_is_accepted_and_runs(config):
    """head_dim 128 with query_pre_attn_scalar 168 (Gemma 3 27B): ``check_supported`` accepts it,
    every layer's scale is 168 ** -0.5, and reduction at layer 1 keeps cached == uncached greedy."""
    model = scaled_gemma3("sdpa", head_dim=128, scalar=168)
    adapter = Gemma3Adapter(model)
    adapter.check_supported()
    assert [adapter.attention_scale(layer) for layer in adapter.layers] == [168**-0.5] * 4
    engine = install(model, config, layer=1)
    x = batch([prompt([5, 6, 20, 21, 22])])
    assert greedy_cached(model, x, 6) == greedy_uncached(model, x, 6)
    record = engine.stats().records[0][0]
    assert 0 < record.kept.numel() < 16
