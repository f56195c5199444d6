"""Every bundled config on tiny random models of every family: batched (2 samples, left padding),
eager and sdpa, reduces visual tokens; unsupported combinations fail clearly; vision-side signals
against the encoder's own (eager) attention; budgets on real layouts; `pact methods`; CONFIGDOC.

The tiny models here have 6 decoder layers (the configs reduce at layer 4, VTW's formula needs
L_eq = 4 < n) and are built once per test process.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import pact
import pact.api
from pact import testing
from pact.config import CONFIGS_DIR, config_names
from pact.methods.vision import VisionCapture, match_rows
from pact.ops.vision import vispruner_select

FAMILIES = testing.FAMILIES
CONFIGS = config_names()
_MODELS: dict[str, tuple[Any, Any]] = {}


def tiny6(family: str) -> tuple[Any, Any]:
    if family not in _MODELS:
        _MODELS[family] = testing.tiny_pair(family, num_hidden_layers=6)
    return _MODELS[family]


@pytest.fixture(autouse=True)
def _stock_models():
    yield
    for model, _ in _MODELS.values():
        pact.api.remove(model)
        if model.config.get_text_config()._attn_implementation != "sdpa":
            model.set_attn_implementation("sdpa")


def method_of(name: str) -> Any:
    """The method class (factory) a bundled config runs."""
    from pact.methods import REGISTRY

    cfg = pact.load_config(name)
    return REGISTRY[(cfg.pruning, cfg.clustering)]


def reduces_video(name: str | None) -> bool:
    """The config's method reduces video tokens only (``inputs = "video"`` on its class, e.g. EVS):
    the shared tests feed it videos instead of images."""
    return name is not None and getattr(method_of(name), "inputs", "any") == "video"


def sample(i: int, name: str | None = None) -> dict[str, Any]:
    """Sample i (0 or 1) of the shared tests: an image, or a video for video-only methods."""
    if reduces_video(name):
        question = ("Describe the video.", "What moves in the video?")[i]
        return {"question": question, "videos": [testing.sample_video(i)]}
    question = ("What is in the image?", "Describe the picture in one sentence.")[i]
    return {"question": question, "images": [testing.sample_image(i, size=((96, 64), (64, 120))[i])]}


def two_samples(family: str, name: str | None = None) -> Any:
    _, processor = tiny6(family)
    return testing.build_inputs(family, processor, [sample(0, name), sample(1, name)], padding_side="left")


# Threshold configs are calibrated for real checkpoints; the random tiny models' keys are much less
# similar, so DBSCAN's radius is widened here (CONFIGDOC, "Bundled configs").
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "dbscan": {"dbscan_eps": 0.9},
    "holitom": {"holitom_inner_layer": 4},  # the official layer 18 of 28; the tiny models have 6
}
# The random tiny Qwen3.5's Gated DeltaNet layers (unit-RMS gated outputs of a recurrence) make the
# visual tokens' keys far less alike than in the other tiny models (closest pair at layer 4: cosine
# distance ~0.45 vs ~0.02 in tiny Qwen2-VL), so the distance thresholds are widened for it.
FAMILY_TINY_OVERRIDES: dict[tuple[str, str], dict[str, Any]] = {
    ("dbdpc", "qwen3_5"): {"cutoff": 0.6},
    ("dbscan", "qwen3_5"): {"dbscan_eps": 1.0, "dbscan_min_samples": 2},
    ("dbdpc", "qwen3_5_moe"): {"cutoff": 0.6},
    ("dbscan", "qwen3_5_moe"): {"dbscan_eps": 1.0, "dbscan_min_samples": 2},
    # Gemma 3's per-head key norms (random weights in the tiny model) spread its keys as well
    ("dbscan", "gemma3"): {"dbscan_eps": 1.0},
}


def tiny_config(name: str, family: str | None = None) -> Any:
    overrides = {**TINY_OVERRIDES.get(name, {}), **FAMILY_TINY_OVERRIDES.get((name, family or ""), {})}
    return pact.load_config(name, **overrides)


def supported(name: str, family: str) -> bool:
    families = getattr(method_of(name), "families", None)  # e.g. EVS: video families only
    return families is None or family in families


def kept_of(model: Any) -> list[list[int]]:
    st = pact.api.stats(model)
    if not st.records:
        return []
    return [rec.kept.tolist() if rec is not None else [] for rec in st.records[-1]]


# ---------------------------------------------------------------------------------------------------
# every config x every family


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", CONFIGS)
def test_config_runs_batched_on_eager_and_sdpa(name, family):
    model, _ = tiny6(family)
    x = two_samples(family, name if supported(name, family) else None)
    cfg = tiny_config(name, family)
    if not supported(name, family):
        with torch.no_grad():
            stock = model(**x).logits
        with pytest.raises(ValueError, match=f"does not support the '{family}' model family"):
            pact.api.apply(model, cfg)
        with torch.no_grad():  # the refused apply left nothing behind
            assert torch.equal(model(**x).logits, stock)
        return
    for attn in ("sdpa", "eager"):
        model.set_attn_implementation(attn)
        pact.api.apply(model, cfg)
        with torch.no_grad():
            logits = model(**x).logits
        assert logits.shape[:2] == x["input_ids"].shape and bool(torch.isfinite(logits).all())
        st = pact.api.stats(model)
        if not cfg.reduction:
            assert st.layers == []
            continue
        before = testing.patch_token_mask(model, x).sum(1).tolist()
        assert st.visual_before == before
        assert all(a <= b for a, b in zip(st.visual_after, before, strict=True))
        assert sum(st.visual_after) < sum(before), f"{name} did not reduce on {family}/{attn}"
        pact.api.remove(model)


@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "no_reduction"])
def test_config_batch_equals_single_and_generates(name):
    # one family per config (rotating), to keep the suite fast; the matrix above covers the rest
    family = [f for f in FAMILIES if supported(name, f)][CONFIGS.index(name) % 3]
    model, processor = tiny6(family)
    x = two_samples(family, name)
    pact.api.apply(model, tiny_config(name, family))
    with torch.no_grad():
        out = model.generate(**x, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape == (2, x["input_ids"].shape[1] + 2)
    batched = kept_of(model)
    single = testing.build_inputs(family, processor, [sample(1, name)])
    with torch.no_grad():
        model(**single)
    assert kept_of(model)[0] == batched[1], f"{name}: the second sample is reduced differently in a batch"


@pytest.mark.parametrize(
    ("name", "family"),
    [(n, f) for n in ("visionzip", "prumerge", "vispruner") for f in ("llava", "llava_next", "gemma3")]
    + [("hired", "llava_next")],  # HiRED needs base + sub-image crops (LLaVA-NeXT, -OneVision)
)
def test_the_same_image_twice_in_a_batch_equals_each_alone(name, family):
    # two questions on one image in a batch (lmms-eval batches MME's question pairs so): the encoder
    # gives two identical copies of the image's rows, and every token must be matched to one copy;
    # split between the two, VisionZip counted one image as two crops and kept more tokens, HiRED
    # split its budget over the wrong crops
    model, processor = tiny6(family)
    image = testing.sample_image(0, size=(96, 64))
    samples = [
        {"question": "What is in the image?", "images": [image]},
        {"question": "Is there a red circle on the left? Answer yes or no.", "images": [image]},
        {"question": "Compare the two images.", "images": [image, testing.sample_image(1)]},
    ]
    pact.api.apply(model, tiny_config(name, family))
    with torch.no_grad():
        together = model(**testing.build_inputs(family, processor, samples)).logits[:, -1]
    batched = kept_of(model)
    for b, one in enumerate(samples):
        with torch.no_grad():
            alone = model(**testing.build_inputs(family, processor, [one])).logits[0, -1]
        assert kept_of(model)[0] == batched[b], f"{name} on {family}: sample {b}"
        torch.testing.assert_close(together[b], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", testing.VIDEO_FAMILIES)
@pytest.mark.parametrize("name", ["pooling", "vispruner", "prumerge", "tome"])
def test_video_and_image_in_one_batch(name, family):
    model, processor = tiny6(family)
    samples = [
        {"question": "Describe the video.", "videos": [testing.sample_video(0)]},
        {"question": "What is in the image?", "images": [testing.sample_image(1)]},
    ]
    if not testing.TINY_FAMILIES[family].mixes_images_and_videos:  # SmolVLM, GLM-4.1V: BATCH_LIMITS
        samples[1] = {"question": "And this video?", "videos": [testing.sample_video(1, num_frames=2)]}
    x = testing.build_inputs(family, processor, samples)
    pact.api.apply(model, tiny_config(name, family))
    with torch.no_grad():
        model.generate(**x, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    st = pact.api.stats(model)
    assert st.visual_before == testing.patch_token_mask(model, x).sum(1).tolist()
    assert all(0 < a < b for a, b in zip(st.visual_after, st.visual_before, strict=True))


# ---------------------------------------------------------------------------------------------------
# unsupported combinations


def test_unsupported_combinations_raise_clear_errors():
    model, _ = tiny6("qwen2_vl")
    with pytest.raises(ValueError, match="HiRED splits the budget between a base image and its sub-images"):
        pact.api.apply(model, pact.load_config("hired"))
    with pytest.raises(
        ValueError, match="no reduction method for pruning='vispruner' with clustering='kmeans'"
    ):
        pact.api.apply(model, pact.load_config("vispruner", clustering="kmeans"))
    with pytest.raises(ValueError, match="clustering must be 'none'"):
        pact.load_config("vtw", clustering="kmeans")
    with pytest.raises(ValueError, match="layer=9 but the model has only 6 decoder layers"):
        pact.api.apply(model, pact.load_config("fastv", layer=9))
    with pytest.raises(ValueError, match="cannot import module"):
        pact.api.apply(model, pact.load_config("custom_pruning", custom_pruning_fn="no_such_pkg:fn"))


# ---------------------------------------------------------------------------------------------------
# VTW, ToMe and FastV on a model


def test_vtw_withdraws_at_the_formula_layer():
    model, _ = tiny6("llava")
    x = two_samples("llava")
    pact.api.apply(
        model, pact.load_config("vtw")
    )  # n = 6, L_eq = 4, p = 0.5 -> round(6 * (1 - 0.5 * 2 / 6)) = 5
    with torch.no_grad():
        model(**x)
    st = pact.api.stats(model)
    assert st.layers == [5] and st.visual_after == [0, 0]


def test_tome_counts_follow_the_schedule_on_a_model():
    from pact.ops.tome import tome_clamp, tome_schedule

    model, _ = tiny6("llava_next")
    x = two_samples("llava_next")
    cfg = pact.load_config("tome", tome_keep_ratio=0.3, tome_equivalent_layer=2)
    pact.api.apply(model, cfg)
    with torch.no_grad():
        model(**x)
    st = pact.api.stats(model)
    assert st.layers == list(range(6))
    for b, n in enumerate(st.visual_before):
        sched = tome_schedule(6, n, 0.3, 2)
        cur, expected = n, []
        for i in range(6):
            cur -= tome_clamp(sched[i], cur)
            expected.append(cur)
        got = [len(step[b].kept) for step in st.records]
        assert got == expected
        assert float(st.records[-1][b].sizes.sum()) == n  # merged, never dropped


@pytest.mark.parametrize("variant", ["reference", "original"])
def test_fastv_scores_equal_the_models_own_eager_attention(variant):
    family = "llava_next"
    model, _ = tiny6(family)
    x = two_samples(family)
    layer = 2
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attn = model(**x, output_attentions=True).attentions
    pact.api.apply(model, pact.load_config("fastv", layer=layer, fastv_variant=variant))
    with torch.no_grad():
        model(**x)
    st = pact.api.stats(model)
    patches = testing.patch_token_mask(model, x)
    valid = x["attention_mask"].bool()
    for b in range(2):
        vis = torch.nonzero(patches[b]).flatten()
        if variant == "reference":  # rows of the prefix (valid tokens up to the last visual one)
            rows = torch.nonzero(valid[b]).flatten()
            rows = rows[rows <= vis[-1]]
            naive = attn[layer][b][:, rows][:, :, vis].mean(dim=(0, 1))
        else:  # the last token's attention at layer L-1
            naive = attn[layer - 1][b, :, -1, vis].mean(0)
        torch.testing.assert_close(st.records[0][b].scores, naive, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# vision side


@pytest.mark.parametrize("family", FAMILIES)
def test_every_visual_token_matches_a_captured_encoder_row(family):
    model, _ = tiny6(family)
    x = two_samples(family)
    adapter = pact.models.get_adapter(model)
    cap = VisionCapture(adapter, {"attn": 0})
    grabbed = {}
    cap.attach()

    def grab(module, args, kwargs):
        grabbed.setdefault("h", args[0] if args else kwargs["hidden_states"])

    handle = adapter.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**x)
        rows = torch.cat([r["rows"] for r in cap.records])
    finally:
        handle.remove()
        cap.detach()
    embeds = grabbed["h"][testing.patch_token_mask(model, x)]
    _, exact = match_rows(embeds, rows)
    assert bool(exact.all()), f"{family}: {int((~exact).sum())} visual tokens without an exact encoder row"


@pytest.mark.parametrize("family", ["llava", "llava_next", "internvl"])
def test_cls_attention_equals_the_encoders_eager_attention(family):
    model, _ = tiny6(family)
    x = two_samples(family)
    model.set_attn_implementation("eager")
    core = model.model
    pact.api.apply(model, pact.load_config("vispruner"))
    with torch.no_grad():
        model(**x)
    ours = torch.cat([rec.scores for rec in pact.api.stats(model).records[0]])
    pact.api.remove(model)
    # naive: the tower's own attention weights; each LLM token found by equality among the rows
    pv = x["pixel_values"]
    if family == "llava_next":
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        crop = model.config.vision_config.image_size
        counts = [
            image_size_to_num_patches(s, model.config.image_grid_pinpoints, crop) for s in x["image_sizes"]
        ]
        pv = torch.cat([p[:c] for p, c in zip(pv, counts, strict=True)])
    with torch.no_grad():
        out = core.vision_tower(pv, output_attentions=True, output_hidden_states=True)
        if family == "internvl":  # last layer; one token = the 2x2 patches of the pixel shuffle
            cls = out.attentions[-1][:, :, 0, 1:].mean(1)
            crops, p = cls.shape
            side = int(p**0.5)
            cls = core.pixel_shuffle(cls.view(crops, side, side, 1), 0.5).reshape(crops, -1, 4).mean(-1)
            rows = core.get_image_features(x["pixel_values"]).pooler_output.flatten(0, 1)
        else:  # layer -2 of the 2-layer tower = layer 0; its output (CLS dropped) feeds the projector
            cls = out.attentions[0][:, :, 0, 1:].mean(1)
            rows = core.multi_modal_projector(out.hidden_states[-2][:, 1:]).flatten(0, 1)
        feats = core.get_image_features(**{k: x[k] for k in ("pixel_values", "image_sizes") if k in x})
    pooled = feats.pooler_output
    tokens = torch.cat(list(pooled)) if isinstance(pooled, (list, tuple)) else pooled.flatten(0, 1)
    flat = cls.reshape(-1)
    naive = []
    for t in tokens:  # a plain loop over the tokens; newline rows match no row and are skipped
        hit = torch.nonzero((rows == t).all(-1)).flatten()
        if hit.numel():
            naive.append(flat[int(hit[0])])
    torch.testing.assert_close(ours, torch.stack(naive), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("vispruner", "llava_next"),
        ("vispruner", "qwen2_vl"),
        ("hired", "llava_next"),
        ("hired", "llava"),
        ("prumerge", "llava"),
        ("prumerge", "internvl"),
        ("pooling", "qwen2_5_vl"),
        ("random", "internvl"),
        ("pact", "llava_next"),
        ("dbdpc", "qwen2_vl"),
        ("euti", "llava_onevision"),
        ("kmeans", "qwen2_5_vl"),
        ("fastv", "llava"),
    ],
)
@pytest.mark.parametrize("budget", [{"target_tokens": 10}, {"target_ratio": 0.75}])
def test_budgets_are_met_on_models(name, family, budget):
    model, _ = tiny6(family)
    x = two_samples(family)
    pact.api.apply(model, pact.load_config(name, **budget))
    with torch.no_grad():
        model(**x)
    st = pact.api.stats(model)
    cfg = pact.load_config(name, **budget)
    from pact.methods.budget import target_count

    for before, after in zip(st.visual_before, st.visual_after, strict=True):
        target = target_count(cfg, before)
        if name == "pooling":  # integer strides: the closest reachable count
            assert abs(after - target) <= max(2, target // 2)
        elif name in ("pact", "dbdpc"):  # a bisected cutoff: the closest reachable count
            assert abs(after - target) <= 1
        else:
            assert after == target


def test_prumerge_plus_adds_uniform_samples_on_a_model():
    model, _ = tiny6("llava")
    x = two_samples("llava")
    counts = {}
    for plus in (False, True):
        pact.api.apply(model, pact.load_config("prumerge", prumerge_plus=plus))
        with torch.no_grad():
            model(**x)
        counts[plus] = pact.api.stats(model).visual_after
    assert all(b > a for a, b in zip(counts[False], counts[True], strict=True))


# ---------------------------------------------------------------------------------------------------
# `pact methods` and the documentation


def test_pact_methods_lists_every_method(capsys):
    from pact.methods import REGISTRY
    from pact.methods.listing import main

    assert main([]) == 0
    out = capsys.readouterr().out
    for pruning, clustering in REGISTRY:
        assert f"{pruning}+{clustering}" in out
    assert main(["--family", "qwen2_vl"]) == 0
    out = capsys.readouterr().out
    assert "hired+none" not in out and "vispruner+none" in out
    assert main(["--configs"]) == 0
    assert "tome" in capsys.readouterr().out


def test_configdoc_documents_every_key_used_in_configs():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "CONFIGDOC.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([a-z0-9_]+)` \|", doc, flags=re.M))
    for path in sorted(Path(CONFIGS_DIR).glob("*.json")):
        keys = set(json.loads(path.read_text()))
        missing = keys - documented
        assert not missing, f"{path.name}: keys not documented in docs/CONFIGDOC.md: {sorted(missing)}"
    for name in CONFIGS:
        assert f"`{name}.json`" in doc, f"configs/{name}.json is not described in docs/CONFIGDOC.md"


# ---------------------------------------------------------------------------------------------------
# vision-side methods against their official code, on the models (the official answer recomputed
# from the tower's own tensors, as the official implementations read them)


def returned_reductions(model: Any) -> list[Any]:
    """The Reductions the applied method returns (order / extra are not in the engine's records)."""
    method = pact.api.engine_of(model).method
    out: list[Any] = []
    reduce = method.reduce

    def wrapped(signals: Any) -> Any:
        red = reduce(signals)
        out.append(red)
        return red

    method.reduce = wrapped  # this instance only; pact.remove drops the method
    return out


def tower_run(model: Any, pixel_values: torch.Tensor, layer: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The CLIP tower's outputs and the q_proj / k_proj outputs of encoder ``layer`` (the official
    PruMerge and HiRED hooks)."""
    grabbed: dict[str, torch.Tensor] = {}
    attn = out_layers(model)[layer].self_attn
    hq = attn.q_proj.register_forward_hook(lambda m, i, o: grabbed.__setitem__("q", o))
    hk = attn.k_proj.register_forward_hook(lambda m, i, o: grabbed.__setitem__("k", o))
    try:
        with torch.no_grad():
            out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    finally:
        hq.remove()
        hk.remove()
    return out, grabbed["q"], grabbed["k"]


def official_prumerge(q, k, feats, plus):
    """LLaVA-PruMerge's token_prune_merge_advanced(_plus) for ONE image, in plain loops.

    q, k: (1 + N, C) layer-23 q_proj / k_proj outputs ([CLS] first); feats: (N, C) select-layer
    features. Returns (idx in official order, updated features (R, C), extra (1, C))."""
    n, c = feats.shape
    attn = torch.softmax((q @ k.T) * c**-0.5, dim=-1)
    cls = attn[0, 1:]
    a = cls.numpy()
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    m = int((a > q3 + 1.5 * (q3 - q1)).sum())
    ratio = m / n
    idx = sorted(range(n), key=lambda i: (-float(cls[i]), i))[: int(n * ratio)]
    if plus:
        step = int(1 / ratio)
        idx = idx + [x for x in range(0, n - 1, int(step / 3)) if x not in idx]
    compl = [j for j in range(n) if j not in idx]
    keys = torch.nn.functional.normalize(k[1:], dim=-1)
    updated = []
    for pos, i in enumerate(idx):
        rest = idx[:pos] + idx[pos + 1 :] + compl
        sims = [float(keys[i] @ keys[j]) for j in rest]
        top = sorted(range(len(rest)), key=lambda t: (-sims[t], t))[:32]
        updated.append(feats[i] + sum(cls[rest[t]] * feats[rest[t]] for t in top))
    extra = sum((cls[j] * feats[j] for j in compl), torch.zeros(c))[None]
    return idx, torch.stack(updated), extra


_SHARP: dict[str, Any] = {}


def sharp_llava() -> Any:
    """A tiny LLaVA-1.5 whose last encoder layer's q/k are scaled x5: a peaked [CLS] attention with
    IQR outliers (8 of 36 patches here), as a trained CLIP has; the random one has none."""
    if "model" not in _SHARP:
        model, _ = testing.tiny_pair("llava", num_hidden_layers=2)
        attn = out_layers(model)[-1].self_attn
        with torch.no_grad():
            attn.q_proj.weight.mul_(5.0)
            attn.k_proj.weight.mul_(5.0)
        _SHARP["model"] = model
    return _SHARP["model"]


@pytest.mark.parametrize("plus", [False, True])
def test_prumerge_is_the_official_method_on_llava(plus):
    model = sharp_llava()
    x = two_samples("llava")
    pact.api.apply(model, pact.load_config("prumerge", prumerge_plus=plus))
    reds = returned_reductions(model)
    with torch.no_grad():
        model(**x)
    select = model.config.vision_feature_layer
    out, q, k = tower_run(model, x["pixel_values"], len(out_layers(model)) + select + 1)
    pact.api.remove(model)
    assert len(reds) == 2
    for b, red in enumerate(reds):
        feats = out.hidden_states[select][b, 1:]
        idx, updated, extra = official_prumerge(q[b], k[b], feats, plus)
        assert len(idx) > 1
        assert red.kept[red.order].tolist() == idx, "kept tokens or their official order differ"
        proj = model.model.multi_modal_projector
        with torch.no_grad():
            torch.testing.assert_close(red.hidden[red.order], proj(updated).float(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(red.extra, proj(extra).float(), rtol=1e-4, atol=1e-5)


def out_layers(model: Any) -> Any:
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder.layers


def next_crops_and_tokens(model: Any, x: dict) -> tuple[list[int], Any, torch.Tensor, torch.Tensor]:
    """LLaVA-NeXT: crops per image, the tower outputs over all crops, the projector rows (crops x V, D)
    and, per LLM visual token in sequence order, the row it is a copy of (newline rows skipped)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    core = model.model
    side = model.config.vision_config.image_size
    counts = [image_size_to_num_patches(s, model.config.image_grid_pinpoints, side) for s in x["image_sizes"]]
    pv = torch.cat([p[:c] for p, c in zip(x["pixel_values"], counts, strict=True)])
    with torch.no_grad():
        out = core.vision_tower(pv, output_hidden_states=True)
        rows = core.multi_modal_projector(out.hidden_states[-2][:, 1:]).flatten(0, 1)
        feats = core.get_image_features(pixel_values=x["pixel_values"], image_sizes=x["image_sizes"])
    tokens = torch.cat(list(feats.pooler_output))
    token_row = []
    for t in tokens:  # a plain loop; newline rows match no projector row
        hit = torch.nonzero((rows == t).all(-1)).flatten()
        if hit.numel():
            token_row.append(int(hit[0]))
    return counts, out, rows, torch.tensor(token_row)


def cls_rows(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """(crops, V, H) per-head [CLS] attention over the patches, from q_proj / k_proj outputs."""
    b, s, c = q.shape
    d = c // heads
    qh, kh = q.view(b, s, heads, d).transpose(1, 2), k.view(b, s, heads, d).transpose(1, 2)
    attn = torch.softmax((qh @ kh.transpose(-2, -1)) * d**-0.5, dim=-1)  # (b, H, s, s)
    return attn[:, :, 0, 1:].transpose(1, 2)


def test_hired_is_the_official_method_on_llava_next():
    # the official HiRED_token_selection, in plain loops (rate 0.2, alpha 0.5; V = 16, 4 sub-images,
    # whose raster chunks of 4 tokens divide V as the official reshape needs)
    model, _ = tiny6("llava_next")
    x = two_samples("llava_next")
    cfg = pact.load_config("hired")
    pact.api.apply(model, cfg)
    with torch.no_grad():
        model(**x)
    ours = kept_of(model)
    pact.api.remove(model)
    counts, _, _, token_row = next_crops_and_tokens(model, x)
    select_layer = len(out_layers(model)) + model.config.vision_feature_layer
    heads = model.config.vision_config.num_attention_heads
    pv = torch.cat([p[:c] for p, c in zip(x["pixel_values"], counts, strict=True)])
    _, q, k = tower_run(model, pv, select_layer)
    late = cls_rows(q, k, heads).sum(-1)  # summed over heads, as HiRED
    _, q0, k0 = tower_run(model, pv, 0)
    early = cls_rows(q0, k0, heads).sum(-1)
    v = late.shape[1]
    selected = torch.zeros(late.numel(), dtype=torch.bool)
    first = 0
    for p in counts:
        total = int(p * v * cfg.keep_ratio)
        base = min(int(total * cfg.hired_alpha), v)
        sub = min(total - base, (p - 1) * v)
        mask = torch.zeros(p, v, dtype=torch.bool)
        mask[0, sorted(range(v), key=lambda i: -float(late[first, i]))[:base]] = True
        if sub > 0:
            assert v % (p - 1) == 0
            top = sorted(range(v), key=lambda i: -float(early[first, i]))[: int(v * (1 - cfg.hired_alpha))]
            marked = torch.zeros(v)
            marked[top] = 1
            share = marked.reshape(p - 1, -1).sum(-1)
            budgets = ((share / share.sum()) * sub).int().clamp(max=v).tolist()
            for i, b in enumerate(budgets):
                mask[i + 1, sorted(range(v), key=lambda t: -float(late[first + i + 1, t]))[:b]] = True
        selected[first * v : (first + p) * v] = mask.flatten()
        first += p
    # tokens of each sample in sequence order; a token stays iff the encoder token it copies was chosen
    per_sample = [int(n) for n in testing.patch_token_mask(model, x).sum(1)]
    want = [chosen.nonzero().flatten().tolist() for chosen in torch.split(selected[token_row], per_sample)]
    assert ours == want
    # tokens lost to unpadding are not replaced: fewer than the pre-unpad budget here
    assert sum(len(w) for w in want) < sum(int(p * v * cfg.keep_ratio) for p in counts)


def test_vispruner_is_the_official_method_on_llava_next():
    # the official encode_images: each crop (base included) keeps T = int(16 * 0.25) = 4 of its 16
    # tokens, chosen on the select-layer attention (head mean) and select-layer features
    model, _ = tiny6("llava_next")
    x = two_samples("llava_next")
    cfg = pact.load_config("vispruner")
    pact.api.apply(model, cfg)
    with torch.no_grad():
        model(**x)
    ours = kept_of(model)
    pact.api.remove(model)
    counts, out, _, token_row = next_crops_and_tokens(model, x)
    select_layer = len(out_layers(model)) + model.config.vision_feature_layer
    pv = torch.cat([p[:c] for p, c in zip(x["pixel_values"], counts, strict=True)])
    _, q, k = tower_run(model, pv, select_layer)
    attn = cls_rows(q, k, model.config.vision_config.num_attention_heads).mean(-1)
    feats = out.hidden_states[-2][:, 1:]
    crops, v = attn.shape
    t = int(v * cfg.keep_ratio)
    selected = torch.zeros(crops, v, dtype=torch.bool)
    for c in range(crops):
        selected[c, vispruner_select(attn[c], feats[c], t, cfg.vispruner_important_ratio)] = True
    per_sample = [int(n) for n in testing.patch_token_mask(model, x).sum(1)]
    want = [s.nonzero().flatten().tolist() for s in torch.split(selected.flatten()[token_row], per_sample)]
    assert ours == want
    # the options give today's behaviour: one selection of int(N * keep_ratio) per sample
    pact.api.apply(model, pact.load_config("vispruner", vispruner_scope="sample"))
    with torch.no_grad():
        model(**x)
    assert pact.api.stats(model).visual_after == [int(n * cfg.keep_ratio) for n in per_sample]


def test_every_vision_option_changes_what_it_names():
    # no accepted key is silently ignored: each option, on a model, changes the computation it names
    def run(model: Any, family: str, name: str, **overrides: Any) -> Any:
        pact.api.apply(model, pact.load_config(name, **overrides))
        reds = returned_reductions(model)
        with torch.no_grad():
            model(**two_samples(family))
        pact.api.remove(model)
        return reds[0]

    sharp = sharp_llava()
    base = run(sharp, "llava", "prumerge")
    assert not torch.allclose(
        run(sharp, "llava", "prumerge", prumerge_attention="head_mean").scores, base.scores
    )
    projected = run(sharp, "llava", "prumerge", vision_features="projector")
    assert torch.equal(projected.kept, base.kept) and not torch.allclose(projected.hidden, base.hidden)
    assert run(sharp, "llava", "prumerge", prumerge_extra_token=False).extra is None
    plus = run(sharp, "llava", "prumerge", prumerge_plus=True)
    lattice = run(sharp, "llava", "prumerge", prumerge_plus=True, prumerge_sampling="lattice")
    assert plus.kept.tolist() != lattice.kept.tolist()
    model, _ = tiny6("llava_next")
    vp = run(model, "llava_next", "vispruner")
    assert (
        run(model, "llava_next", "vispruner", vision_features="projector").kept.tolist() != vp.kept.tolist()
    )
    assert run(model, "llava_next", "vispruner", vispruner_scope="sample").kept.tolist() != vp.kept.tolist()
    hired = run(model, "llava_next", "hired")
    assert run(model, "llava_next", "hired", hired_layout="spatial").kept.tolist() != hired.kept.tolist()


def test_vispruner_computes_in_the_model_dtype():
    # a bf16 model: the default reads the [CLS] attention in bf16 (the official fp16/bf16 run), the
    # option in float32 from the same bf16 q/k; the rounding shows in the recorded scores
    model, _ = testing.tiny_pair("llava", num_hidden_layers=2)
    model = model.to(torch.bfloat16)
    x = two_samples("llava")
    x["pixel_values"] = x["pixel_values"].to(torch.bfloat16)
    scores = {}
    for dtype in ("model", "float32"):
        pact.api.apply(model, pact.load_config("vispruner", vispruner_dtype=dtype))
        reds = returned_reductions(model)
        with torch.no_grad():
            model(**x)
        pact.api.remove(model)
        scores[dtype] = reds[0].scores
    assert not torch.equal(scores["model"], scores["float32"])
    assert torch.equal(scores["model"], scores["model"].bfloat16().float())  # bf16 values
    assert not torch.equal(scores["float32"], scores["float32"].bfloat16().float())


def test_prumerge_budget_adds_no_extra_token():
    # a budget counts every token the sample keeps: exactly K visual tokens, no extra one on top
    model = sharp_llava()
    pact.api.apply(model, pact.load_config("prumerge", target_tokens=10))
    reds = returned_reductions(model)
    with torch.no_grad():
        model(**two_samples("llava"))
    pact.api.remove(model)
    assert [r.num_kept for r in reds] == [10, 10] and all(r.extra is None for r in reds)


@pytest.mark.parametrize(
    ("name", "family"),
    [("hired", "llava_next"), ("vispruner", "llava_next"), ("prumerge", "llava"), ("vispruner", "qwen2_vl")],
)
def test_vision_methods_generate_the_same_without_a_cache(name, family):
    # generate(use_cache=False) runs every step as a prefill on the same pre-encoded vision outputs
    # (the encoder runs once): the method must reuse that encoder's captured signals, and the tokens
    # equal the cached generation's
    model, _ = tiny6(family)
    x = two_samples(family)
    pact.api.apply(model, tiny_config(name))
    with torch.no_grad():
        cached = model.generate(**x, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        uncached = model.generate(**x, max_new_tokens=3, min_new_tokens=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert pact.api.stats(model).layers == [0]
