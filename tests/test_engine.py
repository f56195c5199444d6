"""Engine behaviour on tiny random models of every family (eager and sdpa).

The reduction used by most tests is ``PairMerge`` (conftest): it merges visual tokens pairwise and
optionally drops some, so sizes > 1, dropped tokens and proportional attention all occur, and the
tests do not depend on the PACT algorithms (tested in test_ops_*); ``test_pact_*`` run PACT itself.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ATTENTION, FAMILIES, PairMerge, greedy, inputs_for, model_for, one_image

import pact
import pact.api
from pact import testing
from pact.models import get_adapter

L = 2  # reduction layer of the 4-layer tiny models


def cfg(**kw):
    base = {"layer": L, "pruning": "none", "clustering": "none"}
    base.update(kw)
    return pact.load_config(None, **base)


def apply_pairs(model, drop_every: int = 3, **kw) -> PairMerge:
    c = cfg(**kw)
    method = PairMerge(c, drop_every=drop_every)
    pact.api.apply(model, c, method=method)
    return method


def two_samples(family: str) -> list[dict]:
    return [
        one_image(family, 0, (96, 64), "What is in the image?"),
        one_image(family, 1, (64, 120), "Describe the picture in one sentence."),
    ]


# ---------------------------------------------------------------------------------------------------
# Stock behaviour


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", FAMILIES)
def test_no_reduction_and_remove_are_bit_identical(family, attn):
    model, _ = model_for(family, attn)
    x = inputs_for(family, two_samples(family))
    with torch.no_grad():
        stock = model(**x).logits
        pact.api.apply(model, pact.load_config("configs/no_reduction.json"))
        off = model(**x).logits
        assert torch.equal(off, stock)
        st = pact.api.stats(model)
        assert st.layers == [] and st.visual_after == st.visual_before
        apply_pairs(model)
        reduced = model(**x).logits
        assert not torch.equal(reduced, stock)  # the hooks act
        pact.api.remove(model)
        assert torch.equal(model(**x).logits, stock)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_after_image_prompt_is_stock(family):
    model, _ = model_for(family)
    text = inputs_for(family, [{"question": "What color is the sky?"}])
    with torch.no_grad():
        stock = model(**text).logits
        stock_gen = greedy(model, text)
        apply_pairs(model)
        model(**inputs_for(family, [one_image(family)]))  # leaves reduction state behind, if any leaked
        assert pact.api.stats(model).layers == [L]
        assert torch.equal(model(**text).logits, stock)
        assert torch.equal(greedy(model, text), stock_gen)
    st = pact.api.stats(model)
    assert st.layers == [] and st.visual_before == [0] and st.reduction_ratio == 0.0


def test_two_models_do_not_interfere():
    a, _ = model_for("llava")
    b, _ = model_for("llava_onevision")
    xb = inputs_for("llava_onevision", [one_image("llava_onevision")])
    with torch.no_grad():
        stock_b = b(**xb).logits
        apply_pairs(a)
        assert torch.equal(b(**xb).logits, stock_b)
        apply_pairs(b)
        assert pact.api.engine_of(a) is not pact.api.engine_of(b)
        pact.api.remove(a)
        assert not torch.equal(b(**xb).logits, stock_b)


def test_apply_twice_replaces_previous_config():
    model, _ = model_for("qwen2_vl")
    x = inputs_for("qwen2_vl", [one_image("qwen2_vl")])
    with torch.no_grad():
        apply_pairs(model, layer=1)
        model(**x)
        assert pact.api.stats(model).layers == [1]
        n_hooks = len(pact.api.engine_of(model).handles)
        apply_pairs(model, layer=3)
        model(**x)
        assert pact.api.stats(model).layers == [3]
        assert len(pact.api.engine_of(model).handles) == n_hooks  # old hooks gone
        layer0 = get_adapter(model).text_model.layers[0]
        assert len(layer0._forward_pre_hooks) == 1


# ---------------------------------------------------------------------------------------------------
# Reduction, caches, positions


@pytest.mark.parametrize("family", FAMILIES)
def test_stats_counts_per_sample_and_output_length(family):
    model, _ = model_for(family)
    x = inputs_for(family, two_samples(family))
    patch = testing.patch_token_mask(model, x)
    with torch.no_grad():
        apply_pairs(model, drop_every=3)
        out = model(**x, labels=x["input_ids"])
    st = pact.api.stats(model)
    before = patch.sum(1).tolist()
    assert st.visual_before == before
    # PairMerge keeps ceil(n / 2) tokens per sample
    assert st.visual_after == [math.ceil(n / 2) for n in before]
    assert st.layers == [L] and st.layer == L
    assert 0.45 < st.reduction_ratio < 0.55
    assert st.seconds_reducing > 0
    assert out.logits.shape[:2] == x["input_ids"].shape  # scattered back to the input length
    assert torch.isfinite(out.loss)
    for b, rec in enumerate(st.records[0]):
        n = before[b]
        assert rec.kept.tolist() == list(range(0, n, 2))
        assert rec.labels.shape == (n,)
        dropped = (rec.labels == -1).nonzero().flatten().tolist()
        assert dropped == [i for i in range(n) if i % 2 == 1 and (i // 2) % 3 == 0]
        assert rec.sizes.sum().item() == n - len(dropped)


@pytest.mark.parametrize("family", FAMILIES)
def test_removed_positions_take_their_representatives_logits(family):
    model, _ = model_for(family)
    x = inputs_for(family, [one_image(family)])
    with torch.no_grad():
        apply_pairs(model, drop_every=3)
        logits = model(**x).logits[0]
    rec = pact.api.stats(model).records[0][0]
    pos = testing.patch_token_mask(model, x)[0].nonzero().flatten()  # sequence index of visual token j
    for j, label in enumerate(rec.labels.tolist()):
        # dropped: the nearest kept token before it (here: the pair's center)
        center = pos[rec.kept[label]] if label >= 0 else pos[j - 1]
        assert torch.equal(logits[pos[j]], logits[center])


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_equals_uncached(family, attn):
    model, _ = model_for(family, attn)
    x = inputs_for(family, two_samples(family))
    apply_pairs(model)
    cached = greedy(model, x)
    assert pact.api.stats(model).layers == [L]
    uncached = greedy(model, x, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_single(family, attn):
    model, _ = model_for(family, attn)
    samples = [*two_samples(family), {"question": "Is there a red circle on the left? Answer yes or no."}]
    if family == "llava_onevision":  # a two-image sample in the batch too
        samples.append(
            {
                "question": "Compare the two images.",
                "images": [testing.sample_image(2), testing.sample_image(3, size=(80, 80))],
            }
        )
    apply_pairs(model)
    batch = greedy(model, inputs_for(family, samples))
    assert pact.api.stats(model).visual_after[len(two_samples(family))] == 0
    for b, s in enumerate(samples):
        alone = greedy(model, inputs_for(family, [s]))
        assert torch.equal(batch[b], alone[0]), f"sample {b}"


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_lengths_per_layer(family):
    model, _ = model_for(family)
    x = inputs_for(family, two_samples(family))
    apply_pairs(model)
    with torch.no_grad():
        out = model(**x, use_cache=True)
    T = x["input_ids"].shape[1]
    engine = pact.api.engine_of(model)
    R = engine.layout.slot_orig.shape[1]
    st = pact.api.stats(model)
    # the reduced batch is padded to the longest reduced sample
    valid = x["attention_mask"].sum(1)
    before, after = torch.tensor(st.visual_before), torch.tensor(st.visual_after)
    assert int((valid - before + after).max()) == R
    # linear-attention layers (hybrid decoders) keep per-sequence states, no length: tests/test_qwen3_5.py
    linear = pact.api.engine_of(model).linear_layers
    attention = [i for i in range(len(get_adapter(model).layers)) if i not in linear]
    lengths = [out.past_key_values.get_seq_length(i) for i in attention]
    assert lengths == [T if i < L else R for i in attention]


@pytest.mark.parametrize("family", FAMILIES)
def test_positions_kept_and_decode_continue_unreduced(family):
    """Layers >= L get the cos/sin rows of the kept tokens' ORIGINAL positions, each layer from its
    own stock table (Gemma 3's sliding and global layers have two; M-RoPE triples for Qwen: checked
    on the position ids too); decode steps get the stock (unreduced) positions."""
    model, _ = model_for(family)
    x = inputs_for(family, two_samples(family))
    layers = get_adapter(model).text_model.layers
    seen: dict[str, list] = {"stock": [], "pact": []}
    key = ["stock"]

    def grab(i):
        def hook(mod, args, kwargs):
            seen[key[0]].append((i, args[0].shape[1], *(t.clone() for t in kwargs["position_embeddings"])))

        return hook

    handles = []
    try:
        handles = [layers[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in (0, L, 3)]
        greedy(model, x, n=3)
        key[0] = "pact"
        for h in handles:
            h.remove()
        apply_pairs(model)
        handles = [layers[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in (0, L, 3)]
        greedy(model, x, n=3)
    finally:
        for h in handles:
            h.remove()
    lay = pact.api.engine_of(model).layout
    stock_steps, pact_steps = seen["stock"], seen["pact"]
    # prefill: layer 0 unchanged, layers L and 3 see the rows of their own stock table, gathered
    (_, _, cos0, sin0) = pact_steps[0]
    assert torch.equal(cos0, stock_steps[0][2]) and torch.equal(sin0, stock_steps[0][3])
    idx = lay.slot_orig.clamp(min=0)
    ok = lay.slot_orig >= 0
    for (i, _, cos, sin), (j, _, stock_cos, stock_sin) in zip(pact_steps[1:3], stock_steps[1:3], strict=True):
        assert i == j
        gather = idx[..., None].expand(-1, -1, stock_cos.shape[-1])
        want_cos = stock_cos.expand(idx.shape[0], -1, -1).gather(1, gather)
        want_sin = stock_sin.expand(idx.shape[0], -1, -1).gather(1, gather)
        assert torch.equal(cos[ok], want_cos[ok]) and torch.equal(sin[ok], want_sin[ok]), f"layer {i}"
    # decode steps (q = 1): identical position embeddings to the stock model in every layer
    decode_stock = [s for s in stock_steps if s[1] == 1]
    decode_pact = [s for s in pact_steps if s[1] == 1]
    assert len(decode_pact) == len(decode_stock) > 0
    for a, b in zip(decode_stock, decode_pact, strict=True):
        assert a[0] == b[0] and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    if pact.api.engine_of(model).adapter.mrope:
        rope, _ = model.model.get_rope_index(
            x["input_ids"],
            mm_token_type_ids=x["mm_token_type_ids"],
            image_grid_thw=x["image_grid_thw"],
            attention_mask=x["attention_mask"],
        )
        for b in range(idx.shape[0]):
            orig = lay.slot_orig[b][ok[b]]
            # kept and merged tokens (a merged one sits at its center's slot) keep their (t, h, w)
            assert torch.equal(lay.positions[:, b][:, ok[b]], rope[:, b, orig])
            assert lay.visual[b].any()


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", FAMILIES)
def test_proportional_attention_mask_in_every_reduced_layer(family, attn):
    model, _ = model_for(family, attn)
    x = inputs_for(family, two_samples(family))
    layers = get_adapter(model).text_model.layers
    masks: list[tuple[int, torch.Tensor]] = []

    def grab(i):
        def hook(mod, args, kwargs):
            masks.append((i, kwargs["attention_mask"]))

        return hook

    apply_pairs(model, drop_every=0)
    pact.api.engine_of(model).set_fast_sdpa(False)  # this test reads the explicit-mask path
    handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        greedy(model, x, n=2)
    finally:
        for h in handles:
            h.remove()
    lay = pact.api.engine_of(model).layout
    linear = pact.api.engine_of(model).linear_layers  # hybrid decoders: a 2-D padding mask, no bias
    kinds = get_adapter(model).layer_attention()  # Gemma 3: sliding-window layers between global ones
    log2 = math.log(2.0)
    prefill, decode = masks[: len(layers)], masks[len(layers) :]
    for i, m in prefill:
        if i < L:
            continue
        if i in linear:
            assert torch.equal(m, lay.slot_orig >= 0)
            continue
        assert m.dim() == 4
        last = m[:, 0, -1].float()  # the last prompt token sees every reduced key (in its window)
        seen = lay.slot_orig >= 0
        window = kinds[i].window if kinds else None
        if window is not None:
            position = lay.positions[0]
            seen &= position > position[:, -1:] - window
            assert not seen.all(), "the window should hide some keys of these prompts"
        merged = lay.visual & (lay.sizes == 2) & seen
        assert merged.any()
        assert torch.allclose(last[merged], torch.full_like(last[merged], log2), atol=1e-2)
        assert (last[~merged & seen] == 0).all()
        assert torch.isinf(last[~seen]).all()
    assert sum(1 for i, _ in decode if i >= L) == len(layers) - L
    first_step = {}
    for i, m in decode:
        if i < L or i in linear:
            continue
        row = m[:, 0, -1].float()
        R = lay.sizes.shape[1]
        window = kinds[i].window if kinds else None
        # a sliding layer's cache keeps the last window - 1 rows of the reduced prompt
        cached = R if window is None else min(R, window - 1)
        assert row.shape[-1] == cached + 1
        merged = (lay.visual & (lay.sizes == 2))[:, R - cached :]
        visible = torch.isfinite(row[:, :cached])
        if window is not None and i not in first_step:  # the first new token: position last + 1
            position = lay.positions[0][:, R - cached :]
            rule = (position > position[:, -1:] + 1 - window) & (lay.slot_orig[:, R - cached :] >= 0)
            assert torch.equal(visible, rule), f"layer {i}"
        first_step[i] = True
        shown = merged & visible
        assert torch.allclose(
            row[:, :cached][shown], torch.full_like(row[:, :cached][shown], log2), atol=1e-2
        )
        assert (row[:, :cached][visible & ~merged] == 0).all()
        assert (row[:, cached:] == 0).all()
    # without proportional attention: no log(size) anywhere
    masks.clear()
    apply_pairs(model, drop_every=0, proportional_attention=False)
    pact.api.engine_of(model).set_fast_sdpa(False)
    first = min(i for i in range(L, len(layers)) if i not in linear)  # the first attention layer >= L
    handles = [layers[first].register_forward_pre_hook(grab(first), with_kwargs=True)]
    try:
        with torch.no_grad():
            model(**x)
    finally:
        handles[0].remove()
    finite = masks[0][1][torch.isfinite(masks[0][1])]
    assert (finite == 0).all()


@pytest.mark.parametrize("attn", ATTENTION)
def test_proportional_attention_equals_duplicated_keys(attn):
    """One decoder layer: a key merged from k identical tokens with bias log(k) gives the same
    outputs for the following queries as the k duplicates (eager and sdpa attention)."""
    from pact.engine import build_attention_mask

    model, _ = model_for("qwen2_vl", attn)
    layer = get_adapter(model).text_model.layers[L]
    rotary = get_adapter(model).text_model.rotary_emb
    torch.manual_seed(0)
    D = model.config.get_text_config().hidden_size
    prefix, dup, tail, k = 3, torch.randn(1, 1, D), torch.randn(1, 4, D), 3
    head = torch.randn(1, prefix, D)
    full = torch.cat([head, dup.expand(1, k, D), tail], 1)  # (1, 3 + k + 4, D)
    pos_full = torch.tensor([[0, 1, 2] + [3] * k + [4, 5, 6, 7]])  # duplicates share one position
    merged = torch.cat([head, dup, tail], 1)
    pos_merged = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]])

    def run(h, pos, sizes):
        pe = rotary(h, pos[None].expand(3, 1, -1))
        bias = torch.log(torch.tensor(sizes, dtype=torch.float32))[None]
        mask = build_attention_mask(bias, h.shape[1], h.dtype)  # causal + log(size) per key
        with torch.no_grad():
            return layer(h, attention_mask=mask, position_embeddings=pe, position_ids=None)

    out_full = run(full, pos_full, [1.0] * full.shape[1])
    out_merged = run(merged, pos_merged, [1.0] * prefix + [float(k)] + [1.0] * 4)
    assert torch.allclose(out_full[0, -4:], out_merged[0, -4:], atol=1e-5)
    # and the bias matters: without it the tail differs
    out_plain = run(merged, pos_merged, [1.0] * merged.shape[1])
    assert not torch.allclose(out_full[0, -4:], out_plain[0, -4:], atol=1e-3)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_sdpa_fast_path_is_used_and_equals_mask_path(family):
    """On sdpa, layers >= L get no 4-D mask but the key bias (causal SDPA with the bias in an extra
    q/k column); logits of a left-padded batch with merges (sizes 2) and of its decode steps equal
    the explicit-mask path's; remove() restores the stock attention implementation."""
    from pact.attention_backend import PACT_SDPA

    model, _ = model_for(family, "sdpa")
    x = inputs_for(family, two_samples(family))
    assert not x["attention_mask"].all()  # left padding present
    layers = get_adapter(model).text_model.layers
    seen: list[tuple[int, object, object]] = []

    def grab(i):
        def hook(mod, args, kwargs):
            seen.append((i, kwargs.get("attention_mask"), kwargs.get("pact_key_bias")))

        return hook

    def run():
        with torch.no_grad():
            out = model.generate(
                **x,
                max_new_tokens=3,
                min_new_tokens=3,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
            prefill = model(**x).logits
        return prefill, torch.stack(out.logits, 1), out.sequences

    apply_pairs(model)
    text_cfg = model.config.get_text_config()
    assert text_cfg._attn_implementation == PACT_SDPA
    handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        fast = run()
    finally:
        for h in handles:
            h.remove()
    assert (pact.api.stats(model).records[0][0].sizes > 1).any()
    n = len(layers)
    # generate: prefill + 2 decode steps; then one more prefill (model(**x))
    assert len(seen) == 4 * n
    prefill, decode = seen[:n] + seen[3 * n :], seen[n : 3 * n]
    assert all(m is None and b is not None and b.dim() == 2 for i, m, b in prefill if i >= L)
    assert all(b is None for i, _, b in prefill if i < L)
    # decode steps keep the cheap (B, 1, 1, K) mask (no causal part; no K/V copy)
    assert decode and all(b is None and (i < L or m.dim() == 4) for i, m, b in decode)

    pact.api.engine_of(model).set_fast_sdpa(False)
    assert text_cfg._attn_implementation == "sdpa"
    slow = run()
    valid = x["attention_mask"].bool()
    assert torch.allclose(fast[0][valid], slow[0][valid], atol=1e-5, rtol=1e-5)
    assert torch.allclose(fast[1], slow[1], atol=1e-5, rtol=1e-5)
    assert torch.equal(fast[2], slow[2])

    pact.api.engine_of(model).set_fast_sdpa(True)
    assert text_cfg._attn_implementation == PACT_SDPA
    pact.remove(model)
    assert text_cfg._attn_implementation == "sdpa"
