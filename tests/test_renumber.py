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
from conftest import ATTENTION, FAMILIES, greedy, inputs_for, model_for, one_image

import pact
import pact.api
from pact import testing
from pact.methods.base import Method, Signals
from pact.models import ADAPTERS, get_adapter
from pact.ops.reduction import Reduction

L = 2
MROPE = tuple(family for family in FAMILIES if ADAPTERS[family].mrope)


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


def stock_embeds(model, x) -> torch.Tensor:
    """(B, T, D) the inputs_embeds the stock model feeds its language model."""
    got = []
    handle = get_adapter(model).text_model.register_forward_pre_hook(
        lambda m, a, k: got.append(k["inputs_embeds"].clone()), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(**x)
    finally:
        handle.remove()
    return got[0]


def shortened(
    model, x, record, extra: torch.Tensor, merged: torch.Tensor | None = None
) -> tuple[list[int], torch.Tensor]:
    """The official construction of a vision-side method for sample 0 of ``x``: pruned visual tokens
    physically removed, the kept ones in ``record.order`` (with the hidden states ``merged[r]`` of
    kept token r when given), the new tokens right after them.

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
        elif not visual[t]:
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


def mrope_positions(model, x) -> torch.Tensor:
    """(3, B, T) the stock M-RoPE position ids of the full prompt."""
    rope, _ = model.model.get_rope_index(
        x["input_ids"],
        mm_token_type_ids=x["mm_token_type_ids"],
        image_grid_thw=x["image_grid_thw"],
        attention_mask=x["attention_mask"],
    )
    return rope


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
    with torch.no_grad():
        hidden = text_model(inputs_embeds=short[None], position_ids=positions).last_hidden_state
        stock = model.lm_head(hidden)[0]
    rows = [r for r, t in enumerate(source) if t >= 0]
    torch.testing.assert_close(reduced[[source[r] for r in rows]], stock[rows], atol=1e-5, rtol=1e-4)
    if family not in MROPE:  # decoding continues from the reduced length
        with torch.no_grad():
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
        model.model.language_model.layers[i].register_forward_pre_hook(
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
    rotary = model.model.language_model.rotary_emb
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
