"""position_mode="renumber", and the token order and new tokens a Reduction may ask for.

Renumber (1-D RoPE families): after a reduction the layers >= L see contiguous positions over each
sample's reduced sequence and decoding continues from the reduced length, which is what a model
computes when the tokens are removed before it (the official vision-side methods). M-RoPE families
(Qwen2-VL, Qwen2.5-VL): kept tokens keep their (t, h, w) ids, as the official Qwen ports do (see
docs/CONFIGDOC.md). The strongest check is independent of the engine: the stock model run on the
physically shortened input gives the same logits and greedy tokens.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import ATTENTION, FAMILIES, greedy, inputs_for, model_for, one_image, stock_embeds

import pact
import pact.api
from pact import testing
from pact.methods.base import Method, Signals
from pact.models import ADAPTERS, get_adapter
from pact.ops.reduction import Reduction

L = 2
MROPE = tuple(family for family, adapter in ADAPTERS.items() if adapter.mrope)


class ReorderExtra(Method):
    """Test method: keep the even visual tokens (merged with their odd partner when ``merge``, else
    the odd ones are pruned); place the kept tokens in reverse order (``reverse``) and append
    ``n_extra`` new tokens (k-th: k * the mean of all visual hidden states) after them."""

    name = "reorder_extra"

    def __init__(self, config: Any, merge: bool = False, reverse: bool = True, n_extra: int = 1) -> None:
        super().__init__(config)
        self.merge, self.reverse, self.n_extra = merge, reverse, n_extra
        self.extras: list[torch.Tensor] = []
        self.hiddens: list[torch.Tensor | None] = []

    def reduce(self, s: Signals) -> Reduction:
        n, dev = s.num_visual, s.hidden.device
        idx = torch.arange(n, device=dev)
        kept = idx[::2]
        vis = s.hidden[s.visual_mask].float()
        if self.merge:
            labels = idx // 2
            total = torch.zeros(kept.numel(), vis.shape[1], device=dev).index_add_(0, labels, vis)
            count = torch.zeros(kept.numel(), device=dev).index_add_(0, labels, torch.ones(n, device=dev))
            sizes = torch.zeros(kept.numel(), device=dev).index_add_(0, labels, s.sizes.float())
            hidden = total / count[:, None]
        else:
            labels = torch.where(idx % 2 == 0, idx // 2, -1)
            sizes, hidden = s.sizes[kept].float(), None
        self.hiddens.append(hidden)
        order = torch.arange(kept.numel(), device=dev).flip(0) if self.reverse else None
        extra = None
        if self.n_extra:
            scale = torch.arange(1, self.n_extra + 1, device=dev, dtype=torch.float32)[:, None]
            extra = vis.mean(0, keepdim=True) * scale
            self.extras.append(extra)
        return Reduction(kept=kept, sizes=sizes, hidden=hidden, labels=labels, order=order, extra=extra)


def apply_method(model, layer: int = 0, position_mode: str = "renumber", **kw) -> ReorderExtra:
    c = pact.load_config(None, layer=layer, pruning="none", clustering="none", position_mode=position_mode)
    method = ReorderExtra(c, **kw)
    pact.api.apply(model, c, method=method)
    return method


def two_samples(family: str) -> list[dict]:
    return [
        one_image(family, 0, (96, 64), "What is in the image?"),
        one_image(family, 1, (64, 120), "Describe the picture in one sentence."),
    ]


def shortened(
    model,
    x,
    record,
    extra: torch.Tensor,
    merged: torch.Tensor | None = None,
    left_out: frozenset = frozenset(),
) -> tuple[list[int], torch.Tensor]:
    """The official construction of a vision-side method for sample 0 of ``x``: pruned visual tokens
    physically removed, the kept ones in ``record.order`` (with the hidden states ``merged[r]`` of
    kept token r when given), the new tokens right after them; the non-visual sequence indices in
    ``left_out`` (image newlines) left out too.

    Returns (source, embeds): source[r] = original sequence index of row r (-1 for a new token) and
    the (R', D) input embeddings of the short sequence."""
    embeds = stock_embeds(model, x)[0]
    visual = testing.patch_token_mask(model, x)[0]
    pos = visual.nonzero().flatten().tolist()  # sequence index of visual token j
    kept = record.kept.tolist()
    placed = [kept[k] for k in record.order.tolist()] if record.order is not None else kept
    kept_slots = {pos[j] for j in kept}
    source: list[int] = []
    k = 0
    for t in range(embeds.shape[0]):
        if t in kept_slots:
            source.append(pos[placed[k]])
            k += 1
            if k == len(placed):
                source.extend([-1] * extra.shape[0])
        elif not visual[t] and t not in left_out:
            source.append(t)
    if merged is not None:
        embeds = embeds.clone()
        embeds[torch.tensor(pos)[record.kept]] = merged.to(embeds.dtype)
    rows, e = [], 0
    for t in source:
        if t >= 0:
            rows.append(embeds[t])
        else:
            rows.append(extra[e].to(embeds.dtype))
            e += 1
    return source, torch.stack(rows)


def short_injection_kwargs(model, x, source: list[int]) -> dict:
    """The DeepStack arguments (Qwen3-VL) that give the stock text model the features of the
    shortened sequence's rows (sample 0 of ``x``): a kept token its own, a new token none. Empty for
    families whose text model adds no visual features."""
    adapter = get_adapter(model)
    if not adapter.injects_visual_features:
        return {}
    got = []
    handle = adapter.text_model.register_forward_pre_hook(
        lambda m, a, k: got.append(adapter.take_visual_injection(dict(k))), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(**x)
    finally:
        handle.remove()
    mask = got[0].mask[0]
    row_of = mask.long().cumsum(0) - 1
    receives = [t >= 0 and bool(mask[t]) for t in source]
    rows = torch.tensor([int(row_of[t]) for t, r in zip(source, receives, strict=True) if r])
    features = [got[0].features[k][rows] for k in sorted(got[0].features)]
    return {"visual_pos_masks": torch.tensor(receives)[None], "deepstack_visual_embeds": features}


def short_token_types(model, x, source: list[int]) -> torch.Tensor | None:
    """(1, R') ``token_type_ids`` of the shortened sequence (sample 0 of ``x``) for families whose
    stock mask has image blocks (Gemma 3: the tokens of one image attend to each other), None
    otherwise: a kept token keeps its type, a new token takes the type of the row before it (the
    engine puts it in that row's block)."""
    if get_adapter(model).attention_blocks(x["input_ids"], x) is None:
        return None
    types, previous = [], 0
    for t in source:
        previous = int(x["token_type_ids"][0, t]) if t >= 0 else previous
        types.append(previous)
    return torch.tensor([types])


def short_mask_kwargs(model, x, source: list[int], embeds: torch.Tensor) -> dict:
    """The stock text model's masks for the shortened sequence with its image blocks (the mask
    mapping the stock multimodal model builds from ``token_type_ids``); empty without blocks."""
    types = short_token_types(model, x, source)
    if types is None:
        return {}
    from transformers.models.gemma3.modeling_gemma3 import (
        create_masks_for_vision_model,
        get_block_sequence_ids_for_mask,
    )

    mapping = create_masks_for_vision_model(
        config=model.config.get_text_config(),
        inputs_embeds=embeds[None],
        attention_mask=None,
        past_key_values=None,
        position_ids=None,
        block_sequence_ids=get_block_sequence_ids_for_mask(types),
    )
    return {"attention_mask": mapping}


def mrope_positions(model, x) -> torch.Tensor:
    """(3, B, T) the stock M-RoPE position ids of the full prompt."""
    rope, _ = model.model.get_rope_index(
        x["input_ids"],
        mm_token_type_ids=x["mm_token_type_ids"],
        image_grid_thw=x["image_grid_thw"],
        attention_mask=x["attention_mask"],
    )
    return rope


def stock_mrope_greedy(
    model, embeds: torch.Tensor, positions: torch.Tensor, next_id: int, n: int
) -> torch.Tensor:
    """(n,) greedy tokens of the stock text model fed ``embeds`` (R, D) at M-RoPE ``positions``
    (3, 1, R), then decoding with every axis at ``next_id``, ``next_id + 1``, ... (the official
    Qwen ports: cache position + rope_deltas of the full prompt)."""
    from transformers import DynamicCache

    text_model = get_adapter(model).text_model
    cache = DynamicCache(config=model.config.get_text_config())
    tokens = []
    with torch.no_grad():
        out = text_model(
            inputs_embeds=embeds[None], position_ids=positions, past_key_values=cache, use_cache=True
        )
        for k in range(n):
            token = model.lm_head(out.last_hidden_state[:, -1]).argmax(-1)  # (1,)
            tokens.append(token)
            if k + 1 == n:
                break
            pos = torch.full((3, 1, 1), next_id + k, dtype=torch.long)
            step = model.get_input_embeddings()(token)[:, None]
            out = text_model(inputs_embeds=step, position_ids=pos, past_key_values=cache, use_cache=True)
    return torch.cat(tokens)


def stock_greedy(model, embeds: torch.Tensor, prefill_kwargs: dict, n: int) -> torch.Tensor:
    """(n,) greedy tokens of the stock text model fed ``embeds`` (R, D) at positions 0..R-1 with
    ``prefill_kwargs`` (e.g. its masks), then decoding from position R on its own cache."""
    from transformers import DynamicCache

    text_model = get_adapter(model).text_model
    cache = DynamicCache(config=model.config.get_text_config())
    tokens = []
    with torch.no_grad():
        out = text_model(inputs_embeds=embeds[None], past_key_values=cache, use_cache=True, **prefill_kwargs)
        for k in range(n):
            token = model.lm_head(out.last_hidden_state[:, -1]).argmax(-1)  # (1,)
            tokens.append(token)
            if k + 1 == n:
                break
            step = model.get_input_embeddings()(token)[:, None]
            out = text_model(inputs_embeds=step, past_key_values=cache, use_cache=True)
    return torch.cat(tokens)


# ---------------------------------------------------------------------------------------------------
# The independent construction: the stock model on the shortened input


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", FAMILIES)
def test_renumber_at_layer_0_equals_stock_model_on_shortened_input(family, attn):
    model, _ = model_for(family, attn)
    x = inputs_for(family, [one_image(family)])
    method = apply_method(model, layer=0, n_extra=2)
    with torch.no_grad():
        reduced = model(**x).logits[0]
    record = pact.api.stats(model).records[0][0]
    extra = method.extras[-1]
    reduced_gen = greedy(model, x, n=3)[0]
    pact.api.remove(model)

    source, short = shortened(model, x, record, extra)
    assert len(source) == x["input_ids"].shape[1] - len(record.labels) + len(record.kept) + 2
    text_model = get_adapter(model).text_model
    positions = None
    if family in MROPE:  # the ports' definition: the full prompt's ids of the kept tokens
        full = mrope_positions(model, x)[:, 0]
        cols, prev = [], 0
        for t in source:  # a new token takes the position of the token before it
            prev = t if t >= 0 else prev
            cols.append(prev)
        positions = full[:, cols][:, None]
    deepstack = short_injection_kwargs(model, x, source)
    blocks = short_mask_kwargs(model, x, source, short)
    with torch.no_grad():
        hidden = text_model(
            inputs_embeds=short[None], position_ids=positions, **deepstack, **blocks
        ).last_hidden_state
        stock = model.lm_head(hidden)[0]
    rows = [r for r, t in enumerate(source) if t >= 0]
    torch.testing.assert_close(reduced[[source[r] for r in rows]], stock[rows], atol=1e-5, rtol=1e-4)
    if family in MROPE:
        # the ports decode stock: cache position (unreduced timeline) + rope_deltas of the full
        # prompt, i.e. every axis continues from the full prompt's largest id + 1
        assert torch.equal(stock_mrope_greedy(model, short, positions, int(full.max()) + 1, 3), reduced_gen)
    else:  # decoding continues from the reduced length
        with torch.no_grad():
            if blocks:  # Gemma 3 (generate takes no inputs_embeds): the text model, then decode
                assert torch.equal(stock_greedy(model, short, blocks, 3), reduced_gen)
                return
            out = model.generate(
                inputs_embeds=short[None],
                attention_mask=torch.ones(1, short.shape[0], dtype=torch.long),
                max_new_tokens=3,
                min_new_tokens=3,
                do_sample=False,
            )
        assert torch.equal(out[0, -3:], reduced_gen)


# ---------------------------------------------------------------------------------------------------
# Engine guarantees under renumber (with reordering and new tokens)


@pytest.mark.parametrize("layer", [0, L])
@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", FAMILIES)
def test_renumber_cached_equals_uncached(family, attn, layer):
    model, _ = model_for(family, attn)
    x = inputs_for(family, two_samples(family))
    apply_method(model, layer=layer, merge=True)
    cached = greedy(model, x, n=4)
    assert pact.api.stats(model).layers == [layer]
    assert torch.equal(cached, greedy(model, x, n=4, use_cache=False))


@pytest.mark.parametrize("layer", [0, L])
@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", FAMILIES)
def test_renumber_batch_equals_single(family, attn, layer):
    model, _ = model_for(family, attn)
    samples = [*two_samples(family), {"question": "Is there a red circle on the left? Answer yes or no."}]
    if family == "llava_onevision":  # a two-image sample too (one crop per image)
        images = [testing.sample_image(2), testing.sample_image(3, size=(80, 80))]
        samples.append({"question": "Compare the two images.", "images": images})
    apply_method(model, layer=layer, merge=True)
    x = inputs_for(family, samples)
    assert not x["attention_mask"].all()  # left padding present
    batch = greedy(model, x, n=4)
    for b, s in enumerate(samples):
        assert torch.equal(batch[b], greedy(model, inputs_for(family, [s]), n=4)[0]), f"sample {b}"


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", FAMILIES)
def test_renumber_text_only_after_image_is_stock(family, attn):
    model, _ = model_for(family, attn)
    text = inputs_for(family, [{"question": "What color is the sky?"}])
    with torch.no_grad():
        stock = model(**text).logits
        stock_gen = greedy(model, text)
        apply_method(model, layer=0)
        greedy(model, inputs_for(family, [one_image(family)]))
        assert pact.api.stats(model).layers == [0]
        assert torch.equal(model(**text).logits, stock)
        assert torch.equal(greedy(model, text), stock_gen)


@pytest.mark.parametrize("layer", [0, L])
@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", FAMILIES)
def test_renumber_logits_keep_input_length_and_stats_count_new_tokens(family, attn, layer):
    model, _ = model_for(family, attn)
    x = inputs_for(family, two_samples(family))
    apply_method(model, layer=layer, n_extra=2)
    with torch.no_grad():
        out = model(**x, labels=x["input_ids"])
    assert out.logits.shape[:2] == x["input_ids"].shape
    assert torch.isfinite(out.loss)
    st = pact.api.stats(model)
    for b, rec in enumerate(st.records[0]):
        n = st.visual_before[b]
        assert rec.kept.tolist() == list(range(0, n, 2))
        assert rec.order.tolist() == list(range(len(rec.kept)))[::-1]
        assert rec.extra == 2
        assert st.visual_after[b] == len(rec.kept) + 2  # new tokens are counted
    lay = pact.api.engine_of(model).layout
    valid = x["attention_mask"].sum(1)
    after = valid - torch.tensor(st.visual_before) + torch.tensor(st.visual_after)
    assert torch.equal((lay.slot_orig >= 0).sum(1), after)


# ---------------------------------------------------------------------------------------------------
# Positions


def grab_rope(model, layers: tuple[int, ...]) -> tuple[list, list]:
    seen: list = []
    handles = [
        get_adapter(model)
        .text_model.layers[i]
        .register_forward_pre_hook(
            lambda m, a, k, i=i: seen.append((i, a[0].shape[1], k["position_embeddings"][0].clone())),
            with_kwargs=True,
        )
        for i in layers
    ]
    return seen, handles


@pytest.mark.parametrize("family", FAMILIES)
def test_renumber_positions_prefill_and_decode(family):
    """1-D RoPE: layers >= L see cos of 0..R_b-1 over each sample's reduced sequence (left padding
    keeps its own offset), decode steps continue at R_b in layers >= L while layers < L keep the
    stock positions. M-RoPE: exactly the stock (t, h, w) ids of the kept tokens and stock decoding."""
    model, _ = model_for(family)
    x = inputs_for(family, two_samples(family))
    adapter = get_adapter(model)
    kinds = adapter.layer_attention()  # Gemma 3: layer L's own table (sliding layers: the local one)

    def rotary(hidden: torch.Tensor, positions: torch.Tensor):
        if kinds is not None:
            return adapter.layer_rotary(kinds[L].rotary, hidden, positions[None])
        return adapter.text_model.rotary_emb(hidden, positions)

    stock_steps, handles = grab_rope(model, (0, L))
    try:
        greedy(model, x, n=3)
    finally:
        for h in handles:
            h.remove()
    apply_method(model, layer=L, merge=True, n_extra=1)
    seen, handles = grab_rope(model, (0, L))  # after pact's hooks: sees what the layers get
    try:
        greedy(model, x, n=3)
    finally:
        for h in handles:
            h.remove()
    lay = pact.api.engine_of(model).layout
    ok = lay.slot_orig >= 0
    n_reduced = ok.sum(1)
    (_, _, cos0), (_, R, cosL) = seen[:2]
    assert ok.shape[1] == R  # layer L runs on the reduced, left-padded batch
    assert torch.equal(cos0, stock_steps[0][2])  # layer < L: untouched
    decode = [s for s in seen[2:] if s[1] == 1]
    stock_decode = [s for s in stock_steps[2:] if s[1] == 1]
    if family in MROPE:
        rope = mrope_positions(model, x)
        for b in range(lay.positions.shape[1]):
            cols = lay.slot_orig[b][ok[b]]
            assert torch.equal(lay.positions[:, b][:, ok[b]], rope[:, b, cols])
        for a, b in zip(stock_decode, decode, strict=True):
            assert torch.equal(a[2], b[2])
        return
    want = torch.where(ok, ok.long().cumsum(1) - 1, 0)  # generate's positions start at 0 per sample
    assert torch.equal(lay.positions[0], want)
    ref_cos, _ = rotary(cosL, want)
    assert torch.equal(cosL[ok], ref_cos[ok])
    assert len(decode) == 2 * 2  # 2 decode steps x layers (0, L)
    for step in range(2):
        (_, _, c0), (_, _, cl) = decode[2 * step], decode[2 * step + 1]
        assert torch.equal(c0, stock_decode[2 * step][2])  # layer 0 holds the unreduced prompt
        ref, _ = rotary(cl, (n_reduced + step)[:, None])
        assert torch.equal(cl, ref)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("mode", ["center", "mean"])
def test_reordered_tokens_keep_their_positions_and_new_tokens_take_the_previous(family, mode):
    model, _ = model_for(family)
    x = inputs_for(family, [one_image(family)])
    apply_method(model, layer=L, merge=False, n_extra=2, position_mode=mode)
    with torch.no_grad():
        model(**x)
    engine = pact.api.engine_of(model)
    lay, full = engine.layout, engine.state.prefill.positions
    rec = pact.api.stats(model).records[0][0]
    visual = testing.patch_token_mask(model, x)[0]
    pos = visual.nonzero().flatten()
    placed = rec.kept[rec.order]
    slots = lay.visual[0].nonzero().flatten()  # kept visual tokens, in their new order
    assert torch.equal(lay.slot_orig[0, slots], pos[placed])
    assert torch.equal(lay.positions[:, 0, slots], full[:, 0, pos[placed]])  # their own positions
    new = slots[-1] + 1 + torch.arange(2)  # right after the last kept visual token
    assert not lay.visual[0, new].any() and (lay.sizes[0, new] == 1).all()
    for r in new.tolist():
        assert torch.equal(lay.positions[:, 0, r], lay.positions[:, 0, slots[-1]])
        assert torch.equal(lay.cos[0, r], lay.cos[0, slots[-1]])


def test_order_and_extra_with_every_visual_token_removed():
    """No visual token kept but one new token: it sits where the visual span was; output finite."""

    class OnlyExtra(Method):
        def reduce(self, s: Signals) -> Reduction:
            n = s.num_visual
            empty = torch.zeros(0, dtype=torch.long)
            return Reduction(
                kept=empty,
                sizes=torch.zeros(0),
                hidden=None,
                labels=torch.full((n,), -1),
                order=empty,
                extra=s.hidden[s.visual_mask].float().mean(0, keepdim=True),
            )

    model, _ = model_for("llava")
    x = inputs_for("llava", [one_image("llava")])
    c = pact.load_config(None, layer=0, pruning="none", clustering="none", position_mode="renumber")
    pact.api.apply(model, c, method=OnlyExtra(c))
    with torch.no_grad():
        out = model(**x).logits
    assert out.shape[:2] == x["input_ids"].shape and torch.isfinite(out).all()
    st = pact.api.stats(model)
    assert st.visual_after == [1]
    lay = pact.api.engine_of(model).layout
    first_visual = int(testing.patch_token_mask(model, x)[0].nonzero()[0])
    assert lay.slot_orig.shape[1] == x["input_ids"].shape[1] - st.visual_before[0] + 1
    assert int(lay.slot_orig[0, first_visual]) == first_visual - 1  # anchored to the token before
    assert torch.equal(lay.positions[0, 0], torch.arange(lay.slot_orig.shape[1]))


# ---------------------------------------------------------------------------------------------------
# Reduction.validate and configuration


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"order": torch.tensor([0, 0, 1])}, "permutation"),
        ({"order": torch.tensor([0, 1])}, "order must be a LongTensor of shape (3,)"),
        ({"order": torch.tensor([0.0, 1.0, 2.0])}, "order must be a LongTensor"),
        ({"extra": torch.zeros(4)}, "extra must be a floating Tensor of shape (E, D)"),
        ({"extra": torch.zeros(1, 5)}, "extra has width 5, model has 8"),
        ({"extra": torch.full((1, 8), float("nan"))}, "non-finite"),
        ({"extra": torch.zeros(1, 8, dtype=torch.long)}, "floating"),
    ],
)
def test_reduction_validate_checks_order_and_extra(change, message):
    kept = torch.tensor([0, 2, 4])
    base = {
        "kept": kept,
        "sizes": torch.ones(3),
        "hidden": None,
        "labels": torch.tensor([0, -1, 1, -1, 2]),
    }
    Reduction(**base, order=torch.tensor([2, 0, 1]), extra=torch.zeros(2, 8)).validate(5, 8)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Reduction(**base, **change).validate(5, 8)


def test_renumber_is_accepted_and_vision_side_configs_default_to_it():
    model, _ = model_for("llava")
    pact.api.apply(model, pact.load_config(None, layer=1, position_mode="renumber"))
    for name in ("vispruner", "prumerge", "hired"):
        assert pact.load_config(name).position_mode == "renumber", name
    for name in ("pact", "dbdpc", "fastv", "tome", "random", "pooling"):
        assert pact.load_config(name).position_mode == "center", name


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", ["llava", "internvl", "qwen2_vl"])
def test_renumber_progressive_reductions(family, attn):
    """A reduction before every layer from 1 on (tokens reversed and one new token each time): each
    reduced layer decodes from its own reduced length (cached == uncached), batch == single, and
    the composed records stay consistent (a kept token's size = the original tokens mapped to it)."""
    model, _ = model_for(family, attn)
    samples = two_samples(family)
    c = pact.load_config(
        None, layer=1, progressive=True, pruning="none", clustering="none", position_mode="renumber"
    )
    pact.api.apply(model, c, method=ReorderExtra(c, merge=True))
    x = inputs_for(family, samples)
    cached = greedy(model, x, n=4)
    st = pact.api.stats(model)
    assert st.layers == [1, 2, 3]
    for b, rec in enumerate(st.records[-1]):
        members = torch.bincount(rec.labels[rec.labels >= 0], minlength=len(rec.kept))
        assert torch.equal(members.float(), rec.sizes)
        assert rec.labels.ge(0).all()  # merges only: every original token is represented
        assert st.visual_after[b] == len(rec.kept) + 3  # one new token per step
    assert torch.equal(cached, greedy(model, x, n=4, use_cache=False))
    for b, s in enumerate(samples):
        assert torch.equal(cached[b], greedy(model, inputs_for(family, [s]), n=4)[0]), f"sample {b}"


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_renumber_merged_and_reordered_rows_land_in_their_slots(family):
    """Merged hidden states (``Reduction.hidden``) follow their token through ``order``: pact at
    layer 0 without proportional attention equals the stock model on the shortened input built from
    the merged rows."""
    model, _ = model_for(family)
    x = inputs_for(family, [one_image(family)])
    c = pact.load_config(
        None,
        layer=0,
        pruning="none",
        clustering="none",
        position_mode="renumber",
        proportional_attention=False,
    )
    method = ReorderExtra(c, merge=True, n_extra=1)
    pact.api.apply(model, c, method=method)
    with torch.no_grad():
        reduced = model(**x).logits[0]
    record = pact.api.stats(model).records[0][0]
    assert (record.sizes == 2).any() and record.order is not None
    pact.api.remove(model)
    source, short = shortened(model, x, record, method.extras[-1], merged=method.hiddens[-1])
    positions = None
    if family in MROPE:
        full = mrope_positions(model, x)[:, 0]
        cols, prev = [], 0
        for t in source:
            prev = t if t >= 0 else prev
            cols.append(prev)
        positions = full[:, cols][:, None]
    with torch.no_grad():
        hidden = get_adapter(model).text_model(inputs_embeds=short[None], position_ids=positions)
        stock = model.lm_head(hidden.last_hidden_state)[0]
    rows = [r for r, t in enumerate(source) if t >= 0]
    torch.testing.assert_close(reduced[[source[r] for r in rows]], stock[rows], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("plus", [False, True])
def test_bundled_prumerge_equals_stock_model_on_its_official_short_sequence(plus):
    """prumerge.json end to end on tiny LLaVA-1.5: the engine places PruMerge's kept tokens in its
    official (attention-descending) order, with their merged rows, its extra token right after them,
    renumbered positions: the same logits as the stock model fed that short sequence."""
    from pact.methods.base import build_method

    model, _ = model_for("llava", "sdpa")
    x = inputs_for("llava", [one_image("llava")])
    cfg = pact.load_config("prumerge", prumerge_plus=plus)
    method = build_method(cfg)
    seen: list[Reduction] = []
    original_reduce = method.reduce

    def recording_reduce(signals: Signals) -> Reduction:
        seen.append(original_reduce(signals))
        return seen[-1]

    method.reduce = recording_reduce
    pact.api.apply(model, cfg, method=method)
    with torch.no_grad():
        reduced = model(**x).logits[0]
    record = pact.api.stats(model).records[0][0]
    pact.api.remove(model)
    red = seen[-1]
    assert red.num_extra == 1 and record.extra == 1
    if plus:
        assert red.num_kept > 2 and not torch.equal(red.order, torch.arange(red.num_kept))
    source, short = shortened(model, x, record, red.extra, merged=red.hidden)
    with torch.no_grad():
        hidden = get_adapter(model).text_model(inputs_embeds=short[None]).last_hidden_state
        stock = model.lm_head(hidden)[0]
    rows = [r for r, t in enumerate(source) if t >= 0]
    torch.testing.assert_close(reduced[[source[r] for r in rows]], stock[rows], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# HiRED removes LLaVA-NeXT's image newlines (official: image_newline=None)

NEWLINE_FAMILIES = ("llava_next", "llava_onevision")


def newline_slots(model, x) -> torch.Tensor:
    """(B, T) bool: the image-newline slots, from the model itself (rows equal to image_newline),
    independent of the adapter's layout arithmetic."""
    return testing.placeholder_mask(testing.family_of(model), x) & ~testing.patch_token_mask(model, x)


@pytest.mark.parametrize("newlines", ["remove", "keep"])
@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", NEWLINE_FAMILIES)
def test_bundled_hired_equals_stock_model_on_its_official_short_sequence(family, attn, newlines):
    """hired.json end to end: the official code packs the kept patch tokens (base image, then the
    crop grid, in raster order) WITHOUT image newlines and numbers the short sequence 0..R-1; the
    engine gives the same logits and greedy tokens as the stock model fed that sequence.
    ``hired_newlines="keep"``: the newline slots stay, renumbered with the rest."""
    model, _ = model_for(family, attn)
    x = inputs_for(family, [one_image(family)])
    nl = newline_slots(model, x)[0]
    assert int(nl.sum()) > 0
    pact.api.apply(model, pact.load_config("hired", hired_newlines=newlines))
    with torch.no_grad():
        reduced = model(**x).logits[0]
    reduced_gen = greedy(model, x, n=4)[0]
    st = pact.api.stats(model)
    record = st.records[0][0]
    layout_length = int((pact.api.engine_of(model).layout.slot_orig >= 0).sum())
    pact.api.remove(model)
    removed = int(nl.sum()) if newlines == "remove" else 0
    assert record.removed_slots == removed
    assert layout_length == x["input_ids"].shape[1] - st.visual_before[0] + st.visual_after[0] - removed

    left_out = frozenset(nl.nonzero().flatten().tolist()) if newlines == "remove" else frozenset()
    hidden_dim = model.config.get_text_config().hidden_size
    source, short = shortened(model, x, record, torch.zeros(0, hidden_dim), left_out=left_out)
    assert len(source) == layout_length
    with torch.no_grad():
        hidden = get_adapter(model).text_model(inputs_embeds=short[None]).last_hidden_state
        stock = model.lm_head(hidden)[0]
    rows = list(range(len(source)))
    torch.testing.assert_close(reduced[[source[r] for r in rows]], stock[rows], atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        out = model.generate(
            inputs_embeds=short[None],
            attention_mask=torch.ones(1, short.shape[0], dtype=torch.long),
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
        )
    assert torch.equal(out[0, -4:], reduced_gen)


@pytest.mark.parametrize(
    ("position_mode", "layer"), [("renumber", 0), ("renumber", L), ("center", 0), ("center", L)]
)
@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", NEWLINE_FAMILIES)
def test_hired_newline_removal_keeps_the_engine_guarantees(family, attn, position_mode, layer):
    """Newline slots removed with the pruned tokens: cached == uncached, a batch (left padding, a
    text-only sample) equals its samples run one by one, and a text-only prompt afterwards is stock."""
    model, _ = model_for(family, attn)
    text = inputs_for(family, [{"question": "What color is the sky?"}])
    with torch.no_grad():
        stock = model(**text).logits
    samples = [*two_samples(family), {"question": "Is there a red circle on the left? Answer yes or no."}]
    x = inputs_for(family, samples)
    assert not x["attention_mask"].all()  # left padding present
    newlines = newline_slots(model, x).sum(1).tolist()  # before apply: it runs the vision tower
    cfg = pact.load_config("hired", position_mode=position_mode, layer=layer)
    pact.api.apply(model, cfg)
    batch = greedy(model, x, n=4)
    st = pact.api.stats(model)
    assert [r.removed_slots if r is not None else 0 for r in st.records[0]] == newlines
    assert newlines[0] > 0 and newlines[2] == 0
    # uncached: the prompt and the generated tokens in one prefill (teacher forcing), and generate
    # without a cache
    full = dict(x)
    full["input_ids"] = torch.cat([x["input_ids"], batch[:, :-1]], dim=1)
    full["attention_mask"] = torch.cat([x["attention_mask"], torch.ones_like(batch[:, :-1])], dim=1)
    with torch.no_grad():
        uncached = model(**full).logits[:, x["input_ids"].shape[1] - 1 :].argmax(-1)
    assert torch.equal(uncached, batch)
    assert torch.equal(greedy(model, x, n=4, use_cache=False), batch)
    for b, s in enumerate(samples):
        assert torch.equal(batch[b], greedy(model, inputs_for(family, [s]), n=4)[0]), f"sample {b}"
    with torch.no_grad():
        assert torch.equal(model(**text).logits, stock)
