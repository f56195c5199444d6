"""Qwen3-VL's own hard part, DeepStack: the text model adds features of three vision layers to the
visual tokens' hidden states right after decoder layers 0, 1 and 2. A reduction at or before those
layers must carry the features along (a kept token its own, a merged token the size-weighted mean
of its members', removed tokens none). Checked against the stock modules run layer by layer on the
hand-reduced sequence, at every reduction layer 0..3, dropping and merging, eager and sdpa; plus the
engine guarantees at the injection layers (cached == uncached, batch == one by one, text-only after
image == stock) and ``pact demo --model`` on a saved checkpoint. The family-parametrized suites
(test_engine*.py, test_renumber.py, test_methods_models.py, test_qk_contract.py ...) run the rest."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import ATTENTION, greedy, inputs_for, model_for, one_image

import pact
import pact.api
from pact import testing
from pact.methods.base import Method, Signals
from pact.models import get_adapter
from pact.ops.reduction import Reduction

FAMILY = "qwen3_vl"


class EvenTokens(Method):
    """Test method: the even visual tokens stay; the odd token 2i+1 joins 2i (``merge``: hidden state
    = the size-weighted mean of the pair, sizes add up, as the bundled merging methods) or is
    dropped."""

    name = "even_tokens"

    def __init__(self, config: Any, merge: bool) -> None:
        super().__init__(config)
        self.merge = merge

    def reduce(self, s: Signals) -> Reduction:
        n, dev = s.num_visual, s.hidden.device
        idx = torch.arange(n, device=dev)
        kept = idx[::2]
        if not self.merge:
            labels = torch.where(idx % 2 == 0, idx // 2, -1)
            return Reduction(kept=kept, sizes=s.sizes[kept].float(), hidden=None, labels=labels)
        labels = idx // 2
        weights = s.sizes.float()
        vis = s.hidden[s.visual_mask].float()
        total = torch.zeros(kept.numel(), vis.shape[1], device=dev).index_add_(
            0, labels, vis * weights[:, None]
        )
        sizes = torch.zeros(kept.numel(), device=dev).index_add_(0, labels, weights)
        return Reduction(kept=kept, sizes=sizes, hidden=total / sizes[:, None], labels=labels)


def apply_even(model: Any, layer: int, merge: bool, progressive: bool = False) -> None:
    c = pact.load_config(None, layer=layer, pruning="none", clustering="none", progressive=progressive)
    pact.api.apply(model, c, method=EvenTokens(c, merge))


def stock_text_inputs(model: Any, x: Any) -> dict[str, Any]:
    """The keyword arguments the stock VLM gives its text model (inputs_embeds, position_ids,
    visual_pos_masks, deepstack_visual_embeds)."""
    got: dict[str, Any] = {}
    text_model = get_adapter(model).text_model
    handle = text_model.register_forward_pre_hook(lambda m, a, k: got.update(k), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**x)
    finally:
        handle.remove()
    return got


def _pair_mean(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> None:
    """x[a] = (wa x[a] + wb x[b]) / (wa + wb), in float32, written in place."""
    x[a] = ((x[a].float() * wa[:, None] + x[b].float() * wb[:, None]) / (wa + wb)[:, None]).to(x.dtype)


@torch.no_grad()
def reference_logits(model: Any, x: Any, steps: set[int], merge: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample 0's logits computed by the stock decoder layers, norm and head, called one by one on
    the sequence reduced by hand before each layer of ``steps`` (EvenTokens' rule), with the stock
    ``_deepstack_process`` adding the features, sliced (and merged) the same way, after layers 0-2.

    Returns (logits (R, V), original index (R,) of each remaining row)."""
    text = get_adapter(model).text_model
    got = stock_text_inputs(model, x)
    h = got["inputs_embeds"][:1].clone()
    pos = got["position_ids"]
    pos = (pos[1:] if pos.shape[0] == 4 else pos)[:, :1]
    cos, sin = text.rotary_emb(h, pos)
    visual = got["visual_pos_masks"][0].clone()
    n0 = int(visual.sum())
    features = [f[:n0].clone() for f in got["deepstack_visual_embeds"]]  # sample 0's rows come first
    orig = torch.arange(h.shape[1])
    sizes = torch.ones(h.shape[1])
    for k, layer in enumerate(text.layers):
        if k in steps:
            rows = visual.nonzero().flatten()  # sequence rows of the visual tokens
            pairs = rows.numel() // 2
            even, odd = rows[0 : 2 * pairs : 2], rows[1 : 2 * pairs : 2]
            if merge:
                vi = torch.arange(pairs) * 2  # the pairs' indices among the visual tokens
                _pair_mean(h[0], even, odd, sizes[even], sizes[odd])
                for f in features:
                    _pair_mean(f, vi, vi + 1, sizes[even], sizes[odd])
                sizes[even] = sizes[even] + sizes[odd]
            keep = torch.ones(h.shape[1], dtype=torch.bool)
            keep[odd] = False
            features = [f[keep[rows]] for f in features]
            h, cos, sin = h[:, keep], cos[:, keep], sin[:, keep]
            orig, sizes, visual = orig[keep], sizes[keep], visual[keep]
        n = h.shape[1]
        mask = torch.full((n, n), float("-inf")).triu(1) + sizes.log()[None, :]  # causal + log(size)
        h = layer(
            h, attention_mask=mask[None, None].to(h.dtype), position_embeddings=(cos, sin), position_ids=None
        )
        if k < len(features):
            h = text._deepstack_process(h, visual[None], features[k])
    return model.lm_head(text.norm(h))[0], orig


def test_the_reference_is_the_stock_model():
    """Without reduction the layer-by-layer reference equals the stock forward (DeepStack included),
    so it can judge the reduced runs."""
    model, _ = model_for(FAMILY)
    x = inputs_for(FAMILY, [one_image(FAMILY)])
    assert len(stock_text_inputs(model, x)["deepstack_visual_embeds"]) == 3
    ref, orig = reference_logits(model, x, set(), merge=False)
    with torch.no_grad():
        stock = model(**x).logits[0]
    torch.testing.assert_close(ref, stock[orig], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("merge", [False, True], ids=["remove", "merge"])
@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_deepstack_follows_the_reduction_at_every_layer(layer, merge, attn):
    """Reduction before layer 0, 1, 2 (each an injection layer) or 3 (after all): same logits as the
    stock layers on the hand-reduced sequence with the features sliced / merged alike. Before the
    engine followed DeepStack, layer >= 1 crashed inside transformers (a (B, T) mask on (B, R) rows)
    and layer 0 added the features at the wrong rows."""
    model, _ = model_for(FAMILY, attn)
    x = inputs_for(FAMILY, [one_image(FAMILY)])
    apply_even(model, layer, merge)
    with torch.no_grad():
        out = model(**x).logits[0]
    st = pact.api.stats(model)
    assert st.layers == [layer] and st.visual_after == [-(-st.visual_before[0] // 2)]
    pact.api.remove(model)
    ref, orig = reference_logits(model, x, {layer}, merge)
    torch.testing.assert_close(out[orig], ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("layer", "merge"), [(0, True), (1, False)])
def test_deepstack_follows_progressive_reductions(layer, merge):
    """A reduction before every layer from ``layer`` on: merged features are size-weighted means of
    already merged ones (sizes 2, 4 ...), each injection sees the layout of its own layer."""
    model, _ = model_for(FAMILY)
    x = inputs_for(FAMILY, [one_image(FAMILY)])
    apply_even(model, layer, merge, progressive=True)
    with torch.no_grad():
        out = model(**x).logits[0]
    steps = set(range(layer, len(get_adapter(model).layers)))
    assert set(pact.api.stats(model).layers) == steps
    pact.api.remove(model)
    ref, orig = reference_logits(model, x, steps, merge)
    torch.testing.assert_close(out[orig], ref, atol=1e-5, rtol=1e-4)


def test_the_models_features_are_not_changed():
    """Merged features are written into the engine's copy: the vision outputs ``generate`` computes
    once (``mm_encoder_outputs``) are reused unchanged, so a second run gives the same answer."""
    model, _ = model_for(FAMILY)
    x = inputs_for(FAMILY, [one_image(FAMILY)])
    with torch.no_grad():
        encoded = {"image": model.model.get_image_features(x["pixel_values"], x["image_grid_thw"])}
    before = [f.clone() for feats in encoded["image"].deepstack_features for f in feats]
    apply_even(model, 0, merge=True)
    inputs = {k: v for k, v in x.items() if k != "pixel_values"}
    with torch.no_grad():
        first = model(**inputs, mm_encoder_outputs=encoded).logits
        second = model(**inputs, mm_encoder_outputs=encoded).logits
    after = [f for feats in encoded["image"].deepstack_features for f in feats]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert torch.equal(first, second)


def test_the_default_injection_is_the_models_deepstack_addition():
    """ModelAdapter.inject (the default for a family that injects features) adds them as Qwen3-VL's
    own ``_deepstack_process`` does, bit for bit, without touching its input."""
    from pact.models.base import ModelAdapter

    model, _ = model_for(FAMILY)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 64, generator=g)
    mask = torch.rand(2, 7, generator=g) > 0.5
    features = torch.randn(int(mask.sum()), 64, generator=g, dtype=torch.float64)
    keep = hidden.clone()
    want = model.model.language_model._deepstack_process(hidden, mask, features)
    got = ModelAdapter.inject(get_adapter(model), hidden, mask, features)
    assert torch.equal(got, want) and torch.equal(hidden, keep)


def mixed_samples() -> list[dict]:
    return [
        one_image(FAMILY, 0),
        {"question": "Only text here, and a longer prompt than the others."},
        {"question": "Describe the video.", "videos": [testing.sample_video(0)]},
        {
            "question": "Compare them.",
            "images": [testing.sample_image(1, (64, 120)), testing.sample_image(2, (200, 60))],
        },
    ]


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("layer", [0, 1])
def test_deepstack_engine_guarantees(layer, attn):
    """At the injection layers, merging: a left-padded batch (mixed sizes, text only, a video, two
    images) equals each sample alone, cached equals uncached, and a text-only prompt afterwards is
    the stock model's."""
    model, _ = model_for(FAMILY, attn)
    samples = mixed_samples()
    x = inputs_for(FAMILY, samples)
    apply_even(model, layer, merge=True)
    cached = greedy(model, x, n=3)
    st = pact.api.stats(model)
    assert (
        st.layers == [layer] and st.visual_before[1] == 0 and all(st.visual_before[b] > 0 for b in (0, 2, 3))
    )
    assert torch.equal(cached, greedy(model, x, n=3, use_cache=False))
    for b, sample in enumerate(samples):
        assert torch.equal(cached[b], greedy(model, inputs_for(FAMILY, [sample]), n=3)[0]), f"sample {b}"
    text = inputs_for(FAMILY, [{"question": "Only text here."}])
    with torch.no_grad():
        reduced = model(**text).logits
        pact.api.remove(model)
        stock = model(**text).logits
    assert torch.equal(reduced, stock)


def test_layer0_decode_positions_continue_the_unreduced_timeline():
    """Layer 0 reduced, a hand-written decode loop without position_ids: the adapter's
    ``decode_position_ids`` (Qwen2-VL's cached branch with ``rope_deltas``, which Qwen3-VL's
    ``compute_3d_position_ids`` shares) give what ``generate`` gives with its own 3-D positions."""
    model, _ = model_for(FAMILY)
    x = inputs_for(FAMILY, [one_image(FAMILY, 0, (64, 120))])
    apply_even(model, 0, merge=True)
    with torch.no_grad():
        out = model(**x, use_cache=True)
        assert out.past_key_values.get_seq_length(0) < x["input_ids"].shape[1]
        tokens = [out.logits[:, -1].argmax(-1)]
        mask = x["attention_mask"]
        for _ in range(3):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            out = model(
                input_ids=tokens[-1][:, None], attention_mask=mask, past_key_values=out.past_key_values
            )
            tokens.append(out.logits[:, -1].argmax(-1))
    assert torch.equal(torch.stack(tokens, 1), greedy(model, x, n=4))


def test_video_frames_are_runs_separated_by_timestamps():
    """The processor writes a timestamp before every frame: each frame is its own run of visual
    tokens and its own grid, all of them frames of the one video (``run_media``; more in
    tests/test_video_frames.py)."""
    model, _ = model_for(FAMILY)
    x = inputs_for(FAMILY, [{"question": "Describe the video.", "videos": [testing.sample_video(0)]}])
    t, h, w = (int(v) for v in x["video_grid_thw"][0])
    assert (t, h, w) == (2, 4, 6)  # 4 frames, 2 per temporal patch; 64 x 96 pixels in 32-px tokens
    mask = testing.placeholder_mask(FAMILY, x)[0]
    c = pact.load_config(None, layer=1, pruning="none", clustering="none")
    seen = []

    class Record(EvenTokens):
        def reduce(self, s: Signals) -> Reduction:
            seen.append(s.groups())
            return super().reduce(s)

    pact.api.apply(model, c, method=Record(c, merge=False))
    with torch.no_grad():
        model(**x)
    from pact.models.groups import Group, runs

    assert [n for _, n in runs(mask)] == [6, 6]
    assert seen == [[Group(0, "frame", 0, 2, 3), Group(0, "frame", 6, 2, 3)]]


# ---------------------------------------------------------------------------------------------------
# InternVL3.5: the internvl family with a Qwen3 decoder (per-head q/k norms)

_INTERNVL35: dict[str, Any] = {}


@pytest.fixture(autouse=True)
def _remove_from_internvl35():
    """These models are not conftest's: leave none of them with pact applied."""
    yield
    for model, _ in _INTERNVL35.values():
        pact.api.remove(model)


def internvl35(attn: str = "sdpa", **text: Any) -> tuple[Any, Any]:
    """Tiny InternVL with a ``qwen3`` text config (InternVL3.5's layout), q/k norm weights random."""
    key = repr(sorted(text.items()))
    if key not in _INTERNVL35:
        overrides = {"model_type": "qwen3", "head_dim": 16, **text}
        model, processor = testing.tiny_pair("internvl", text_overrides=overrides)
        with torch.no_grad():
            for layer in get_adapter(model).layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
        _INTERNVL35[key] = (model.eval(), processor)
    model, processor = _INTERNVL35[key]
    model.set_attn_implementation(attn)
    return model, processor


def test_internvl35_queries_keys_are_what_attention_receives():
    from test_qk_contract import contract_errors

    model, processor = internvl35()
    adapter = get_adapter(model)
    assert type(adapter).__name__ == "InternVLAdapter" and model.config.text_config.model_type == "qwen3"
    assert hasattr(adapter.layers[0].self_attn, "q_norm")
    x = testing.build_inputs("internvl", processor, [one_image("internvl"), {"question": "Only text here."}])
    for layer_index in (0, len(adapter.layers) - 1):
        assert contract_errors(adapter, x, layer_index) == []


@pytest.mark.parametrize("attn", ATTENTION)
def test_internvl35_engine_guarantees(attn):
    """PACT on InternVL3.5's layout: reduction off is stock bit for bit, a left-padded batch equals
    each sample alone, cached equals uncached, text-only afterwards is stock."""
    model, processor = internvl35(attn)
    samples = [
        one_image("internvl", 0),
        {"question": "Only text here, a longer prompt."},
        one_image("internvl", 1, (64, 120)),
    ]
    x = testing.build_inputs("internvl", processor, samples)
    with torch.no_grad():
        stock = model(**x).logits
    pact.api.apply(model, pact.load_config("no_reduction"))
    with torch.no_grad():
        assert torch.equal(model(**x).logits, stock)
    pact.api.apply(model, pact.load_config("pact", layer=2))
    cached = greedy(model, x, n=3)
    st = pact.api.stats(model)
    assert st.visual_after[0] < st.visual_before[0] and st.visual_before[1] == 0
    assert torch.equal(cached, greedy(model, x, n=3, use_cache=False))
    for b, sample in enumerate(samples):
        alone = testing.build_inputs("internvl", processor, [sample])
        assert torch.equal(cached[b], greedy(model, alone, n=3)[0]), f"sample {b}"
    text = testing.build_inputs("internvl", processor, [{"question": "Only text here."}])
    with torch.no_grad():
        reduced = model(**text).logits
        pact.api.remove(model)
        assert torch.equal(reduced, model(**text).logits)


def test_internvl35_sliding_window_decoder_is_refused():
    model, _ = internvl35(use_sliding_window=True, sliding_window=8, max_window_layers=0)
    assert get_adapter(model).layers[0].self_attn.sliding_window == 8
    with pytest.raises(
        ValueError, match=r"InternVLForConditionalGeneration: its qwen3 decoder has sliding-window"
    ):
        pact.api.apply(model, pact.load_config("pact", layer=2))
    assert "_pact_engine" not in model.__dict__
