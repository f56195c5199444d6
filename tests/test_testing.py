"""Tests of pact.testing: the tiny models, processors, sample inputs and assets every other test uses.

Each test asserts a property the rest of the suite relies on (placeholder counts match the vision
side, left-padded batches equal one-by-one runs, save/load round trips, determinism), so a broken
builder fails here first rather than as a confusing engine failure.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from typing import Any

import numpy as np
import pytest
import torch

from pact import testing as T
from pact.models import get_adapter

IMAGE_A = T.sample_image(0)  # 96 x 64
IMAGE_B = T.sample_image(1, (64, 96))
IMAGE_C = T.sample_image(2, (80, 80))
VIDEO = T.sample_video(0, num_frames=4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Tiny models run 10x faster on one thread: with two, every small op pays thread wake-ups, and
    on a loaded 2-core machine spin-waiting makes a 10 ms forward take 300 ms. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def _pair(family: str, attn: str = "sdpa") -> tuple[Any, Any]:
    """Models are read-only in these tests, so one build per (family, attention) is shared."""
    return T.tiny_pair(family, attn_implementation=attn)


def _record_vision_rows(model: Any) -> list[int]:
    """Patch the instance's get_image_features/get_video_features to record how many embedding rows
    the vision side hands to the language model in the next forward (per call)."""
    rows: list[int] = []
    depth = [0]  # Qwen3-VL's get_video_features calls get_image_features: count the outer call only
    core = model.model
    depth = [0]  # Qwen3.5's get_video_features calls get_image_features: count the outer call only
    for name in ("get_image_features", "get_video_features"):
        original = getattr(core, name, None)
        if original is None:
            continue

        def wrapper(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            depth[0] += 1
            try:
                out = _original(*args, **kwargs)
            finally:
                depth[0] -= 1
            if depth[0]:
                return out
            pooled = out.pooler_output
            tensors = [pooled] if torch.is_tensor(pooled) else list(pooled)
            rows.append(sum(t.reshape(-1, t.shape[-1]).shape[0] for t in tensors))
            return out

        setattr(core, name, wrapper)
    return rows


def _unpatch(model: Any) -> None:
    for name in ("get_image_features", "get_video_features"):
        model.model.__dict__.pop(name, None)


def _greedy(model: Any, inputs: Any, n: int = 3) -> torch.Tensor:
    # min_new_tokens: a random model may pick <eos> first (the tiny GLM-4.1V does), and a batch row
    # that stopped early is padded, unlike the same sample alone
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


# ---------------------------------------------------------------------------------------------------
# Constants, tokenizer, configs


def test_family_lists() -> None:
    from pact.models import ADAPTERS

    assert tuple(ADAPTERS) == T.FAMILIES
    assert T.FAMILIES[:6] == ("qwen2_vl", "qwen2_5_vl", "llava_onevision", "llava_next", "llava", "internvl")
    assert set(T.BATCH_LIMITS) == set(T.FAMILIES) <= set(T.TINY_FAMILIES)
    for family in T.FAMILIES:
        processor = T.tiny_processor(family)
        has_video = getattr(processor, "video_processor", None) is not None
        assert has_video == (family in T.VIDEO_FAMILIES), family
        # A class that takes pixel_values_videos is a video family (InternVL feeds frames as images).
        params = inspect.signature(T.model_class(family).forward).parameters
        assert "pixel_values_videos" not in params or family in T.VIDEO_FAMILIES, family
    with pytest.raises(ValueError, match="unknown family"):
        T.tiny_model("llama")


def test_tokenizer_is_deterministic_and_has_fixed_special_ids() -> None:
    tok = T.tiny_tokenizer()
    first = T._trained_tokenizer_json()
    T._trained_tokenizer_json.cache_clear()
    assert T._trained_tokenizer_json() == first  # retraining gives the same vocabulary and merges
    assert len(tok) <= T.TEXT_VOCAB_SIZE
    for i, token in enumerate(T.SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(token) == i == T.token_id(token)
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == ("<pad>", "<eos>", "<bos>")
    assert tok.padding_side == "left"
    text = "Is there a red circle on the left? Answer yes or no."
    ids = tok(text).input_ids
    assert len(ids) < len(text) / 2  # BPE merges happened
    assert tok.decode(ids) == text
    assert tok("a <image> b <|image_pad|>").input_ids.count(T.token_id("<image>")) == 1
    internvl = T.tiny_tokenizer("internvl")
    assert internvl.context_image_token_id == T.token_id("<IMG_CONTEXT>")
    assert (internvl.start_image_token_id, internvl.end_image_token_id) == (
        T.token_id("<img>"),
        T.token_id("</img>"),
    )


def test_family_special_tokens_are_single_tokens_with_fixed_ids() -> None:
    """Tokens only some families need follow the trained vocabulary, with the same id in every
    family's tokenizer, and never change the base special ids."""
    for family in T.FAMILIES:
        tok = T.tiny_tokenizer(family)
        for token in T.SPECIAL_TOKENS + T.FAMILY_SPECIAL_TOKENS:
            assert tok.convert_tokens_to_ids(token) == T.token_id(token), (family, token)
            assert tok(token, add_special_tokens=False)["input_ids"] == [T.token_id(token)], (family, token)
        assert len(tok) <= T.TEXT_VOCAB_SIZE
    with pytest.raises(ValueError, match="not a special token"):
        T.token_id("<not-a-token>")


@pytest.mark.parametrize("family", T.FAMILIES)
def test_chat_template_places_the_family_placeholders(family: str) -> None:
    processor = T.tiny_processor(family)
    sample = {"question": "What?", "images": [IMAGE_A, IMAGE_B]}
    if family in T.VIDEO_FAMILIES:
        sample["videos"] = [VIDEO]
    # the template given explicitly: SmolVLM's processor swaps in its own default one for videos
    text = processor.apply_chat_template(
        T.prompt_messages(sample), processor.chat_template, tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>user\n") and text.endswith("What?<|im_end|>\n<|im_start|>assistant\n")
    assert text.count(T.TINY_FAMILIES[family].image_placeholder) == 2
    if family in T.VIDEO_FAMILIES:
        assert text.count(T.TINY_FAMILIES[family].video_placeholder) == 1
    no_prompt = processor.apply_chat_template(
        T.prompt_messages(sample), processor.chat_template, tokenize=False
    )
    assert not no_prompt.endswith("assistant\n")


@pytest.mark.parametrize("family", T.FAMILIES)
def test_config_shapes(family: str) -> None:
    model, processor = _pair(family)
    text = model.config.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (64, 4, 4)
    assert (text.num_key_value_heads, text.intermediate_size) == (2, 128)
    assert text.vocab_size >= len(processor.tokenizer)
    assert len(get_adapter(model).layers) == 4
    if family.startswith("qwen"):
        rotary = text.rope_parameters.get("partial_rotary_factor", 1.0)  # Qwen3.5: RoPE on part of a head
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        assert sum(text.rope_parameters["mrope_section"]) == int(head_dim * rotary) // 2
        wide = T.tiny_config(family, text_overrides={"hidden_size": 128, "num_attention_heads": 4})
        assert sum(wide.text_config.rope_parameters["mrope_section"]) == int(32 * rotary) // 2
    assert not model.training
    two = T.tiny_model(family, num_hidden_layers=2)
    assert len(get_adapter(two).layers) == 2


def test_model_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = T.tiny_model("llava_onevision", seed=0)
    assert torch.equal(torch.rand(3), expected)
    b = T.tiny_model("llava_onevision", seed=0)
    c = T.tiny_model("llava_onevision", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_no_all_zero_weight_matrices() -> None:
    # InternViT initialises its position embeddings and CLS token to zeros; tiny_model re-draws them.
    model = _pair("internvl")[0]
    zero = [n for n, p in model.named_parameters() if p.dim() >= 2 and not p.any()]
    assert zero == []


def test_bfloat16_model() -> None:
    model = T.tiny_model("qwen2_vl", dtype=torch.bfloat16)
    processor = T.tiny_processor("qwen2_vl")
    assert model.dtype == torch.bfloat16
    x = T.build_inputs("qwen2_vl", processor, [{"question": "What?", "images": [IMAGE_A]}])
    assert torch.isfinite(model(**x).logits.float()).all()


# ---------------------------------------------------------------------------------------------------
# Forward and generate


@pytest.mark.parametrize("family", T.FAMILIES)
def test_image_prompt_forward_generate_sdpa_and_eager(family: str) -> None:
    samples = [{"question": "What is in the image?", "images": [IMAGE_A]}]
    results = {}
    for attn in ("sdpa", "eager"):
        model, processor = _pair(family, attn)
        assert model.config._attn_implementation == attn
        x = T.build_inputs(family, processor, samples)
        count = T.expected_visual_count(family, x)
        assert 10 <= count <= 100
        rows = _record_vision_rows(model)
        try:
            with torch.no_grad():
                logits = model(**x).logits
        finally:
            _unpatch(model)
        assert rows == [count]  # the vision side produced exactly one embedding per placeholder
        assert logits.shape == (1, x["input_ids"].shape[1], T.TEXT_VOCAB_SIZE)
        assert torch.isfinite(logits).all()
        new = _greedy(model, x)
        assert new.shape == (1, 3)
        results[attn] = (logits[0, -1], new)
    torch.testing.assert_close(results["sdpa"][0], results["eager"][0], atol=1e-4, rtol=1e-4)
    assert torch.equal(results["sdpa"][1], results["eager"][1])


@pytest.mark.parametrize("family", T.FAMILIES)
def test_outputs_depend_on_the_image_and_are_not_flat(family: str) -> None:
    model, processor = _pair(family)
    logits = []
    for image in (IMAGE_A, T.sample_image(7)):
        x = T.build_inputs(family, processor, [{"question": "What is in the image?", "images": [image]}])
        with torch.no_grad():
            logits.append(model(**x).logits[0, -1])
    assert logits[0].std() > 0.5  # unit-scale logits, not the near-flat ones of HF's 0.02 init
    assert (logits[0] - logits[1]).abs().max() > 0.1
    x = T.build_inputs(family, processor, [{"question": "Describe the picture.", "images": [IMAGE_A]}])
    tokens = _greedy(model, x, n=12)[0].tolist()
    assert len(set(tokens)) >= 3, tokens  # greedy decoding does not just repeat one token


@pytest.mark.parametrize("family", T.FAMILIES)
def test_left_padded_batch_equals_one_by_one(family: str) -> None:
    model, processor = _pair(family)
    samples = [
        {"question": "What is this?", "images": [IMAGE_A]},
        {"question": "Compare the two images and tell me what changed.", "images": [IMAGE_B, IMAGE_C]},
    ]
    x = T.build_inputs(family, processor, samples)
    counts = T.expected_visual_count(family, x, per_sample=True)
    singles = [T.build_inputs(family, processor, [s]) for s in samples]
    assert counts == [T.expected_visual_count(family, s) for s in singles]
    mask = x["attention_mask"]
    assert mask[:, -1].all() and not mask.all()  # left padding: every row ends with a real token
    assert (mask.sum(1) == torch.tensor([s["input_ids"].shape[1] for s in singles])).all()
    rows = _record_vision_rows(model)
    try:
        with torch.no_grad():
            batch_logits = model(**x).logits[:, -1]
    finally:
        _unpatch(model)
    assert sum(rows) == sum(counts)
    batch_tokens = _greedy(model, x)
    for i, single in enumerate(singles):
        with torch.no_grad():
            torch.testing.assert_close(batch_logits[i], model(**single).logits[0, -1], atol=1e-4, rtol=1e-4)
        assert torch.equal(batch_tokens[i], _greedy(model, single)[0])


@pytest.mark.parametrize("family", T.FAMILIES)
def test_text_only_and_text_next_to_image(family: str) -> None:
    model, processor = _pair(family)
    x = T.build_inputs(family, processor, [{"question": "Hello, what is a cat?"}])
    assert T.expected_visual_count(family, x) == 0
    assert "pixel_values" not in x
    assert _greedy(model, x).shape == (1, 3)
    mixed = T.build_inputs(
        family, processor, [{"question": "Hello, what is a cat?"}, {"question": "What?", "images": [IMAGE_A]}]
    )
    assert T.expected_visual_count(family, mixed, per_sample=True)[0] == 0
    tokens = _greedy(model, mixed)
    assert torch.equal(tokens[0], _greedy(model, x)[0])


@pytest.mark.parametrize("family", T.FAMILIES)
def test_video(family: str) -> None:
    model, processor = _pair(family)
    sample = {"question": "Describe the video.", "videos": [VIDEO]}
    if family not in T.VIDEO_FAMILIES:
        with pytest.raises(ValueError, match="does not accept videos"):
            T.build_inputs(family, processor, [sample])
        return
    other = {"question": "What?", "images": [IMAGE_A]}
    mixes = T.TINY_FAMILIES[family].mixes_images_and_videos
    if not mixes:  # SmolVLM, GLM-4.1V (BATCH_LIMITS): batch a second video instead
        with pytest.raises(ValueError, match="cannot batch images and videos"):
            T.build_inputs(family, processor, [sample, other])
        other = {"question": "What?", "videos": [VIDEO[:2]]}
    x = T.build_inputs(family, processor, [sample, other])
    counts = T.expected_visual_count(family, x, per_sample=True)
    assert counts[0] > 0 and counts[1] > 0
    rows = _record_vision_rows(model)
    try:
        with torch.no_grad():
            model(**x)
    finally:
        _unpatch(model)
    assert sum(rows) == sum(counts)
    assert _greedy(model, x).shape == (2, 3)
    if mixes:
        both = T.build_inputs(
            family, processor, [{"question": "Both?", "images": [IMAGE_A], "videos": [VIDEO]}]
        )
        assert _greedy(model, both).shape == (1, 3)


# ---------------------------------------------------------------------------------------------------
# Placeholder layout oracle


@pytest.mark.parametrize("family", T.FAMILIES)
def test_patch_token_mask(family: str) -> None:
    model, processor = _pair(family)
    x = T.build_inputs(family, processor, [{"question": "What?", "images": [IMAGE_A]}])
    placeholders = T.placeholder_mask(family, x)
    patches = T.patch_token_mask(model, x)
    assert not (patches & ~placeholders).any()
    newlines = int((placeholders & ~patches).sum())
    if family not in ("llava_onevision", "llava_next"):
        assert newlines == 0
        return
    # anyres: 4 x 4 base-crop patches without newline, then each row of the high-res grid ends with one.
    run = patches[0][placeholders[0]].tolist()
    assert all(run[:16])
    assert run[-1] is False and newlines >= 2
    row = run.index(False, 16) - 16 + 1
    assert len(run) - 16 == newlines * row
    if family == "llava_onevision":
        # Several images in one sample: base crop only, one newline after each image.
        x = T.build_inputs(family, processor, [{"question": "Compare.", "images": [IMAGE_B, IMAGE_C]}])
        run = T.patch_token_mask(model, x)[0][T.placeholder_mask(family, x)[0]].tolist()
        assert run == ([True] * 16 + [False]) * 2
        # A video: frames x pooled 2 x 2 patches, then one newline at the very end.
        x = T.build_inputs(family, processor, [{"question": "Video?", "videos": [VIDEO]}])
        run = T.patch_token_mask(model, x)[0][T.placeholder_mask(family, x)[0]].tolist()
        assert run == [True] * 4 * len(VIDEO) + [False]


# ---------------------------------------------------------------------------------------------------
# Save / load, images, assets


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision", "internvl"])
def test_save_tiny_round_trip(family: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = T.save_tiny(family, tmp_path / family, seed=3)
    loaded = AutoModelForImageTextToText.from_pretrained(path).eval()
    loaded_processor = AutoProcessor.from_pretrained(path)
    model, processor = T.tiny_pair(family, seed=3)
    assert type(loaded) is type(model) and type(loaded_processor) is type(processor)
    samples = [{"question": "What?", "images": [IMAGE_A]}]
    if family in T.VIDEO_FAMILIES:
        samples.append({"question": "Video?", "videos": [VIDEO]})
    x = T.build_inputs(family, processor, samples)
    y = T.build_inputs(family, loaded_processor, samples)
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key], y[key]), key
    with torch.no_grad():
        torch.testing.assert_close(loaded(**y).logits, model(**x).logits)
    assert torch.equal(_greedy(loaded, y), _greedy(model, x))


def test_sample_image_structure() -> None:
    image = T.sample_image(0)
    assert image.size == (96, 64) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(T.sample_image(0)))
    assert not np.array_equal(np.asarray(image), np.asarray(T.sample_image(1)))
    assert T.sample_image(0, (50, 70)).size == (50, 70)
    arr = np.asarray(image).astype(int)
    colors = {tuple(c) for c in arr.reshape(-1, 3)}
    assert len(colors) >= 10  # gradient + shapes, not a flat picture
    same_as_right = (np.abs(np.diff(arr, axis=1)).sum(-1) == 0).mean()
    assert 0.3 < same_as_right < 0.95  # both flat regions and edges


def test_sample_video_frames() -> None:
    frames = T.sample_video(0, num_frames=5, size=(64, 48))
    assert len(frames) == 5 and all(f.size == (64, 48) and f.mode == "RGB" for f in frames)
    arrays = [np.asarray(f) for f in frames]
    for a, b in itertools.pairwise(arrays):
        changed = (a != b).any(-1).mean()
        assert 0.0 < changed < 0.5  # something moves, most of the scene is static


def test_demo_photo() -> None:
    photo = T.demo_photo()
    assert photo.size == (512, 600) and photo.mode == "RGB"
    arr = np.asarray(photo)
    assert arr.std() > 30  # a real picture, not a blank
    model, processor = _pair("llava_onevision")
    x = T.build_inputs("llava_onevision", processor, [{"question": "Who is this?", "images": [photo]}])
    assert _greedy(model, x).shape == (1, 3)


def test_build_inputs_errors() -> None:
    processor = T.tiny_processor("llava")
    with pytest.raises(ValueError, match="at least one sample"):
        T.build_inputs("llava", processor, [])
    with pytest.raises(ValueError, match="unknown family"):
        T.build_inputs("gpt", processor, [{"question": "x"}])
