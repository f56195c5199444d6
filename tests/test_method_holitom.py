"""HoliTom (cokeshao/HoliTom): the segmentation, DPC-KNN, blend and inner merge on hand-worked
inputs; on the tiny video models the outer merge against the stock language model on the official
short sequence, the vision attention signal against the encoder's own eager attentions, the inner
merge against the official loop, batches, and refusals.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import ATTENTION, model_for, stock_embeds

import pact
import pact.api
from pact import testing
from pact.methods.holitom import HoliTom
from pact.models import get_adapter
from pact.ops.video import (
    blend_clusters,
    dpc_knn_centers,
    frame_similarity,
    holitom_video,
    sequential_pair_merge,
    static_windows,
)

SUPPORTED = ("qwen2_vl", "qwen2_5_vl", "llava_onevision")
# Every family it runs on (the ADAPTERS order): the timestamped-frame families (Qwen3-VL, Qwen3.5,
# GLM-4.1V) are tested in tests/test_video_frames.py; InternVL and SmolVLM2 are refused.
RUNS_ON = (*SUPPORTED, "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "glm4v")
OUTER_ONLY = {"holitom_inner_layer": None}


# ---------------------------------------------------------------------------------------------------
# the rules on hand-made inputs


def test_static_windows_by_dynamic_programming():
    # 4 frames, 2 positions, tau 0.5. Position 0 is static over frames 0-2, position 1 over 0-1.
    # Savings (static positions x (e - s)): [0,1] 2, [0,2] 1 x 2 = 2, [1,2] 1, others 0. Frame 2
    # alone keeps dp = 2 (the window [0, 2] only ties it), so: [0,1], [2], [3].
    sim = torch.tensor([[0.9, 0.9], [0.9, 0.1], [0.1, 0.1]])
    assert static_windows(sim, 4, 0.5, 1024) == ([(0, 1), (2, 2), (3, 3)], 2)
    assert static_windows(sim, 4, 0.5, 1) == ([(0, 0), (1, 1), (2, 2), (3, 3)], 0)
    # everything static: one window, (F - 1) * S saved
    assert static_windows(torch.ones(3, 5), 4, 0.5, 1024) == ([(0, 3)], 15)
    assert static_windows(torch.ones(3, 5), 4, 0.5, 2) == ([(0, 1), (2, 3)], 10)


def test_frame_similarity_is_the_cosine_with_the_next_frame():
    frames = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 0.0], [1.0, 0.0]]])
    torch.testing.assert_close(frame_similarity(frames), torch.tensor([[1.0, 0.0]]))


def test_dpc_knn_centers_and_blend_by_hand():
    # points 0, 1, 2, 10 on a line (D = 1: distance = |xi - xj|), k = 2 neighbours (self included):
    # densities exp(-0.5) for 0, 1, 2 (a tie: the lower index is denser) and exp(-32) for 10;
    # delta: 10 (densest, the largest distance), 1, 1, 8; score delta * density -> centers 0, 1.
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    centers, dist = dpc_knn_centers(x, 2, 2)
    assert centers.tolist() == [0, 1]
    # 2 and 10 go to center 1 (nearer than 0); 0 has no member and stays; 1 -> 0.6 * 1 + 0.4 * 6
    labels, blended = blend_clusters(x, centers, dist, 0.6)
    assert labels.tolist() == [0, 1, 1, 1]
    torch.testing.assert_close(blended, torch.tensor([[0.0], [3.0]]))


def test_sequential_pair_merge_halves_in_ascending_order():
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0], [2.0, 0.0]])
    target, merged = sequential_pair_merge(h, torch.tensor([0, 1]), torch.tensor([2, 3, 4]))
    assert target.tolist() == [0, 1, 0]
    # token 0: ((h0 + h2) / 2 + h4) / 2 = (1.5, 0.025); token 1: (h1 + h3) / 2 = (0.05, 1)
    torch.testing.assert_close(merged, torch.tensor([[1.5, 0.025], [0.05, 1.0]]))


def test_sequential_pair_merge_equals_the_official_loop():
    torch.manual_seed(0)
    h = torch.randn(40, 8)
    keep = torch.tensor([1, 5, 9, 22, 30])
    rest = torch.ones(40, dtype=torch.bool)
    rest[keep] = False
    others = rest.nonzero().squeeze(1)
    _, merged = sequential_pair_merge(h, keep, others)
    sim = torch.nn.functional.normalize(h[others], dim=-1) @ torch.nn.functional.normalize(h[keep], dim=-1).T
    best = sim.argmax(-1)
    loop = h.clone()
    for i, o in enumerate(others.tolist()):  # the official code's loop
        t = int(keep[best[i]])
        loop[t] = (loop[t] + h[o]) / 2
    torch.testing.assert_close(merged, loop[keep])


def test_holitom_video_structure_by_hand():
    # 3 frames of 4 tokens: frames 0 and 1 identical (every position static), frame 2 turned by 90
    # degrees (dynamic). Segmentation [0, 1], [2], saving 4 of 12 -> r = 0.5 / (8 / 12) = 0.75:
    # round(4 * 0.75) = 3 static clusters of the frame mean (the frame itself) and ceil(4 * 0.75) = 3
    # tokens of frame 2 by attention (tokens 0, 1, 3).
    base = torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0], [-1.0, 0.5]])
    turned = torch.stack([-base[:, 1], base[:, 0]], dim=1)
    frames = torch.stack([base, base, turned])
    attention = torch.tensor([[0.0] * 4, [0.0] * 4, [0.4, 0.3, 0.1, 0.2]])
    out = holitom_video(frames, attention, retain_ratio=0.5, tau=0.8, beta=0.6, k=7)
    assert out.windows == [(0, 1), (2, 2)]
    centers, dist = dpc_knn_centers(base, 3, 3)
    _, blended = blend_clusters(base, centers, dist, 0.6)
    # static tokens first, at their centers in frame 0; then frame 2's kept tokens, ascending
    assert out.placed.tolist() == [*centers.tolist(), 8, 9, 11]
    torch.testing.assert_close(out.hidden, torch.cat([blended, turned[[0, 1, 3]]]))
    assert out.labels[:4].tolist() == out.labels[4:8].tolist()  # both frames of a static position
    assert out.labels[8:].tolist() == [3, 4, -1, 5]


def test_dominant_share_replaces_attention_tokens_by_contextual_centers():
    torch.manual_seed(0)
    frames = torch.randn(2, 6, 4)  # unrelated frames: two one-frame windows
    attention = torch.arange(12.0).view(2, 6)
    out = holitom_video(frames, attention, retain_ratio=0.5, tau=0.99, beta=0.6, k=7, dominant_share=1 / 3)
    # per frame ceil(6 * 0.5) = 3: round(3 * 2 / 3) = 2 dominant (highest attention: 4, 5), 1
    # contextual center among the 4 others, every one of them merged into it
    assert out.windows == [(0, 0), (1, 1)]
    assert out.placed[:2].tolist() == [4, 5] and out.placed[3:5].tolist() == [10, 11]
    assert out.labels[:4].tolist() == [2, 2, 2, 2] and out.labels[6:10].tolist() == [5, 5, 5, 5]


# ---------------------------------------------------------------------------------------------------
# on the tiny models


def video_sample(seed: int = 0, frames: int = 8, question: str = "Describe the video.") -> dict:
    return {"question": question, "videos": [testing.sample_video(seed, num_frames=frames)]}


def returned_reductions(model: Any) -> list[Any]:
    """The Reductions the applied method returns (order and hidden are not in the engine's records)."""
    method = pact.api.engine_of(model).method
    out: list[Any] = []
    reduce = method.reduce

    def wrapped(signals: Any) -> Any:
        red = reduce(signals)
        out.append(red)
        return red

    method.reduce = wrapped  # this instance only; pact.remove drops the method
    return out


@pytest.mark.parametrize("attn", ATTENTION)
def test_outer_merge_equals_the_stock_model_on_the_official_short_sequence(attn):
    """LLaVA-OneVision (the official target): the merged tokens in HoliTom's order, with contiguous
    positions, then the stock language model: every text row's logits agree."""
    model, processor = model_for("llava_onevision", attn)
    x = testing.build_inputs("llava_onevision", processor, [video_sample(0)])
    pact.api.apply(model, pact.load_config("holitom", holitom_retain_ratio=0.5, **OUTER_ONLY))
    reds = returned_reductions(model)
    with torch.no_grad():
        reduced = model(**x).logits[0]
    red = reds[0]
    pact.api.remove(model)
    assert 0 < red.kept.numel() < red.labels.numel()

    embeds = stock_embeds(model, x)[0]
    visual = testing.patch_token_mask(model, x)[0].nonzero().flatten()
    kept_slots = visual[red.kept].tolist()
    placed = red.hidden if red.order is None else red.hidden[red.order]  # i-th kept slot: i-th placed
    rows, text_rows, k = [], [], 0
    visual_set = set(visual.tolist())
    for t in range(embeds.shape[0]):
        if t in kept_slots:
            rows.append(placed[k].to(embeds.dtype))
            k += 1
        elif t not in visual_set:
            text_rows.append((t, len(rows)))
            rows.append(embeds[t])
    with torch.no_grad():
        hidden = get_adapter(model).text_model(inputs_embeds=torch.stack(rows)[None]).last_hidden_state
        stock = model.lm_head(hidden)[0]
    src = [t for t, _ in text_rows]
    dst = [r for _, r in text_rows]
    torch.testing.assert_close(reduced[src], stock[dst], atol=1e-5, rtol=1e-4)


def test_attention_signal_is_the_encoders_mean_received_attention_pooled():
    """The official signal: the layer feeding the projector, attention averaged over heads and
    queries (eager output_attentions), pooled per frame like the features (apply_pooling)."""
    model, processor = model_for("llava_onevision")
    x = testing.build_inputs("llava_onevision", processor, [video_sample(0)])
    pact.api.apply(model, pact.load_config("holitom", **OUTER_ONLY))
    with torch.no_grad():
        model(**x)
    ours = pact.api.stats(model).records[0][0].scores
    pact.api.remove(model)
    model.set_attn_implementation("eager")  # the encoder's own attention weights (restored by conftest)
    core = model.model
    pv = x["pixel_values_videos"][0]
    with torch.no_grad():
        out = core.vision_tower(pv, output_attentions=True)
        # the layer whose output feeds the projector (hidden_states[fl] is attentions[fl]'s output
        # for a negative vision_feature_layer fl): the official truncated tower's last attention
        fl = model.config.vision_feature_layer
        assert fl < 0
        received = out.attentions[fl].float().mean(1).mean(1)  # (frames, patches)
        pooled = core.apply_pooling(received[..., None]).reshape(-1)
    torch.testing.assert_close(ours.float(), pooled, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", SUPPORTED)
def test_batch_equals_single_images_untouched_and_generates(family):
    model, processor = model_for(family)
    samples = [
        video_sample(0),
        {"question": "What is in the image?", "images": [testing.sample_image(1)]},
        video_sample(2, question="What moves?"),
    ]
    batch = testing.build_inputs(family, processor, samples, padding_side="left")
    cfg = pact.load_config("holitom", holitom_inner_layer=None, holitom_retain_ratio=0.4)
    pact.api.apply(model, cfg)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape[0] == 3
    st = pact.api.stats(model)
    before = testing.patch_token_mask(model, batch).sum(1).tolist()
    assert st.visual_before == before
    batched = [(r.kept.tolist(), r.labels.tolist()) for r in st.records[0]]
    assert batched[1][0] == list(range(before[1])), "the image was reduced"
    assert st.visual_after[0] < before[0] and st.visual_after[2] < before[2]
    for i in (0, 2):
        single = testing.build_inputs(family, processor, [samples[i]])
        with torch.no_grad():
            model(**single)
        rec = pact.api.stats(model).records[0][0]
        assert (rec.kept.tolist(), rec.labels.tolist()) == batched[i], f"sample {i} differs in a batch"


def official_inner(hidden_prev, hidden_k, layer, adapter, cos, sin, visual, ratio):
    """The official inner merge in plain loops: the last token's head-mean attention of layer k-1
    (softmax over every key), top round(N (1 - r)) kept, each other token averaged in ascending
    order into its most similar kept token (cosine of the states entering layer k)."""
    _, _, q, k = adapter.queries_keys(layer, hidden_prev, cos, sin, True, True)
    h, h_kv, d = q.shape[1], k.shape[1], q.shape[2]
    kk = k.float().repeat_interleave(h // h_kv, dim=1)
    logits = torch.einsum("hd,thd->ht", q[-1].float(), kk) / math.sqrt(d)
    att = logits.softmax(-1).mean(0)[visual]
    n = visual.numel()
    count = round(n * (1 - ratio))
    att = att.detach()
    top = sorted(sorted(range(n), key=lambda i: (-float(att[i]), i))[:count])
    others = [i for i in range(n) if i not in top]
    vis_h = hidden_k[visual].float()
    merged = {t: vis_h[t].clone() for t in top}
    for o in others:
        sims = [float(torch.nn.functional.cosine_similarity(vis_h[o], vis_h[t], dim=0)) for t in top]
        t = top[max(range(len(top)), key=lambda j: (sims[j], -j))]
        merged[t] = (merged[t] + vis_h[o]) / 2
    return top, torch.stack([merged[t] for t in top])


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_inner_merge_equals_the_official_loop(family):
    model, processor = model_for(family, "eager")
    x = testing.build_inputs(family, processor, [video_sample(0)])
    cfg = pact.load_config("holitom", holitom_inner_layer=3, holitom_retain_ratio=0.6)
    pact.api.apply(model, cfg)
    reds = returned_reductions(model)
    adapter = get_adapter(model)
    grabbed = {}

    def grab(i):
        def hook(m, args, kwargs):
            grabbed[i] = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])

        return hook

    # layer 2's input as it receives it (after the engine's pre-hook) and its output: the states
    # entering layer 3 before the inner merge replaces them
    handles = [
        adapter.layers[2].register_forward_pre_hook(grab(2), with_kwargs=True),
        adapter.layers[2].register_forward_hook(lambda m, a, out: grabbed.__setitem__(3, (out, None))),
    ]
    try:
        with torch.no_grad():
            model(**x)
    finally:
        for h in handles:
            h.remove()
    st = pact.api.stats(model)
    assert st.layers == [0, 3]
    outer, inner = reds
    (h2, (cos, sin)), (h3, _) = grabbed[2], grabbed[3]
    h3 = h3[0] if isinstance(h3, tuple) else h3
    # one sample, no padding: after the outer merge the kept visual tokens fill the slots right
    # after the text before the video (the dropped ones are gone)
    first = int(testing.patch_token_mask(model, x)[0].nonzero()[0])
    visual = torch.arange(first, first + outer.kept.numel())
    top, merged = official_inner(h2[0], h3[0], adapter.layers[2], adapter, cos[0], sin[0], visual, 0.5)
    assert inner.kept.tolist() == top
    torch.testing.assert_close(inner.hidden.float(), merged, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_inner_attention_equals_the_eager_models_attentions(family):
    """The inner merge's scores: the last token's head-mean attention at layer k - 1 over the visual
    slots, as the eager model returns it (``output_attentions``, reduced slots from layer 0 on)."""
    model, processor = model_for(family, "eager")
    x = testing.build_inputs(family, processor, [video_sample(0)])
    pact.api.apply(model, pact.load_config("holitom", holitom_inner_layer=3, holitom_retain_ratio=0.6))
    reds = returned_reductions(model)
    with torch.no_grad():
        attentions = model(**x, output_attentions=True).attentions
    outer, inner = reds
    first = int(testing.patch_token_mask(model, x)[0].nonzero()[0])
    visual = torch.arange(first, first + outer.kept.numel())
    expected = attentions[2][0, :, -1].float().mean(0)[visual]  # layer 2 = k - 1, last query row
    torch.testing.assert_close(inner.scores, expected, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize("family", [f for f in testing.FAMILIES if f not in RUNS_ON])
def test_holitom_refuses_families_without_frame_layouts(family):
    model, _ = model_for(family)
    with pytest.raises(ValueError, match=f"holitom does not support the '{family}' model family: "):
        pact.api.apply(model, pact.load_config("holitom", **OUTER_ONLY))
    assert HoliTom.families == RUNS_ON


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"holitom_retain_ratio": 0.0}, r"holitom_retain_ratio.*\(0, 1\]"),
        ({"holitom_tau": 1.5}, r"holitom_tau.*\[-1, 1\]"),
        ({"holitom_k": 0}, "holitom_k"),
        ({"holitom_inner_ratio": 1.0}, r"holitom_inner_ratio.*\[0, 1\)"),
        ({"holitom_inner_layer": 0}, "holitom_inner_layer"),
    ],
)
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        pact.load_config("holitom", **overrides)


def test_inner_layer_beyond_the_model_or_before_the_outer_merge_is_refused():
    model, _ = model_for("qwen2_vl")  # 4 decoder layers
    with pytest.raises(ValueError, match=r"holitom_inner_layer=18 but the model has only"):
        pact.api.apply(model, pact.load_config("holitom"))
    with pytest.raises(ValueError, match="must come after the outer merge at layer 2"):
        pact.load_config("holitom", layer=2, holitom_inner_layer=2)
