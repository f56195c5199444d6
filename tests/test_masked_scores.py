"""Attention-probability scores follow the layer's real mask (``Signals.attention_visibility``).

FastV (both variants), PDrop, HoliTom's inner step and SparseVLM's raters compute only the attention
rows they need from the layer's recomputed q/k; their official codes read the model's own attention
(``output_attentions``), so each row must see exactly the keys the layer lets it see. On Gemma 3 that
is not plain causal: sliding layers see a window of positions, and the tokens of one image see each
other in both directions. Checked on the tiny Gemma 3 (eager, window 8, two images) against the eager
model's ``output_attentions`` at the layer each method reads, on sliding and global layers, unreduced
and after an earlier reduction (the model's attentions are then those of the reduced sequence); each
comparison where the mask matters also checks that the old causal slice gives another answer. Every
other family is plain causal (``Visibility()``), which keeps the ops' arithmetic bit for bit.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import inputs_for, model_for, one_image
from test_family_gemma3 import WINDOW, batch, install, prompt, tiny_gemma3

import pact
import pact.api
from pact.config import load_config
from pact.methods.base import Signals, build_method
from pact.models.gemma3 import Gemma3Adapter
from pact.ops.attention import Visibility, build_block_window_mask, visible_keys
from pact.ops.scoring import fastv_scores
from pact.ops.sparsevlm import rater_attention

ROWS = {"rtol": 1e-4, "atol": 1e-6}  # float32 attention rows: ours vs the eager model's
LAYERS = 6  # sliding, full, sliding, full, sliding, full
SLIDING = {0, 2, 4}


def two_images(question: int = 2) -> list[int]:
    """bos, text, image (16 soft tokens), text, image, then a short question: the last token's window
    (8 positions) reaches back into the second image."""
    return prompt([5, 6], images=2)[:-6] + list(range(7, 7 + question))


def spy(method: Any) -> list[tuple[Signals, Any]]:
    """(signals, reduction) of every reduce call of ``method``."""
    calls: list[tuple[Signals, Any]] = []
    reduce = method.reduce

    def wrapped(signals: Signals) -> Any:
        red = reduce(signals)
        calls.append((signals, red))
        return red

    method.reduce = wrapped
    return calls


def run(model: Any, config: str | None, x: dict | None = None, **overrides: Any) -> tuple[list, tuple]:
    """Install ``config`` (None: the stock model) on ``model``, run ``x`` (default: the two-image
    prompt) with ``output_attentions``, remove it: (the method's calls, the attentions per layer)."""
    x = batch([two_images()]) if x is None else x
    engine = None if config is None else install(model, config, **overrides)
    calls = [] if engine is None else spy(engine.method)
    try:
        with torch.no_grad():
            attentions = model(**x, output_attentions=True).attentions
    finally:
        if engine is not None:
            engine.remove()
    return calls, attentions


def last_row(attentions: tuple, layer: int, visual: torch.Tensor) -> torch.Tensor:
    """The model's head-mean attention of the last token at ``layer``, at the visual keys."""
    return attentions[layer][0, :, -1].float().mean(0)[visual]


def assert_causal_differs(causal: torch.Tensor, expected: torch.Tensor) -> None:
    """The old causal slice is not the model's: the comparison is not vacuous."""
    assert not torch.allclose(causal, expected, rtol=1e-3, atol=1e-5), (causal - expected).abs().max()


def assert_layer_rule(signals: Signals, layer: int) -> None:
    """The visibility describes layer ``layer``'s rule: its window on sliding layers, image blocks."""
    rule = signals.attention_visibility(layer)
    assert rule.window == (WINDOW if layer in SLIDING else None)
    assert rule.blocks is not None and int(rule.blocks.max()) == 1  # two images
    assert torch.equal(rule.blocks >= 0, signals.visual_mask)  # every image token is a candidate


# --- FastV: the reference variant (every prefix row) and the original (the last row of L-1) ---------


@pytest.mark.parametrize(("layers", "first"), [(6, 1), (4, 2)])
def test_fastv_reference_is_the_mean_of_the_models_prefix_rows(layers, first):
    """FastV's reference variant (post-RoPE, causal, keys of the prefix P), progressive from layer
    ``first``: at each stage layer i, the head and row mean of the eager attention layer i computes
    on its input (the layout the earlier stages left: a run that stops reducing before i), over the
    prefix queries, image rows included (they see their whole image, on sliding layers only the
    window). 6 layers from 1: 1 (full, unreduced), 2 (sliding, reduced); 4 layers from 2: 2
    (sliding, unreduced), 3 (full, reduced). The window runs over the kept tokens' original
    positions."""
    model = tiny_gemma3("eager", layers=layers)
    calls, _ = run(model, "fastv", layer=first, progressive=True, keep_ratio=0.75)
    assert [s.layer for s, _ in calls] == list(range(first, layers))
    for signals, red in calls[:2]:
        i, visual = signals.layer, signals.visual_mask
        assert_layer_rule(signals, i)
        # layer i's input: the stock prompt (first stage) or the layout of one reduction at `first`
        _, attentions = run(model, None) if i == first else run(model, "fastv", layer=first, keep_ratio=0.75)
        attn = attentions[i][0].float()  # (H, R, R)
        assert attn.shape[-1] == visual.numel()
        P = int(visual.nonzero()[-1]) + 1
        expected = attn[:, :P, :P].mean((0, 1))[visual[:P]]
        torch.testing.assert_close(red.scores, expected, **ROWS)
        q, k = signals.queries(rope=True), signals.keys(rope=True)
        causal = fastv_scores(q, k, visual, scale=signals.attention_scale())
        assert_causal_differs(causal, expected)  # image rows (and the window) matter on every layer
    later = calls[1][0]  # on the reduced layout: the window over the kept tokens' original positions
    assert later.visual_mask.numel() < calls[0][0].visual_mask.numel()
    rule = later.attention_visibility(2)
    assert torch.equal(rule.positions, later.positions[0])
    assert rule.positions.tolist() != list(range(rule.positions.numel()))  # the removed leave gaps


@pytest.mark.parametrize("layer", [2, 3])
def test_fastv_original_is_the_models_last_row_of_the_previous_layer(layer):
    """FastV's original variant at layer L reads layer L-1's last row: L = 2 reads layer 1 (full),
    L = 3 reads layer 2 (sliding: only the window's image tokens get attention)."""
    calls, attentions = run(
        tiny_gemma3("eager", layers=LAYERS), "fastv", layer=layer, fastv_variant="original"
    )
    (signals, red) = calls[0]
    prev, visual = layer - 1, signals.visual_mask
    assert_layer_rule(signals, prev)
    expected = last_row(attentions, prev, visual)
    torch.testing.assert_close(red.scores, expected, **ROWS)
    q, k = signals.qk_at(prev, rope=True)
    causal = fastv_scores(q, k, visual, variant="original", scale=signals.attention_scale(prev))
    if prev in SLIDING:
        assert_causal_differs(causal, expected)
        assert int((expected > 0).sum()) < int(visual.sum())  # keys outside the window get nothing
    else:  # a text row on a full layer: causal is the layer's rule
        torch.testing.assert_close(causal, expected, **ROWS)


# --- PDrop: the last prompt token's row at each stage layer -------------------------------------------


@pytest.mark.parametrize("stages", [[1, 2], [2, 3]])
def test_pdrop_rows_are_the_models_last_rows_at_each_stage(stages):
    """Stage layers 1 (full), 2 (sliding) and 2, 3: the first stage on the unreduced prompt, the
    second on the layout the first left (renumbered positions, pdrop.json); each row against the
    attention that stage's layer computes on its input (a run without the later stage)."""
    model = tiny_gemma3("eager", layers=LAYERS)
    ratios = ["0.75", "0.5"]
    pdrop = {"pdrop_depth": 0}
    calls, _ = run(
        model, "pdrop", pdrop_layers=",".join(map(str, stages)), pdrop_keep_ratios=",".join(ratios), **pdrop
    )
    assert [s.layer for s, _ in calls] == stages
    for stage, (signals, red) in enumerate(calls):
        i, visual = signals.layer, signals.visual_mask
        assert_layer_rule(signals, i)
        earlier = {"pdrop_layers": str(stages[0]), "pdrop_keep_ratios": ratios[0], **pdrop}
        _, attentions = run(model, None) if stage == 0 else run(model, "pdrop", **earlier)
        expected = last_row(attentions, i, visual)
        torch.testing.assert_close(red.scores, expected, **ROWS)
        causal = fastv_scores(
            signals.queries(rope=True), signals.keys(rope=True), visual, variant="original",
            scale=signals.attention_scale(),
        )  # fmt: skip
        if i in SLIDING:
            assert_causal_differs(causal, expected)
        else:
            torch.testing.assert_close(causal, expected, **ROWS)


# --- SparseVLM: the text raters' rows ---------------------------------------------------------------


@pytest.mark.parametrize("stages", ["1,2,3", "2,3"])
def test_sparsevlm_rater_rows_are_the_models_rows(stages):
    """Each stage prunes layer l's output with layer l's attention of the raters: l = 1 (full,
    unreduced), 2 (sliding, reduced), 3 (full, reduced); and l = 2 (sliding, unreduced), 3. The later
    stages read the queries/keys of layer l on the reduced layout with layer l's own rotary table."""
    model = tiny_gemma3("eager", layers=LAYERS)
    cfg = {"sparsevlm_layers": stages, "sparsevlm_reference_depth": 0, "sparsevlm_budget": 192}
    engine = install(model, "sparsevlm", **cfg)
    method = engine.method
    relations: list[tuple[Signals, torch.Tensor, tuple]] = []  # (signals, relation, layer l's q/k)
    scores = method.scores
    method.scores = lambda s: relations.append((s, scores(s), method.layer_qk(s))) or relations[-1][1]
    x = batch([two_images(question=6)])  # enough text after the images for raters
    # layer l runs before the reduction that reads it: its attentions in the same run are the ones
    with torch.no_grad():
        attentions = model(**x, output_attentions=True).attentions
    assert [s.layer - 1 for s, _, _ in relations] == [int(v) for v in stages.split(",")]
    for signals, relation, (q, k) in relations:
        layer, visual = signals.layer - 1, signals.visual_mask
        assert_layer_rule(signals, layer)
        st = signals.context["sparsevlm"][0]
        rows = st["raters"] + (visual.numel() - st["text"])
        assert rows.numel()
        expected = attentions[layer][0].float().mean(0)[rows][:, visual]
        torch.testing.assert_close(relation, expected, **ROWS)
        causal = rater_attention(q, k, rows, scale=signals.attention_scale(layer))[:, visual]
        if layer in SLIDING:
            assert_causal_differs(causal, expected)
        else:
            torch.testing.assert_close(causal, expected, **ROWS)


# --- HoliTom's inner step: the last row of layer k - 1 ---------------------------------------------


@pytest.mark.parametrize(("stages", "k"), [("1,3", 1), ("1,2", 2), ("1,3", 3)])
def test_holitom_inner_row_is_the_models_last_row_of_layer_k_minus_1(stages, k):
    """HoliTom refuses Gemma 3 (it merges videos; Gemma 3 takes none), so its inner step is run by
    hand: ``inner_attention`` at layer k, with the input of layer k - 1 captured by HoliTom's own
    pre-hook, on the layouts a PDrop run gives (k = 1: layer 0, sliding, unreduced; k = 2: layer 1,
    full, after a reduction at 1; k = 3: layer 2, sliding, after a reduction at 1)."""
    model = tiny_gemma3("eager", layers=LAYERS)
    engine = install(model, "pdrop", pdrop_layers=stages, pdrop_keep_ratios="0.75,0.5", pdrop_depth=0)
    calls = spy(engine.method)
    holitom = build_method(load_config("holitom", holitom_inner_layer=k))
    (handle,) = holitom.layer_inputs.attach(engine.adapter, [k - 1])
    try:
        with torch.no_grad():
            attentions = model(**batch([two_images()]), output_attentions=True).attentions
    finally:
        handle.remove()
    # the PDrop stage at layer k (k = 1: its first) saw the layout layer k - 1 ran on
    signals = next(s for s, _ in calls if s.layer == max(k, 1))
    row = holitom.inner_attention(signals)
    visual = signals.visual_mask
    assert_layer_rule(signals, k - 1)
    expected = last_row(attentions, k - 1, visual)
    torch.testing.assert_close(row, expected, **ROWS)
    hidden, (cos, sin) = holitom.layer_inputs.get(k - 1)
    t = signals.hidden.shape[0]
    _, _, q, kk = engine.adapter.queries_keys(
        engine.adapter.layers[k - 1], hidden[0, -t:], cos[0, -t:], sin[0, -t:], True, True
    )
    causal = fastv_scores(q, kk, visual, variant="original", scale=signals.attention_scale(k - 1))
    if k - 1 in SLIDING:
        assert_causal_differs(causal, expected)
    else:
        torch.testing.assert_close(causal, expected, **ROWS)


# --- the accessor: what the engine and an adapter give, and plain causal elsewhere -------------------


def test_signals_built_from_the_adapter_describe_the_engines_rule():
    """Signals built without the engine's blocks/windows (e.g. ``pact.calibrate``'s, on the unreduced
    prompt) read them from the adapter: the same rule the engine gives at the first reduction layer;
    on a reduced layout they refuse rather than guess."""
    model = tiny_gemma3("eager", layers=LAYERS)
    x = batch([two_images()])
    calls, _ = run(model, "fastv", x, layer=2)
    given = calls[0][0]
    built = Signals(
        layer=2, sample=0, hidden=given.hidden, visual_mask=given.visual_mask, sizes=given.sizes,
        positions=given.positions, visual_index=given.visual_index, config=given.config, qk_fn=None,
        cos_sin_fn=None, layer_input_fn=None, adapter=Gemma3Adapter(model), inputs=dict(x),
    )  # fmt: skip
    for layer in range(LAYERS):
        ours, engine = built.attention_visibility(layer), given.attention_visibility(layer)
        assert ours.window == engine.window
        assert torch.equal(ours.blocks, engine.blocks)
        assert (ours.positions is None) == (engine.positions is None)
    reduced = Signals(
        layer=2, sample=0, hidden=given.hidden[:-3], visual_mask=given.visual_mask[:-3], sizes=given.sizes,
        positions=given.positions[:, :-3], visual_index=given.visual_index, config=given.config,
        qk_fn=None, cos_sin_fn=None, layer_input_fn=None, adapter=Gemma3Adapter(model), inputs=dict(x),
    )  # fmt: skip
    with pytest.raises(ValueError, match="reduced layout"):
        reduced.attention_visibility(2)


@pytest.mark.parametrize("config", ["fastv", "pdrop"])
def test_other_families_are_plain_causal(config):
    """Families without per-layer rules (here Qwen2.5-VL): ``Visibility()``, plain causal."""
    model, _ = model_for("qwen2_5_vl")
    x = inputs_for("qwen2_5_vl", [one_image("qwen2_5_vl")])
    pdrop = {"pdrop_layers": "1,2", "pdrop_keep_ratios": "0.5,0.25", "pdrop_depth": 0}
    overrides = pdrop if config == "pdrop" else {"layer": 1}
    pact.api.apply(model, pact.load_config(config, **overrides))
    try:
        calls = spy(pact.api.engine_of(model).method)
        with torch.no_grad():
            model(**x)
    finally:
        pact.api.remove(model)
    for signals, _ in calls:
        rule = signals.attention_visibility()
        assert rule.is_causal and (rule.blocks, rule.positions, rule.window) == (None, None, None)


# --- the ops: the default is today's arithmetic; the rule by hand; chunks ------------------------------


def random_qk(T: int = 11, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    visual = torch.zeros(T, dtype=torch.bool)
    visual[2:5] = visual[6:9] = True
    return torch.randn(T, 4, 8, generator=g), torch.randn(T, 2, 8, generator=g), visual


def test_causal_visibility_is_bit_identical_to_no_visibility():
    q, k, visual = random_qk()
    for kw in ({}, {"support": "visual"}, {"variant": "original"}, {"chunk_size": 3}, {"causal": False}):
        assert torch.equal(
            fastv_scores(q, k, visual, **kw), fastv_scores(q, k, visual, visibility=Visibility(), **kw)
        )
    rows = torch.tensor([9, 10])
    assert torch.equal(rater_attention(q, k, rows), rater_attention(q, k, rows, visibility=Visibility()))


def test_visible_keys_hand_worked():
    """Rows 0..5, an image block at rows 1..3, positions with a gap (a removed token at 4), W = 3:
    row 1 (p1) sees 0, 1 and its block 2, 3; row 3 (p3) sees p1..p3 but not p0 (0 > 3 - 3 is false);
    row 4 (p5) sees p3 (3 > 2) and itself, not p2; row 5 (p6) sees p5, p6."""
    blocks = torch.tensor([-1, 0, 0, 0, -1, -1])
    positions = torch.tensor([0, 1, 2, 3, 5, 6])
    rule = Visibility(blocks=blocks, positions=positions, window=3)
    rows = torch.arange(6)
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [0, 1, 1, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 1, 1],
        ]
    ).bool()
    assert torch.equal(rule.rows(rows, rows), expected)
    # the same pattern as the engine's decoder mask
    mask = build_block_window_mask(torch.zeros(1, 6), blocks[None], positions[None], 6, 3, torch.float32)
    assert torch.equal(torch.isfinite(mask[0, 0]), expected)
    assert torch.equal(visible_keys(rows, rows), torch.ones(6, 6).tril().bool())
    # each row's reach: the block's rows reach its end (row 3), the others themselves
    assert Visibility(blocks=blocks).reach().tolist() == [1, 4, 4, 4, 5, 6]


@pytest.mark.parametrize("support", ["prefix", "visual"])
def test_fastv_chunks_agree_with_one_block(support):
    """The chunked reference variant under a rule (blocks reaching past a chunk's rows, a window)
    equals one chunk of every prefix row; rows that see no visual key add 0."""
    q, k, visual = random_qk()
    blocks = torch.where(visual, torch.tensor([0] * 5 + [1] * 6), -1)
    rule = Visibility(blocks=blocks, positions=torch.arange(11) * 2, window=5)
    whole = fastv_scores(q, k, visual, support=support, visibility=rule, chunk_size=100)
    assert torch.isfinite(whole).all()
    for chunk in (1, 2, 3, 4):
        torch.testing.assert_close(
            fastv_scores(q, k, visual, support=support, visibility=rule, chunk_size=chunk), whole
        )
    assert not torch.allclose(fastv_scores(q, k, visual, support=support), whole)


def test_the_ops_refuse_a_visibility_of_another_length():
    q, k, visual = random_qk()
    rule = Visibility(blocks=torch.full((10,), -1))
    with pytest.raises(ValueError, match=r"visibility\.blocks has 10 entries"):
        fastv_scores(q, k, visual, visibility=rule)
    with pytest.raises(ValueError, match=r"visibility\.blocks has 10 entries"):
        rater_attention(q, k, torch.tensor([10]), visibility=rule)
    with pytest.raises(ValueError, match="window=3 needs the tokens' positions"):
        Visibility(window=3)
