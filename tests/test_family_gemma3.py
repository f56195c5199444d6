"""Gemma 3 (``gemma3``): per-layer rotary tables and masks on a reduced layout.

Gemma 3's full layers attend "causal OR same image block" (the tokens of one image see each other in
both directions) and its sliding layers AND that with a sliding window; the two kinds use different
rotary tables. ``build_block_window_mask`` states the pattern per key (row order, original image
block, rotary position), checked here against the stock transformers mask builder and hand-worked
answers; the engine hook (``ModelAdapter.layer_attention``) is checked on a tiny Gemma 3: reduction
off / removed bit-identical, cached == uncached past the window, left-padded batch == alone, text
after image == stock, and the stock pattern kept among the kept tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import (
    create_masks_for_vision_model,
    get_block_sequence_ids_for_mask,
)

import pact.testing as T
from pact.ops.attention import build_block_window_mask

NEG = float("-inf")


def stock_visible(token_type_ids: torch.Tensor, attention_mask: torch.Tensor, window: int) -> dict:
    """The stock Gemma 3 masks (eager) of a prompt as bool "visible" (B, T, T), per layer kind."""
    cfg = Gemma3TextConfig(
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=8,
        sliding_window=window,
        layer_types=["sliding_attention", "full_attention"],
        vocab_size=10,
    )
    cfg._attn_implementation = "eager"
    B, T = token_type_ids.shape
    masks = create_masks_for_vision_model(
        config=cfg,
        inputs_embeds=torch.zeros(B, T, 8),
        attention_mask=attention_mask,
        past_key_values=None,
        position_ids=torch.arange(T)[None].expand(B, T),
        block_sequence_ids=get_block_sequence_ids_for_mask(token_type_ids),
    )
    return {kind: m[:, 0] == 0 for kind, m in masks.items()}


def pact_inputs(token_type_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple:
    """(key_bias, key_block, key_position) of an unreduced layout, as the engine would build them."""
    valid = attention_mask.bool()
    block = get_block_sequence_ids_for_mask(token_type_ids)
    block = torch.where(valid, block, -1)
    bias = torch.where(valid, 0.0, NEG)
    position = torch.arange(token_type_ids.shape[1])[None].expand_as(token_type_ids)
    return bias, block, position


@pytest.mark.parametrize("window", [1, 2, 3, 5, 64])
def test_block_window_mask_equals_the_stock_gemma3_masks(window):
    """Unreduced layout (two samples, left padding, two images in one, adjacent text): the pattern is
    exactly the stock one on every non-padding query row, for sliding and full layers."""
    token_types = torch.tensor(
        [
            [0, 0, 1, 1, 1, 1, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0],
        ]
    )
    attention_mask = torch.tensor([[1] * 11, [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    stock = stock_visible(token_types, attention_mask, window)
    bias, block, position = pact_inputs(token_types, attention_mask)
    T = token_types.shape[1]
    for kind, w in (("sliding_attention", window), ("full_attention", None)):
        ours = build_block_window_mask(bias, block, position, T, w, torch.float32)[:, 0]
        for b in range(2):
            rows = attention_mask[b].bool()
            assert torch.equal(ours[b][rows] == 0, stock[kind][b][rows]), (kind, b)


def test_reduced_layout_hand_worked():
    """Reduced layout: text at positions 0, 1; an image at 2..7 of which 3 and 6 are kept (6 merged,
    size 3); text at 8, 9. W = 3 over original positions.

    rows:      0  1  2(p3)  3(p6)  4(p8)  5(p9)
    full:      causal, plus rows 2 and 3 see each other (one image block);
    sliding:   a key is visible when its position > query position - 3:
               row 2 (p3) sees p1, p3, p6 (block, future); row 3 (p6) sees p6 and, in its block, p3?
               p3 > 6 - 3 is false: no; row 4 (p8) sees p6, p8; row 5 (p9) sees p8, p9.
    """
    bias = torch.tensor([[0.0, 0.0, 0.0, math.log(3), 0.0, 0.0]])
    block = torch.tensor([[-1, -1, 0, 0, -1, -1]])
    position = torch.tensor([[0, 1, 3, 6, 8, 9]])
    full = build_block_window_mask(bias, block, position, 6, None, torch.float32)[0, 0]
    sliding = build_block_window_mask(bias, block, position, 6, 3, torch.float32)[0, 0]
    full_visible = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1],
        ]
    ).bool()
    sliding_visible = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 1, 1, 1, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 1, 1],
        ]
    ).bool()
    assert torch.equal(torch.isfinite(full), full_visible)
    assert torch.equal(torch.isfinite(sliding), sliding_visible)
    # the merged token's log(size) is on every query that sees it
    assert torch.allclose(full[:, 3][full_visible[:, 3]], torch.tensor(math.log(3)))
    assert torch.allclose(sliding[:, 3][sliding_visible[:, 3]], torch.tensor(math.log(3)))


def test_decode_rows_are_the_last_keys_and_padding_rows_stay_finite():
    """q_len < K (a cached step: the queries are the last q_len keys); a padding query (it sees only
    padding) gets 0 on its own key instead of an all -inf row."""
    bias = torch.tensor([[NEG, 0.0, 0.0, 0.0, 0.0], [NEG, NEG, NEG, NEG, 0.0]])
    block = torch.tensor([[-1, 0, 0, -1, -1], [-1, -1, -1, -1, -1]])
    position = torch.tensor([[0, 0, 1, 2, 3], [0, 0, 0, 0, 0]])
    m = build_block_window_mask(bias, block, position, 2, 2, torch.float32)[:, 0]
    # sample 0: query p2 sees p1 (1 > 2 - 2) and itself, not p0; query p3 sees p2 and itself
    assert torch.equal(torch.isfinite(m[0]), torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]).bool())
    # sample 1: the first query row is padding only -> its own key (column 3) gets 0
    assert m[1, 0, 3] == 0 and torch.isneginf(m[1, 0, :3]).all()


def test_block_window_mask_rejects_bad_arguments():
    bias = torch.zeros(1, 4)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="key_block"):
        build_block_window_mask(bias, ids[:, :3], ids, 4, None, torch.float32)
    with pytest.raises(ValueError, match="q_len"):
        build_block_window_mask(bias, ids, ids, 5, None, torch.float32)
    with pytest.raises(ValueError, match="window"):
        build_block_window_mask(bias, ids, ids, 4, 0, torch.float32)


# ------------------------------------------------------------------ the engine on a tiny Gemma 3
#
# The family's tiny model (pact.testing) with a shorter window (8), fed token-level prompts, so that
# the hand-worked window answers below can be read off the prompt.

IMG, BOI, EOI, BOS = (
    T.token_id(t) for t in ("<image_soft_token>", "<start_of_image>", "<end_of_image>", "<bos>")
)
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
WINDOW = 8


def tiny_gemma3(impl: str, layers: int = 4):
    model = T.tiny_model(
        "gemma3",
        attn_implementation=impl,
        num_hidden_layers=layers,
        text_overrides={"sliding_window": WINDOW},
    )
    assert model.config.get_text_config().layer_types == [LAYER_TYPES[i % 2] for i in range(layers)]
    return model


def prompt(text: list[int], images: int = 1, between: list[int] = (40, 41, 42)) -> list[int]:
    """bos, text, then ``images`` image runs (boi, 16 soft tokens, eoi) separated by ``between``
    (pan-and-scan crops are such runs), then a question."""
    ids = [BOS, *text]
    for k in range(images):
        if k:
            ids += list(between)
        ids += [BOI] + [IMG] * 16 + [EOI]
    return [*ids, 7, 8, 9, 10, 11, 12]


def batch(prompts: list[list[int]]) -> dict:
    """Left-padded inputs (token_type_ids 1 at image soft tokens, as Gemma3Processor gives them);
    the k-th image of every prompt is the same random image, so a sample alone and in a batch sees
    the same pixels."""
    T_ = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (T_ - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T_ - len(p)) + [1] * len(p) for p in prompts])
    x = {"input_ids": ids, "attention_mask": mask, "token_type_ids": (ids == IMG).long()}
    images = [
        torch.randn(3, 56, 56, generator=torch.Generator().manual_seed(k + 1))
        for p in prompts
        for k in range(p.count(BOI))
    ]
    if images:
        x["pixel_values"] = torch.stack(images)
    return x


def install(model, config: str = "pact", **overrides):
    """``pact.apply`` (replacing any earlier installation) and the engine it installed."""
    import pact
    import pact.api

    pact.api.remove(model)
    pact.api.apply(model, pact.load_config(config, **overrides))
    return pact.api.engine_of(model)


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).logits


def greedy_uncached(model, x, steps: int) -> list[list[int]]:
    """Greedy tokens from full (uncached) forwards of prompt + generated tokens."""
    ids, mask, types = x["input_ids"], x["attention_mask"], x["token_type_ids"]
    out = []
    for _ in range(steps):
        y = {**x, "input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        nxt = logits(model, y)[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        types = torch.cat([types, torch.zeros_like(nxt)], 1)
    return torch.cat(out, 1).tolist()


def greedy_cached(model, x, steps: int) -> list[list[int]]:
    with torch.no_grad():
        g = model.generate(**x, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    return g[:, x["input_ids"].shape[1] :].tolist()


IMPLS = ["eager", "sdpa"]


@pytest.mark.parametrize("impl", IMPLS)
def test_reduction_off_and_remove_are_bit_identical(impl):
    model = tiny_gemma3(impl)
    x = batch([prompt([5, 6]), prompt([5], images=2)])
    stock = logits(model, x)
    import pact.api

    install(model, "pact", reduction=False)
    assert torch.equal(logits(model, x), stock)
    install(model, "pact", layer=1)
    assert not torch.equal(logits(model, x), stock)
    pact.api.remove(model)
    assert torch.equal(logits(model, x), stock)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_cached_equals_uncached_greedy_past_the_window(impl, layer):
    """Reduction at a sliding (0, 2) or full (1) layer, followed by both kinds; the prompt (29
    tokens) and the decode run past the window (8): the sliding caches keep only their last 7 rows."""
    model = tiny_gemma3(impl)
    x = batch([prompt([5, 6, 20, 21, 22])])
    install(model, "pact", layer=layer)
    assert greedy_cached(model, x, 10) == greedy_uncached(model, x, 10)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("config", ["pact", "fastv"])
def test_left_padded_batch_equals_each_alone(impl, config):
    model = tiny_gemma3(impl)
    prompts = [prompt([5, 6]), [BOS, 30, 31, 32, 7, 8], prompt([5], images=2)]
    install(model, config, layer=1)
    together = batch(prompts)
    got = logits(model, together)[:, -1]
    tokens = greedy_cached(model, together, 6)
    for b, p in enumerate(prompts):
        alone = batch([p])
        torch.testing.assert_close(got[b], logits(model, alone)[0, -1], rtol=1e-4, atol=1e-4)
        assert tokens[b] == greedy_cached(model, alone, 6)[0]


@pytest.mark.parametrize("impl", IMPLS)
def test_text_only_after_image_is_stock(impl):
    model = tiny_gemma3(impl)
    text = batch([[BOS, 30, 31, 32, 33, 7, 8]])
    stock = logits(model, text)
    stock_tokens = greedy_cached(model, text, 5)
    install(model, "pact", layer=1)
    logits(model, batch([prompt([5, 6])]))
    assert torch.equal(logits(model, text), stock)
    assert greedy_cached(model, text, 5) == stock_tokens


def captured_masks(model, x) -> dict[int, torch.Tensor]:
    """The attention_mask every decoder layer receives (after pact's hooks, registered later)."""
    got, handles = {}, []
    for i, layer in enumerate(model.model.language_model.layers):

        def hook(module, args, kwargs, i=i):
            got[i] = kwargs["attention_mask"]

        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    logits(model, x)
    for h in handles:
        h.remove()
    return got


def visible_of(mask: torch.Tensor) -> torch.Tensor:
    """bool (B, 1, Q, K): True where a query sees a key (stock sdpa masks are bool, eager additive
    with the dtype's minimum; pact's are additive with -inf)."""
    if mask.dtype == torch.bool:
        return mask
    return torch.isfinite(mask) & (mask > torch.finfo(mask.dtype).min / 2)


@pytest.mark.parametrize("impl", IMPLS)
def test_reduced_layers_keep_the_stock_pattern_among_kept_tokens(impl):
    """For every pair of kept tokens, a reduced layer's mask lets the query see the key exactly when
    the stock layer's mask does, on full and sliding layers: reduced image tokens attend to each other
    in both directions (one block), different crops do not (two blocks, text between), and the
    window is over original positions (text after the image never sees text the stock window
    excludes, though fewer rows lie between)."""
    model = tiny_gemma3(impl)
    x = batch([prompt([5, 6, 20], images=2)])
    stock = {i: visible_of(m)[0, 0] for i, m in captured_masks(model, x).items()}
    engine = install(model, "pact", layer=1, keep_ratio=0.3)
    ours = captured_masks(model, x)
    lay = engine.layout
    orig = lay.slot_orig[0]
    assert engine.stats().visual_after[0] < engine.stats().visual_before[0]
    ids = x["input_ids"][0]
    # the text between the crops (and every other text token) is never removed
    text_positions = torch.nonzero(ids != IMG).flatten()
    assert set(text_positions.tolist()) <= set(orig.tolist())
    for i in (1, 2, 3):
        visible = torch.isfinite(ours[i][0, 0])
        expect = stock[i][orig][:, orig]
        assert torch.equal(visible, expect), f"layer {i} ({LAYER_TYPES[i]})"
    # kept image tokens of the first crop: all see each other (bidirectional), in a full layer
    first = (ids[orig] == IMG) & (orig < int(torch.nonzero(ids == EOI)[0]))
    block = torch.isfinite(ours[3][0, 0])[first][:, first]
    assert bool(block.all()) and int(first.sum()) > 1


def test_window_is_over_original_positions_hand_worked():
    """Layer 2 (sliding, W = 8) after a reduction at layer 1 that keeps 2 of 16 image tokens: the last
    token (original position p) sees exactly the keys at original positions > p - 8 (and no key the
    window over reduced rows would add)."""
    model = tiny_gemma3("eager")
    x = batch([prompt([5, 6])])
    engine = install(model, "fastv", layer=1, keep_ratio=0.125)
    mask = captured_masks(model, x)[2][0, 0]
    orig = engine.layout.slot_orig[0]
    p = int(orig[-1])
    seen = orig[torch.isfinite(mask[-1])]
    assert seen.tolist() == [int(o) for o in orig if p - WINDOW < int(o) <= p]
    assert len(seen) < WINDOW  # rows: the last 8 rows would reach back into the image


def test_flash_attention_is_refused_with_the_reason():
    from pact.config import load_config
    from pact.engine import check_attention_backend
    from pact.methods.base import build_method
    from pact.models.gemma3 import Gemma3Adapter

    model = tiny_gemma3("eager")
    model.config.get_text_config()._attn_implementation = "flash_attention_2"
    cfg = load_config("pact", proportional_attention=False)
    with pytest.raises(ValueError, match="image blocks, sliding windows"):
        check_attention_backend(Gemma3Adapter(model), cfg, build_method(cfg))


@pytest.mark.parametrize("config", ["pact", "fastv"])
def test_query_pre_attn_scalar_other_than_head_dim_is_accepted(config):
    """Gemma 3 27B's scale shape (query_pre_attn_scalar 168 with head_dim 128; here 21 with 16): the
    adapter accepts it, reads each layer's scale from the model, and PACT / FastV run end to end
    (cached == uncached greedy, visual tokens removed)."""
    from pact.models.gemma3 import Gemma3Adapter

    model = tiny_gemma3("sdpa")
    model.config.get_text_config().query_pre_attn_scalar = 21
    for layer in model.model.language_model.layers:
        layer.self_attn.scaling = 21**-0.5  # what Gemma3Attention sets from that config
    adapter = Gemma3Adapter(model)
    adapter.check_supported()
    assert [adapter.attention_scale(layer) for layer in adapter.layers] == [21**-0.5] * len(adapter.layers)
    engine = install(model, config, layer=1)
    x = batch([prompt([5, 6, 20, 21, 22])])
    assert greedy_cached(model, x, 6) == greedy_uncached(model, x, 6)
    record = engine.stats().records[0][0]
    assert 0 < record.kept.numel() < 16


BUNDLED = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.json"))
TINY_OVERRIDES = {"dbscan": {"dbscan_eps": 0.9}, "holitom": {"holitom_inner_layer": 4}}  # as for 6 layers


@pytest.mark.parametrize("name", BUNDLED)
def test_every_bundled_config_runs_or_is_refused_with_a_reason(name):
    """On a 6-layer tiny Gemma 3 (sliding and global layers alternating): each bundled config either
    is refused at install with a ValueError naming the family or the setting, or runs a left-padded
    batch (two images, text only, one image) whose last-token logits equal each sample's alone."""
    model = tiny_gemma3("sdpa", layers=6)
    prompts = [prompt([5], images=2), [BOS, 30, 31, 32, 7, 8], prompt([5, 6])]
    try:
        engine = install(model, name, **TINY_OVERRIDES.get(name, {}))
    except ValueError as err:
        assert "gemma3" in str(err) or "video" in str(err), err
        return
    together = logits(model, with_positions(batch(prompts)))[:, -1]
    assert torch.isfinite(together).all()
    batched = engine.stats().records
    for b, p in enumerate(prompts):
        alone = logits(model, with_positions(batch([p])))[0, -1]
        if name in CENTER_TIES:
            # the same clusters (labels up to renaming); which member of a two-token cluster is its
            # center is an exact tie (both are equally far from their mean), broken by rounding
            for step, records in enumerate(engine.stats().records):
                assert (batched[step][b] is None) == (records[0] is None)
                if records[0] is not None:
                    assert partition(batched[step][b].labels) == partition(records[0].labels)
            continue
        torch.testing.assert_close(together[b], alone, rtol=1e-4, atol=1e-4)
    greedy_cached(model, batch(prompts), 2)


CENTER_TIES = {"kmeans"}


def partition(labels: torch.Tensor) -> set[frozenset[int]]:
    """The clusters of ``labels`` as sets of member indices (ignoring the cluster ids)."""
    clusters: dict[int, set[int]] = {}
    for i, label in enumerate(labels.tolist()):
        if label >= 0:
            clusters.setdefault(label, set()).add(i)
    return {frozenset(c) for c in clusters.values()}


def with_positions(x: dict) -> dict:
    """``x`` with position ids counted from each sample's first token (as generate builds them), so
    that a sample has the same positions alone and left-padded: DART's pivots and k-means'
    assignments otherwise flip between the two on rounding differences of the RoPE tables at shifted
    absolute positions (measured: the same sample alone, positions + 20, flips them too)."""
    return {**x, "position_ids": (x["attention_mask"].cumsum(-1) - 1).clamp(min=0)}


@pytest.mark.parametrize("mode", ["renumber", "mean"])
@pytest.mark.parametrize("layer", [0, 1])
def test_position_modes_cached_equals_uncached_and_batch_equals_alone(mode, layer):
    """``renumber`` (the window then runs over the reduced sequence's positions, in prefill and
    decode) and ``mean`` (merged tokens at their members' mean position) keep the guarantees."""
    model = tiny_gemma3("sdpa")
    install(model, "pact", layer=layer, position_mode=mode)
    x = batch([prompt([5, 6, 20, 21, 22])])
    assert greedy_cached(model, x, 8) == greedy_uncached(model, x, 8)
    prompts = [prompt([5], images=2), prompt([5, 6])]
    together = logits(model, with_positions(batch(prompts)))[:, -1]
    for b, p in enumerate(prompts):
        alone = logits(model, with_positions(batch([p])))[0, -1]
        torch.testing.assert_close(together[b], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config", ["tome", "v2drop"])
def test_progressive_methods_cached_equals_uncached(config):
    """Several reduction steps across sliding and global layers (each step's layout gets each
    table's cos/sin anew; the scores of a step use its own layer's table). Not PDrop or SparseVLM:
    their scores read the text after the images (the last token's query, the text raters), which an
    uncached re-prefill extends with every generated token."""
    model = tiny_gemma3("eager", layers=6)
    engine = install(model, config, **TINY_OVERRIDES.get(config, {}))
    x = batch([prompt([5, 6, 20, 21, 22], images=2)])
    cached = greedy_cached(model, x, 6)
    assert len(engine.stats().layers) > 1
    assert cached == greedy_uncached(model, x, 6)


# ------------------------------------------------------------------ through the stock processor


def pan_and_scan_inputs(processor, samples: list[dict]) -> dict:
    """Left-padded inputs of the stock Gemma3Processor with pan-and-scan on (at the tiny scale: crops
    of at least 28 px): a wide image becomes the original plus crops, each its own run of soft tokens
    after "Here is the original image ... and here are some crops ..." text."""
    texts = [
        processor.apply_chat_template(T.prompt_messages(s), tokenize=False, add_generation_prompt=True)
        for s in samples
    ]
    images = [list(s.get("images") or ()) for s in samples]
    return processor(
        text=texts,
        images=images if any(images) else None,
        do_pan_and_scan=True,
        pan_and_scan_min_crop_size=28,
        padding=True,
        return_tensors="pt",
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_pan_and_scan_crops_are_images_and_the_text_between_stays(impl):
    """A pan-and-scan prompt from the stock processor (the original image + 3 crops of a 200 x 60
    image), next to a plain image and a text-only sample: each crop is a 4 x 4 grid of its own, every
    text token (the "Here is the original image ... crops ..." text between the runs) is kept, and
    the batch equals each sample alone, cached greedy equals uncached."""
    import pact
    import pact.api
    from pact.models import get_adapter

    model = T.tiny_model("gemma3", attn_implementation=impl)
    processor = T.tiny_processor("gemma3")
    samples = [
        {"question": "What is here?", "images": [T.sample_image(0, size=(200, 60))]},
        {
            "question": "Describe the picture.",
            "images": [T.sample_image(1, size=(64, 64))],
        },  # square: no crops
        {"question": "Answer with a single word."},
    ]
    x = pan_and_scan_inputs(processor, samples)
    ids = x["input_ids"][0]
    adapter = get_adapter(model)
    groups = adapter.visual_groups(x["input_ids"], x)
    assert [(g.kind, g.rows, g.cols) for g in groups[0]] == [("image", 4, 4)] * 4
    assert [(g.kind, g.rows, g.cols) for g in groups[1]] == [("image", 4, 4)]
    assert "Here is the original image" in processor.tokenizer.decode(ids)
    pact.api.apply(model, pact.load_config("pact", layer=1, keep_ratio=0.25))
    with torch.no_grad():
        together = model(**x).logits[:, -1]
    engine = pact.api.engine_of(model)
    for b in range(3):
        valid = x["attention_mask"][b].bool()
        orig = engine.layout.slot_orig[b]
        text = torch.nonzero(valid & (x["input_ids"][b] != IMG)).flatten()
        assert set(text.tolist()) <= set(orig.tolist()), f"sample {b}: text removed"
    st = pact.api.stats(model)
    assert st.visual_before == [64, 16, 0] and st.visual_after[0] < 64
    for b, one in enumerate(samples):
        alone = pan_and_scan_inputs(processor, [one])
        with torch.no_grad():
            torch.testing.assert_close(model(**alone).logits[0, -1], together[b], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        cached = model.generate(**x, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        uncached = model.generate(**x, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    pact.api.remove(model)
