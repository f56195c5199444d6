"""VisionZip: the rule on hand-made inputs, the official computation on a tiny LLaVA-1.5 (plain
loops over the tower's own eager attention and keys), budgets, order, and refused settings."""

from __future__ import annotations

import itertools
import sys
from typing import Any

import pytest
import torch

import pact
import pact.api
from pact import testing
from pact.methods.budget import target_count
from pact.ops.visionzip import visionzip_counts, visionzip_crop

# ---------------------------------------------------------------------------------------------------
# the rule on hand-made inputs


def test_counts_split_the_budget_as_the_official_configurations():
    # README / paper: 64 = 54 + 10, 128 = 108 + 20, 192 = 162 + 30 on LLaVA-1.5
    assert visionzip_counts(64, 0.15625) == (54, 10)
    assert visionzip_counts(128, 0.15625) == (108, 20)
    assert visionzip_counts(192, 0.15625) == (162, 30)
    assert visionzip_counts(3, 0.15625) == (3, 0)
    with pytest.raises(ValueError, match="contextual_ratio"):
        visionzip_counts(10, 1.5)


def test_dominant_and_contextual_tokens_by_hand():
    # 8 patches. Dominant (2): the two largest attentions, patches 1 and 3.
    attn = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.05, 0.3, 0.0, 0.4])
    # The 6 others in index order: [0, 2, 4, 5, 6, 7]; 2 contextual -> step 6 // 2 = 3, targets at
    # rest positions 0 and 3 = patches 0 and 5. Keys: patches 4 and 6 point like patch 0 (x axis),
    # patches 2 and 7 like patch 5 (y axis).
    x, y = [1.0, 0.0], [0.0, 1.0]
    keys = torch.tensor([x, [0.5, 0.5], [0.1, 1.0], [0.3, 0.3], [2.0, 0.1], y, [1.0, 0.2], [0.2, 3.0]])
    feats = torch.arange(8, dtype=torch.float32)[:, None] * torch.tensor([[1.0, -1.0]])
    red, ctx = visionzip_crop(attn, keys, feats, 2, 2)
    assert red.kept.tolist() == [0, 1, 3, 5]
    # official output order: dominant (1, 3) then contextual (0, 5)
    assert red.kept[red.order].tolist() == [1, 3, 0, 5]
    assert ctx.tolist() == [True, False, False, True]
    assert red.labels.tolist() == [0, 1, 3, 2, 0, 3, 0, 3]
    assert red.sizes.tolist() == [3.0, 1.0, 1.0, 3.0]
    # contextual = target + plain mean of its members: 0 + (4 + 6) / 2 = 5; 5 + (2 + 7) / 2 = 9.5
    torch.testing.assert_close(red.hidden[:, 0], torch.tensor([5.0, 1.0, 3.0, 9.5]))
    torch.testing.assert_close(red.hidden[:, 1], -red.hidden[:, 0])
    # merge_mean=False: the targets keep their own features (sizes still count the members)
    red2, _ = visionzip_crop(attn, keys, feats, 2, 2, merge_mean=False)
    torch.testing.assert_close(red2.hidden[:, 0], torch.tensor([0.0, 1.0, 3.0, 5.0]))


def test_ties_go_to_the_lower_index_and_the_first_target():
    attn = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5])
    keys = torch.ones(5, 3)  # every member is equally similar to both targets
    feats = torch.arange(5, dtype=torch.float32)[:, None]
    red, _ = visionzip_crop(attn, keys, feats, 1, 2)
    # dominant: the lower index (0); rest [1, 2, 3, 4], step 2 -> targets 1 and 3; members 2 and 4
    # tie between the targets -> the first (1)
    assert red.kept.tolist() == [0, 1, 3]
    assert red.labels.tolist() == [0, 1, 1, 2, 1]
    torch.testing.assert_close(red.hidden[:, 0], torch.tensor([0.0, 1.0 + 3.0, 3.0]))


def test_more_contextual_than_remaining_tokens_and_empty_inputs():
    attn = torch.tensor([0.3, 0.2, 0.1])
    red, ctx = visionzip_crop(attn, torch.randn(3, 4), torch.randn(3, 2), 1, 5)
    assert red.kept.tolist() == [0, 1, 2] and ctx.tolist() == [False, True, True]
    assert red.sizes.tolist() == [1.0, 1.0, 1.0]
    red, ctx = visionzip_crop(attn, torch.randn(3, 4), torch.randn(3, 2), 0, 0)
    assert red.kept.numel() == 0 and red.labels.tolist() == [-1, -1, -1]
    with pytest.raises(ValueError, match="keys and features"):
        visionzip_crop(attn, torch.randn(2, 4), torch.randn(3, 2), 1, 1)
    with pytest.raises(ValueError, match="keys"):
        visionzip_crop(attn, torch.full((3, 4), float("nan")), torch.randn(3, 2), 1, 1)


# ---------------------------------------------------------------------------------------------------
# on a tiny LLaVA-1.5: the official computation in plain loops

_MODELS: dict[str, Any] = {}


def tiny_llava() -> tuple[Any, Any]:
    if "llava" not in _MODELS:
        _MODELS["llava"] = testing.tiny_pair("llava", num_hidden_layers=2)
    return _MODELS["llava"]


@pytest.fixture(autouse=True)
def _stock():
    yield
    for model, _ in _MODELS.values():
        pact.api.remove(model)
        model.set_attn_implementation("sdpa")


def two_images(processor: Any, family: str = "llava") -> Any:
    samples = [
        {"question": "What is in the image?", "images": [testing.sample_image(0, size=(96, 64))]},
        {
            "question": "Describe the picture in one sentence.",
            "images": [testing.sample_image(1, size=(64, 120))],
        },
    ]
    return testing.build_inputs(family, processor, samples, padding_side="left")


def returned_reductions(model: Any) -> list[Any]:
    method = pact.api.engine_of(model).method
    out: list[Any] = []
    reduce = method.reduce

    def wrapped(signals: Any) -> Any:
        red = reduce(signals)
        out.append(red)
        return red

    method.reduce = wrapped
    return out


def official_visionzip(cls_attn, keys, feats, dominant, contextual):
    """VisionZip's CLIPVisionTower forward for ONE image in plain Python (no [CLS] token kept).

    cls_attn: (N,) [CLS] attention summed over heads; keys: (N, d) head-mean keys; feats: (N, F).
    Returns (patch indices in output order, output features)."""
    n = cls_attn.numel()
    dom = sorted(sorted(range(n), key=lambda i: (-float(cls_attn[i]), i))[:dominant])
    rest = [i for i in range(n) if i not in dom]
    step = max(1, len(rest) // contextual)
    targets = list(range(0, len(rest), step))[:contextual]
    unit = [keys[i] / keys[i].norm() for i in rest]
    groups: dict[int, list[int]] = {t: [] for t in targets}
    for p in range(len(rest)):
        if p in targets:
            continue
        sims = [float(unit[p] @ unit[t]) for t in targets]
        groups[targets[sims.index(max(sims))]].append(rest[p])
    out_idx = dom + [rest[t] for t in targets]
    out = [feats[i] for i in dom]
    for t in targets:
        members = groups[t]
        mean = sum((feats[j] for j in members), torch.zeros_like(feats[0])) / max(1, len(members))
        out.append(feats[rest[t]] + mean)
    return out_idx, torch.stack(out)


def test_visionzip_is_the_official_method_on_llava():
    model, processor = tiny_llava()
    x = two_images(processor)
    model.set_attn_implementation("eager")
    cfg = pact.load_config("visionzip", keep_ratio=0.5, visionzip_contextual_ratio=0.25)
    pact.api.apply(model, cfg)
    reds = returned_reductions(model)
    with torch.no_grad():
        logits = model(**x).logits
    assert bool(torch.isfinite(logits).all())
    pact.api.remove(model)
    core = model.model
    tower = getattr(core.vision_tower, "vision_model", core.vision_tower)
    select = model.config.vision_feature_layer  # -2: layer 0 of the 2-layer tower
    layer = len(tower.encoder.layers) + select  # hidden_states[select] is the output of this layer
    attn_module = tower.encoder.layers[layer].self_attn
    grabbed: dict[str, torch.Tensor] = {}
    hook = attn_module.k_proj.register_forward_hook(lambda m, i, o: grabbed.__setitem__("k", o))
    try:
        with torch.no_grad():
            out = core.vision_tower(x["pixel_values"], output_attentions=True, output_hidden_states=True)
    finally:
        hook.remove()
    heads = attn_module.num_heads
    assert len(reds) == 2
    for b, red in enumerate(reds):
        cls = out.attentions[layer][b, :, 0, 1:].sum(0)  # the tower's own eager attention
        k = grabbed["k"][b, 1:]
        keys = k.view(k.shape[0], heads, -1).mean(1)
        feats = out.hidden_states[select][b, 1:]
        n = feats.shape[0]
        total = int(n * 0.5)
        idx, official = official_visionzip(cls, keys, feats, total - int(total * 0.25), int(total * 0.25))
        assert red.kept[red.order].tolist() == idx, "kept tokens or their official order differ"
        with torch.no_grad():
            projected = core.multi_modal_projector(official).float()
        torch.testing.assert_close(red.hidden[red.order], projected, rtol=1e-4, atol=1e-5)
        # the dominant score is the [CLS] row of the tower's eager attention, summed over heads
        torch.testing.assert_close(red.scores, cls.float(), rtol=1e-5, atol=1e-6)


def test_positions_are_renumbered_and_order_recorded():
    model, processor = tiny_llava()
    x = two_images(processor)
    pact.api.apply(model, pact.load_config("visionzip", keep_ratio=0.5, visionzip_contextual_ratio=0.25))
    with torch.no_grad():
        model(**x)
    st = pact.api.stats(model)
    for rec in st.records[0]:
        assert rec.order is not None and rec.kept.numel() == 18
        # dominant tokens (size 1 ... in index order) come first, then the 4 contextual ones
        placed = rec.kept[rec.order]
        assert placed[:14].tolist() == sorted(placed[:14].tolist())
        assert placed[14:].tolist() == sorted(placed[14:].tolist())
    assert pact.api.engine_of(model).config.position_mode == "renumber"


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next", "internvl", "llava_onevision"])
@pytest.mark.parametrize("budget", [{"target_tokens": 9}, {"target_ratio": 0.6}])
def test_budgets_are_met_exactly(family, budget):
    model, processor = testing.tiny_pair(family, num_hidden_layers=2)
    x = two_images(processor, family)
    cfg = pact.load_config("visionzip", **budget)
    pact.api.apply(model, cfg)
    try:
        with torch.no_grad():
            model(**x)
        st = pact.api.stats(model)
    finally:
        pact.api.remove(model)
    for before, after in zip(st.visual_before, st.visual_after, strict=True):
        assert after == target_count(cfg, before)


def test_merge_space_follows_the_official_ports():
    from pact.methods.visionzip import VisionZip

    method = VisionZip(pact.load_config("visionzip"))
    method._mrope = False
    assert method.merge_space() == "encoder" and method.wants_features()
    method._mrope = True  # the Qwen2.5-VL port merges the LLM input embeddings
    assert method.merge_space() == "projector" and not method.wants_features()
    method = VisionZip(pact.load_config("visionzip", visionzip_features="encoder"))
    method._mrope = True
    assert method.merge_space() == "encoder"


def test_projector_space_merges_the_embeddings_on_llava():
    model, processor = tiny_llava()
    x = two_images(processor)
    cfg = pact.load_config(
        "visionzip", keep_ratio=0.5, visionzip_contextual_ratio=0.25, visionzip_features="projector"
    )
    pact.api.apply(model, cfg)
    reds = returned_reductions(model)
    grabbed: dict[str, torch.Tensor] = {}

    def grab(module: Any, args: tuple, kwargs: dict) -> None:
        grabbed["h"] = kwargs["inputs_embeds"]  # the LLM input, before any reduction

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**x)
    finally:
        hook.remove()
    embeds = grabbed["h"][testing.patch_token_mask(model, x)].view(2, -1, grabbed["h"].shape[-1])
    for b, red in enumerate(reds):
        e = embeds[b].float()
        ctx_slots = (red.sizes > 1).nonzero().squeeze(1)
        for s in ctx_slots.tolist():
            members = (red.labels == s).nonzero().squeeze(1)
            target = int(red.kept[s])
            others = members[members != target]
            torch.testing.assert_close(red.hidden[s], e[target] + e[others].mean(0), rtol=1e-5, atol=1e-5)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="visionzip_contextual_ratio"):
        pact.load_config("visionzip", visionzip_contextual_ratio=1.5)
    with pytest.raises(ValueError, match="visionzip_features"):
        pact.load_config("visionzip", visionzip_features="keys")
    model, _ = tiny_llava()
    with pytest.raises(ValueError, match="set progressive=false"):
        pact.api.apply(model, pact.load_config("visionzip", progressive=True))
    with pytest.raises(
        ValueError, match="no reduction method for pruning='visionzip' with clustering='kmeans'"
    ):
        pact.api.apply(model, pact.load_config("visionzip", clustering="kmeans"))


def test_qwen_dominant_score_is_the_ports_received_attention():
    """Qwen2-VL (no [CLS]): the Qwen2.5-VL port's dominant score -- the last ViT block's attention
    averaged over heads, summed over the query patches of the image, averaged over the 2 x 2 patches
    of each merged token -- recomputed from the block's own q/k/v (checked against the block's output),
    equals ours times the image's patch count (ours is the mean over queries: same ranking)."""
    model, processor = testing.tiny_pair("qwen2_vl", num_hidden_layers=2)
    x = two_images(processor, "qwen2_vl")
    attn = model.model.visual.blocks[-1].attn
    grabbed: dict[str, Any] = {}

    def grab(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        grabbed["x"] = args[0] if args else kwargs["hidden_states"]
        grabbed["cu"] = kwargs["cu_seqlens"]
        grabbed["rope"] = kwargs["position_embeddings"]
        grabbed["out"] = output

    hook = attn.register_forward_hook(grab, with_kwargs=True)
    pact.api.apply(model, pact.load_config("visionzip", keep_ratio=0.5))
    reds = returned_reductions(model)
    try:
        with torch.no_grad():
            model(**x)
    finally:
        hook.remove()
        pact.api.remove(model)
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    h = grabbed["x"]
    s = h.shape[0]
    with torch.no_grad():
        q, k, v = attn.qkv(h).reshape(s, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = rope(q, k, *grabbed["rope"])
        cu = grabbed["cu"].tolist()
        outs, official = [], []
        for a, b in itertools.pairwise(cu):
            probs = torch.softmax(torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * attn.scaling, dim=-1)
            outs.append(torch.einsum("hqk,khd->qhd", probs, v[a:b]).reshape(b - a, -1))
            received = probs.mean(0).sum(0)  # head mean, sum over the query patches
            official.append((received.view(-1, 4).mean(1), b - a))
        torch.testing.assert_close(attn.proj(torch.cat(outs)), grabbed["out"], rtol=1e-4, atol=1e-5)
    assert len(reds) == 2
    for red, (want, patches) in zip(reds, official, strict=True):
        torch.testing.assert_close(red.scores * patches, want, rtol=1e-4, atol=1e-6)
