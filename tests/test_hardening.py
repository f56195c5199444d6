"""Hardening (issue 11): gradients through every method, copies of an applied model, and the
cross-field checks that need the model (depths, argument types).

The tiny models have 6 decoder layers (the bundled configs reduce at layer 4, VTW/ToMe's formula uses
L_eq = 4 < n) and are built once per test process.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import pact
import pact.api
from pact import testing
from pact.config import config_names
from pact.methods.base import Method, Signals
from pact.ops.dbdpc import cosine_distances, dbdpc
from pact.ops.reduction import Reduction

FAMILIES = testing.FAMILIES
CONFIGS = config_names()
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "dbscan": {"dbscan_eps": 0.9},
    "holitom": {"holitom_inner_layer": 4},  # the official layer 18 of 28; the tiny models have 6
}  # as test_methods_models
_MODELS: dict[str, tuple[Any, Any]] = {}


def tiny6(family: str) -> tuple[Any, Any]:
    if family not in _MODELS:
        torch.manual_seed(0)
        _MODELS[family] = testing.tiny_pair(family, num_hidden_layers=6)
    return _MODELS[family]


@pytest.fixture(autouse=True)
def _stock_models():
    yield
    for model, _ in _MODELS.values():
        pact.api.remove(model)
        model.zero_grad(set_to_none=True)


def one_sample(family: str) -> Any:
    _, processor = tiny6(family)
    samples = [{"question": "What is in the image?", "images": [testing.sample_image(0, size=(96, 64))]}]
    return testing.build_inputs(family, processor, samples)


def families_of(name: str) -> list[str]:
    from pact.methods import REGISTRY

    cfg = pact.load_config(name)
    supported = getattr(REGISTRY[(cfg.pruning, cfg.clustering)], "families", None)  # e.g. EVS
    return [f for f in FAMILIES if supported is None or f in supported]


# ---------------------------------------------------------------------------------------------------
# autograd


def test_dbdpc_accepts_points_that_require_grad():
    torch.manual_seed(0)
    x = torch.randn(40, 8)
    centers, labels = dbdpc(x, 0.5)
    centers_g, labels_g = dbdpc(x.clone().requires_grad_(), 0.5)  # failed: mm() with out=
    assert torch.equal(centers, centers_g) and torch.equal(labels, labels_g)
    assert torch.equal(cosine_distances(x.clone().requires_grad_()), cosine_distances(x))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_trains_through_kept_tokens(name):
    """A loss under reduction (``labels=``) equals the no_grad forward, and backward reaches the
    kept and merged visual tokens (and the vision tower) but not the dropped ones."""
    family = families_of(name)[CONFIGS.index(name) % len(families_of(name))]
    model, _ = tiny6(family)
    x = one_sample(family)
    cfg = pact.load_config(name, **TINY_OVERRIDES.get(name, {}))
    pact.api.apply(model, cfg)
    with torch.no_grad():
        expected = model(**x).logits
    st = pact.api.stats(model)
    first = st.layers[0] if st.layers else None

    captured: list[torch.Tensor] = []

    def keep_grad(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden.retain_grad()
        captured.append(hidden)

    # The output of layer L-1 is exactly what the reduction at layer L consumes.
    handle = None
    if first:
        handle = pact.api.engine_of(model).adapter.layers[first - 1].register_forward_hook(keep_grad)
    pixels = x["pixel_values"].clone().requires_grad_()
    try:
        out = model(**{**x, "pixel_values": pixels}, labels=x["input_ids"])
        out.loss.backward()
    finally:
        if handle is not None:
            handle.remove()
    assert torch.allclose(out.logits.detach(), expected, rtol=0, atol=1e-5), name
    assert torch.isfinite(out.loss) and bool(pixels.grad.abs().sum() > 0)
    assert all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    if not cfg.reduction or not first:
        return
    record = st.records[0][0]
    visual_pos = testing.patch_token_mask(model, x)[0].nonzero().squeeze(1)
    grad_norm = captured[0].grad[0].float().norm(dim=-1)[visual_pos]  # per original visual token
    kept_or_merged = record.labels >= 0
    assert bool((grad_norm[~kept_or_merged] == 0).all()), f"{name}: a dropped token got a gradient"
    assert bool((grad_norm[kept_or_merged] > 0).all()), f"{name}: a kept token got no gradient"


# ---------------------------------------------------------------------------------------------------
# copies


@pytest.mark.parametrize("family", FAMILIES)
def test_deepcopy_of_an_applied_model_is_independent_and_reduces(family):
    model, _ = tiny6(family)
    x = one_sample(family)
    pact.api.apply(model, "pact")
    with torch.no_grad():
        reduced = model(**x).logits
    before = pact.api.stats(model)
    clone = copy.deepcopy(model)  # failed: a mask shape error at the copy's first forward
    assert pact.api.engine_of(clone) is not pact.api.engine_of(model)
    assert pact.api.stats(model).visual_after == before.visual_after  # the original keeps its stats
    with torch.no_grad():
        assert torch.equal(clone(**x).logits, reduced)
        assert torch.equal(model(**x).logits, reduced)
    assert pact.api.stats(clone).visual_after == before.visual_after
    pact.api.remove(clone)
    with torch.no_grad():
        stock_clone = clone(**x).logits
    pact.api.remove(model)
    with torch.no_grad():
        stock = model(**x).logits
    assert torch.equal(stock_clone, stock) and not torch.equal(stock, reduced)
    assert pact.api.engine_of(copy.deepcopy(model)) is None  # a stock model copies as stock


class _DropOddTokens(Method):
    """A user method with state: keeps the even visual tokens and counts its calls."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.calls = 0

    def reduce(self, signals: Signals) -> Reduction:
        from pact.methods.budget import pruned_reduction

        self.calls += 1
        n = signals.num_visual
        return pruned_reduction(torch.arange(0, n, 2, device=signals.hidden.device), n)


def test_deepcopy_copies_a_user_method_and_keeps_the_fast_path_setting():
    model, _ = tiny6("qwen2_vl")
    x = one_sample("qwen2_vl")
    method = _DropOddTokens(pact.load_config("pact", layer=2))
    pact.api.apply(model, method.config, method=method)
    pact.api.engine_of(model).set_fast_sdpa(False)
    clone = copy.deepcopy(model)
    clone_engine = pact.api.engine_of(clone)
    assert isinstance(clone_engine.method, _DropOddTokens) and clone_engine.method is not method
    assert not clone_engine.fast_sdpa
    with torch.no_grad():
        clone(**x)
    assert (clone_engine.method.calls, method.calls) == (1, 0)
    n = testing.patch_token_mask(model, x).sum().item()
    assert pact.api.stats(clone).visual_after == [(n + 1) // 2]


# ---------------------------------------------------------------------------------------------------
# checks that need the model: depths and argument types


@pytest.mark.parametrize(
    ("name", "overrides", "key"),
    [
        ("vtw", {"vtw_equivalent_layer": 50}, "vtw_equivalent_layer=50"),
        ("vtw", {"vtw_equivalent_layer": 6}, "vtw_equivalent_layer=6"),
        ("vtw", {"vtw_equivalent_layer": -1, "layer": 7, "target_tokens": 3}, "layer=7"),
        ("vtw", {"vtw_equivalent_layer": -1, "layer": 7, "target_ratio": 0.5}, "layer=7"),
        ("tome", {"tome_equivalent_layer": 50}, "tome_equivalent_layer=50"),
        ("tome", {"tome_equivalent_layer": 6, "target_ratio": 0.5}, "tome_equivalent_layer=6"),
        ("pact", {"layer": 6}, "layer=6"),
    ],
)
def test_layers_beyond_the_model_are_refused_at_apply(name, overrides, key):
    model, _ = tiny6("qwen2_vl")
    with pytest.raises(ValueError, match=rf"{key} but the model has only 6 decoder layers"):
        pact.api.apply(model, name, **overrides)
    assert pact.api.engine_of(model) is None


def test_vtw_at_the_last_equivalent_layer_still_withdraws():
    model, _ = tiny6("qwen2_vl")
    x = one_sample("qwen2_vl")
    pact.api.apply(model, "vtw", vtw_equivalent_layer=5, vtw_keep_ratio=0.0)  # round(6 * (1 - 1/6)) = 5
    with torch.no_grad():
        model(**x)
    assert pact.api.stats(model).layers == [5] and pact.api.stats(model).visual_after == [0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": 123}, "method must be a pact.methods.Method instance or None, got int 123"),
        ({"method": "fastv"}, "config keys `pruning` and `clustering`"),
        ({"config": 123}, "load_config expects a path"),
    ],
)
def test_apply_refuses_wrong_argument_types(kwargs, message):
    model, _ = tiny6("qwen2_vl")
    with pytest.raises(TypeError, match=message):
        pact.api.apply(model, **kwargs)
    assert pact.api.engine_of(model) is None


def test_apply_refuses_a_non_module():
    _, processor = tiny6("qwen2_vl")
    with pytest.raises(TypeError, match="model must be a Hugging Face VLM"):
        pact.api.apply(processor, "pact")


# ---------------------------------------------------------------------------------------------------
# the documented shape of hidden states and attentions (README, CONFIGDOC)


def test_hidden_states_and_attentions_have_the_reduced_length_from_layer_l():
    model, processor = tiny6("qwen2_vl")
    samples = [
        {"question": "What is in the image?", "images": [testing.sample_image(0, size=(96, 64))]},
        {
            "question": "Describe the picture in one sentence.",
            "images": [testing.sample_image(1, size=(64, 120))],
        },
    ]
    x = testing.build_inputs("qwen2_vl", processor, samples, padding_side="left")
    model.set_attn_implementation("eager")
    try:
        pact.api.apply(model, "pact", layer=2)
        with torch.no_grad():
            out = model(**x, output_hidden_states=True, output_attentions=True)
        after = pact.api.stats(model).visual_after
    finally:
        pact.api.remove(model)
        model.set_attn_implementation("sdpa")
    b, t = x["input_ids"].shape
    n_visual = testing.patch_token_mask(model, x).sum(1)
    n_other = x["attention_mask"].sum(1) - n_visual  # text and special tokens: never removed
    # Each sample keeps its text and its kept visual tokens; the batch is padded to the longest.
    reduced = max(int(o) + a for o, a in zip(n_other.tolist(), after, strict=True))
    assert out.logits.shape[:2] == (b, t)  # only the logits are scattered back
    lengths = [h.shape[1] for h in out.hidden_states]  # embeddings, then the output of each layer
    assert lengths == [t] * 3 + [reduced] * 4 and reduced < t  # 6 layers, L = 2
    assert [tuple(a.shape[-2:]) for a in out.attentions] == [(t, t)] * 2 + [(reduced, reduced)] * 4
