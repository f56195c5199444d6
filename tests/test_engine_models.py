"""Model-side contracts of the engine: the pinned transformers internals it relies on, the visual
candidates of each family (image newlines never removed), layer-0 and progressive reductions,
videos and several images."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import FAMILIES, PairMerge, greedy, inputs_for, model_for, one_image

import pact
import pact.api
from pact import testing
from pact.models import get_adapter

# The decoder-layer forward parameters and the keyword arguments the stock text model passes to
# every layer, as the engine uses them (transformers 5.23.0). If an upgrade changes either, this
# test fails: re-check the engine's hooks (pact/engine.py) against the new decoder loop.
LAYER_PARAMS = {
    "self",
    "hidden_states",
    "attention_mask",
    "position_ids",
    "past_key_values",
    "use_cache",
    "position_embeddings",
    "kwargs",
}
LAYER_CALL_KWARGS = {"attention_mask", "position_embeddings", "position_ids", "past_key_values", "use_cache"}
EXTRA_CALL_KWARGS = {
    "llava_onevision": {"logits_to_keep"},
    "internvl": {"image_sizes"},
    "qwen3_vl_moe": {"output_router_logits"},
    "qwen3_5_moe": {"output_router_logits"},
}  # via **kwargs, unused
MISSING_CALL_KWARGS = {
    "glm4v": {"use_cache"},  # Glm4vTextModel does not pass it to its layers
    "qwen3_vl": {"use_cache"},  # not passed (unused)
    "qwen3_vl_moe": {"use_cache"},
    "gemma3": {"use_cache"},  # Gemma3TextModel does not pass it to its layers
}


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_layer_call_signature_is_pinned(family):
    import transformers

    assert transformers.__version__ == "5.23.0", "the engine is pinned to transformers 5.23.0"
    model, _ = model_for(family)
    adapter = get_adapter(model)
    # the first softmax-attention layer (hybrid decoders: tests/test_qwen3_5.py checks the linear ones)
    layer = adapter.layers[min(set(range(len(adapter.layers))) - adapter.linear_attention_layers())]
    params = set(inspect.signature(type(layer).forward).parameters)
    assert params in (LAYER_PARAMS, LAYER_PARAMS - {"use_cache"})  # Qwen3.5: use_cache via **kwargs
    assert {"hidden_states", "position_embeddings", "attention_mask", "past_key_values"} <= set(
        inspect.signature(type(layer.self_attn).forward).parameters
    )
    for name in ("input_layernorm", "self_attn"):
        assert hasattr(layer, name)
    for name in ("q_proj", "k_proj", "head_dim"):
        assert hasattr(layer.self_attn, name)
    assert callable(adapter.apply_rotary_fn(layer))
    calls = []

    def grab(mod, args, kwargs):
        calls.append((len(args), set(kwargs)))

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        x = inputs_for(family, [one_image(family)])
        greedy(model, x, n=2)
    finally:
        handle.remove()
    expected = (LAYER_CALL_KWARGS | EXTRA_CALL_KWARGS.get(family, set())) - MISSING_CALL_KWARGS.get(
        family, set()
    )
    assert calls and all(c == (1, expected) for c in calls), calls
    # (that the adapter's queries/keys are the attention's own is tests/test_qk_contract.py)


def test_unsupported_model_class_is_rejected():
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32
        )
    )
    with pytest.raises(
        ValueError, match=r"LlamaForCausalLM.*supported classes:.*Qwen2VLForConditionalGeneration"
    ):
        pact.api.apply(text_only, pact.load_config())


def test_unsupported_method_combination_names_the_keys():
    model, _ = model_for("llava")
    # a whole (vision-side) method does not compose with a clustering
    with pytest.raises(ValueError, match=r"pruning='vispruner'.*clustering='kmeans'"):
        pact.api.apply(model, pact.load_config(None, pruning="vispruner", clustering="kmeans", layer=0))
    with pytest.raises(ValueError, match="layer=7"):
        pact.api.apply(model, pact.load_config(None, layer=7))


# ---------------------------------------------------------------------------------------------------
# Visual candidates and image newlines


def _newline_cases(family):
    cases = [
        [one_image(family, 0, (96, 64))],
        [one_image(family, 1, (64, 120)), one_image(family, 2, (200, 60))],
    ]
    if family == "llava_onevision":
        cases.append(
            [
                {
                    "question": "Two?",
                    "images": [testing.sample_image(3), testing.sample_image(4, size=(50, 90))],
                }
            ]
        )
        cases.append([{"question": "Video?", "videos": [testing.sample_video(0, num_frames=2)]}])
    return cases


@pytest.mark.parametrize("family", ["llava_onevision", "llava_next"])
def test_newline_slots_are_located_from_the_layout_and_never_removed(family):
    model, _ = model_for(family)
    adapter = get_adapter(model)
    for samples in _newline_cases(family):
        x = inputs_for(family, samples)
        oracle = testing.patch_token_mask(model, x)  # asks the model which rows are image_newline
        placeholders = testing.placeholder_mask(family, x)
        assert (placeholders & ~oracle).any(), "the case has newline slots"
        assert torch.equal(adapter.candidate_mask(x["input_ids"], dict(x)), oracle)
        # in generate the images arrive pre-encoded (mm_encoder_outputs): same answer
        encoded = {}
        if "pixel_values" in x:
            kw = {"image_sizes": x["image_sizes"]}
            if "batch_num_images" in x:
                kw["batch_num_images"] = x["batch_num_images"]
            encoded["image"] = model.model.get_image_features(x["pixel_values"], **kw)
        if "pixel_values_videos" in x:
            encoded["video"] = model.model.get_video_features(x["pixel_values_videos"])
        got = adapter.candidate_mask(x["input_ids"], {"mm_encoder_outputs": encoded})
        assert torch.equal(got, oracle)
        # every visual token removed: newline slots (and text) are all still in the sequence
        pact.api.apply(
            model, pact.load_config(None, layer=2, pruning="euti", clustering="none", keep_ratio=0.0)
        )
        greedy(model, x, n=2)
        lay = pact.api.engine_of(model).layout
        for b in range(x["input_ids"].shape[0]):
            kept = set(lay.slot_orig[b][lay.slot_orig[b] >= 0].tolist())
            valid = x["attention_mask"][b].bool()
            assert kept == set(torch.nonzero(valid & ~oracle[b]).flatten().tolist())
        assert pact.api.stats(model).visual_after == [0] * x["input_ids"].shape[0]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "internvl", "llava"])
def test_candidates_are_the_placeholder_tokens(family):
    model, _ = model_for(family)
    x = inputs_for(family, [one_image(family)])
    got = get_adapter(model).candidate_mask(x["input_ids"], dict(x))
    assert torch.equal(got, testing.patch_token_mask(model, x))
    assert got.sum() > 0


# ---------------------------------------------------------------------------------------------------
# Layer 0, progressive, videos, several images


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision", "internvl"])
def test_reduction_at_layer_zero(family):
    model, _ = model_for(family)
    x = inputs_for(family, [one_image(family, 0), one_image(family, 1, (64, 120), "Describe it.")])
    c = pact.load_config(None, layer=0, pruning="none", clustering="none")
    pact.api.apply(model, c, method=PairMerge(c, drop_every=3))
    cached = greedy(model, x, n=4)
    assert pact.api.stats(model).layers == [0]
    assert torch.equal(cached, greedy(model, x, n=4, use_cache=False))
    # a hand-written decode loop without position_ids: positions continue from the unreduced length
    single = inputs_for(family, [one_image(family, 0)])
    with torch.no_grad():
        out = model(**single, use_cache=True)
        assert out.past_key_values.get_seq_length(0) < single["input_ids"].shape[1]
        tokens = [out.logits[:, -1].argmax(-1)]
        mask = single["attention_mask"]
        for _ in range(3):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            out = model(
                input_ids=tokens[-1][:, None], attention_mask=mask, past_key_values=out.past_key_values
            )
            tokens.append(out.logits[:, -1].argmax(-1))
    assert torch.equal(torch.stack(tokens, 1), greedy(model, single, n=4))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_next"])
def test_progressive_reduction(family):
    model, _ = model_for(family)
    x = inputs_for(family, [one_image(family, 0), one_image(family, 1, (64, 120), "Describe it.")])
    c = pact.load_config(None, layer=1, pruning="none", clustering="none", progressive=True)
    pact.api.apply(model, c, method=PairMerge(c))
    with torch.no_grad():
        out = model(**x, use_cache=True)
    st = pact.api.stats(model)
    assert st.layers == [1, 2, 3]
    n0 = st.visual_before
    expected = n0
    for _ in range(3):
        expected = [-(-n // 2) for n in expected]
    assert st.visual_after == expected
    lengths = [out.past_key_values.get_seq_length(i) for i in range(4)]
    assert lengths[0] == x["input_ids"].shape[1] and lengths[0] > lengths[1] > lengths[2] > lengths[3]
    # labels compose across steps: every original token maps into the last step's kept list
    for rec in st.records[-1]:
        assert rec.labels.shape == (rec.labels.shape[0],) and (rec.labels >= 0).all()
        assert rec.sizes.sum() == rec.labels.numel()
    assert torch.equal(greedy(model, x, n=3), greedy(model, x, n=3, use_cache=False))


@pytest.mark.parametrize("family", testing.VIDEO_FAMILIES)
def test_video_and_several_images(family):
    model, _ = model_for(family)
    samples = [
        {"question": "Describe the video.", "videos": [testing.sample_video(0, num_frames=2)]},
        {
            "question": "Compare them.",
            "images": [testing.sample_image(1), testing.sample_image(2, size=(64, 64))],
        },
    ]
    # SmolVLM's processor cannot batch images with videos (testing.BATCH_LIMITS): one batch each
    batches = [samples] if testing.TINY_FAMILIES[family].mixes_images_and_videos else [[s] for s in samples]
    pact.api.apply(model, pact.load_config("configs/pact.json", layer=2))
    for batch in batches:
        x = inputs_for(family, batch)
        cached = greedy(model, x, n=3)
        st = pact.api.stats(model)
        assert all(b > a > 0 for a, b in zip(st.visual_after, st.visual_before, strict=True))
        assert st.visual_before == testing.patch_token_mask(model, x).sum(1).tolist()
        assert torch.equal(cached, greedy(model, x, n=3, use_cache=False))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_position_mode_mean_puts_merged_tokens_at_member_mean(family):
    model, _ = model_for(family)
    x = inputs_for(family, [one_image(family)])
    c = pact.load_config(None, layer=2, pruning="none", clustering="none", position_mode="mean")
    pact.api.apply(model, c, method=PairMerge(c))
    greedy(model, x, n=2)
    engine = pact.api.engine_of(model)
    lay = engine.layout
    # original positions of the visual tokens, in order; pairs (2k, 2k+1) -> round(mean)
    pact.api.remove(model)
    captured = {}
    layer0 = get_adapter(model).text_model.layers[0]

    def grab(mod, args, kwargs):
        captured.setdefault("pe", kwargs["position_embeddings"])

    handle = layer0.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**x)
    finally:
        handle.remove()
    vis_pos = torch.nonzero(testing.patch_token_mask(model, x)[0]).flatten()
    slots = torch.nonzero(lay.visual[0]).flatten()
    positions = lay.positions[:, 0, slots]  # (A, R) positions of the merged visual tokens
    if family == "llava":
        pairs = vis_pos.view(-1, 2).float().mean(1)
        assert torch.equal(positions[0], torch.round(pairs).long())
    cos, sin = engine.adapter.rotary(lay.cos[:1, :1].float(), positions[:, None, :])
    assert torch.allclose(lay.cos[0, slots].float(), cos[0].float()) and torch.allclose(
        lay.sin[0, slots].float(), sin[0].float()
    )
    assert not torch.equal(lay.cos[0, slots], captured["pe"][0][0, vis_pos[::2]])
