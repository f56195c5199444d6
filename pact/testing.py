"""Tiny random vision-language models, processors and sample inputs for tests, demos and benchmarks.

Everything here is built in code, offline (no hub access): a byte-level BPE tokenizer trained on a
fixed corpus with the ``tokenizers`` library, the stock Hugging Face processor of each family built
from local parts, and a model of each family with a 4-layer, 64-wide text decoder and a 2-layer
vision tower. The models are random, so their answers are meaningless, but every code path of the
real checkpoints (placeholder expansion, anyres crops, image newlines, M-RoPE, GQA, video) runs.

    from pact import testing
    model, processor = testing.tiny_pair("llava_onevision")
    inputs = testing.build_inputs("llava_onevision", processor,
                                  [{"question": "What is this?", "images": [testing.sample_image()]}])
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)

Families (``FAMILIES``) and their Hugging Face classes (text decoder / vision tower):

- ``qwen2_vl``: Qwen2VLForConditionalGeneration (Qwen2-VL text with M-RoPE / Qwen2-VL ViT, 2x2 merge)
- ``qwen2_5_vl``: Qwen2_5_VLForConditionalGeneration (same text / windowed-attention ViT)
- ``llava_onevision``: LlavaOnevisionForConditionalGeneration (qwen2 / SigLIP, anyres + image_newline)
- ``llava_next``: LlavaNextForConditionalGeneration (llama / CLIP minus [CLS], anyres + image_newline)
- ``llava``: LlavaForConditionalGeneration, LLaVA-1.5 (llama / CLIP minus [CLS], one fixed crop)
- ``internvl``: InternVLForConditionalGeneration, HF-native InternVL3 (qwen2 / InternViT, tiles)
- ``qwen3_vl`` / ``qwen3_vl_moe``: Qwen3VL(Moe)ForConditionalGeneration (Qwen3-VL text with q/k
  norms, interleaved M-RoPE, DeepStack after layers 0-2 / 3-layer Qwen3-VL ViT, 32-px tokens; 20
  tokens for the default image, 2 x 6 for the 4-frame video, one run per frame)
- ``qwen3_5`` / ``qwen3_5_moe``: Qwen3_5(Moe)ForConditionalGeneration (hybrid Gated DeltaNet /
  gated-attention decoder, full attention every 2nd layer / Qwen3.5 ViT, 16-px patches merged 2x2):
  20 visual tokens for ``sample_image()``, 12 for ``sample_video()``

Visual tokens of the default ``sample_image()`` (96 x 64): 20 (Qwen), 70 (LLaVA-OneVision/-NeXT,
of which 6 are image_newline slots), 36 (LLaVA-1.5), 28 (InternVL, 7 tiles of 4); a 4-frame
``sample_video()``: 12 (Qwen), 17 (LLaVA-OneVision), 16 (InternVL).

Tiny models are ~10x faster with ``torch.set_num_threads(1)`` (small ops pay thread wake-ups).

Batching limits (what ``build_inputs`` cannot put in one batch) are listed in ``BATCH_LIMITS``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from pact.models import ADAPTERS

FAMILIES: tuple[str, ...] = tuple(ADAPTERS)
"""The model families the tiny builders cover (keys for every function of this module): every adapter
of ``pact.models.ADAPTERS``, in its order."""

VIDEO_FAMILIES: tuple[str, ...] = tuple(family for family, adapter in ADAPTERS.items() if adapter.has_video)
"""Families whose Hugging Face class and processor accept videos (``has_video`` of the adapter;
LLaVA-NeXT and LLaVA-1.5 do not)."""

# ---------------------------------------------------------------------------------------------------
# Tokenizer

SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<image>",
    "<video>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
)
"""Special tokens of the tiny tokenizer; they get the ids 0..len-1 in this order for every family."""

TOKENIZER_VOCAB_SIZE = 400
"""Target size of the tiny BPE vocabulary (byte alphabet + special tokens + merges)."""

TEXT_VOCAB_SIZE = 512
"""``vocab_size`` of every tiny text decoder (>= the tokenizer's size, like real checkpoints)."""

_CORPUS: tuple[str, ...] = (
    "What is in the image? Describe the picture in one sentence.",
    "Is there a red circle on the left? Answer yes or no.",
    "The photo shows a woman in a uniform standing in front of a flag.",
    "How many squares are there? There are three blue squares and two green triangles.",
    "What color is the sky? The sky is light blue with white clouds.",
    "Describe the video. A ball moves from the left to the right of the frame.",
    "Compare the two images and tell me what changed between them.",
    "Read the text in the image and answer the question about the chart.",
    "A cat sits on a wooden table next to a cup of coffee.",
    "The man is riding a bicycle down a street at night.",
    "Which object is bigger, the yellow one or the black one?",
    "Answer with a single word: dog, cat, car, tree, house, boat or person.",
    "0 1 2 3 4 5 6 7 8 9 10 20 100 first second third left right top bottom middle",
)


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")


def chat_template(family: str | None = None) -> str:
    """A minimal ChatML-style Jinja chat template for ``family``.

    Message content is a string or a list of ``{"type": "text", "text": ...}``, ``{"type": "image"}``
    and ``{"type": "video"}`` items; images and videos become the family's placeholder text, which
    the processor then expands to the right number of visual tokens.
    """
    entry = TINY_FAMILIES.get(family or "")
    image = entry.image_placeholder if entry else "<image>"
    video = (entry.video_placeholder if entry else None) or "<video>"
    return (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}{{ '" + image + "' }}"
        "{%- elif item['type'] == 'video' -%}{{ '" + video + "' }}"
        "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{{ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


@functools.cache
def _trained_tokenizer_json() -> str:
    """Train the byte-level BPE once per process; the JSON is the cache (the trainer is deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS) * 20, trainer)
    trained = tok.get_vocab_size()
    tok.add_special_tokens(list(FAMILY_SPECIAL_TOKENS))
    assert tok.get_vocab_size() == trained + len(FAMILY_SPECIAL_TOKENS)
    return tok.to_str()


@functools.cache
def _trained_vocab_size() -> int:
    """Size of the trained BPE vocabulary before ``FAMILY_SPECIAL_TOKENS`` are appended."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_trained_tokenizer_json()).get_vocab_size() - len(FAMILY_SPECIAL_TOKENS)


def tiny_tokenizer(family: str | None = None) -> Any:
    """A fast tokenizer trained locally: byte-level BPE, ~400 tokens, same ids for every family.

    The special tokens of all families (``SPECIAL_TOKENS``) have fixed ids 0..14; ``<pad>``,
    ``<eos>`` and ``<bos>`` are the pad/eos/bos tokens; padding is on the left. Tokens only some
    families need (``FAMILY_SPECIAL_TOKENS``) follow the trained vocabulary. ``family`` selects the
    chat template and the attributes the family's processor reads (``image_token``, InternVL's
    ``context_image_token`` ...). Returns a new object each call (training is cached).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if family is not None:
        _check_family(family)
    backend = Tokenizer.from_str(_trained_tokenizer_json())
    attributes = (
        TINY_FAMILIES[family].tokenizer_attributes
        if family
        else {"image_token": "<image>", "video_token": "<video>"}
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        padding_side="left",
        chat_template=chat_template(family),
        extra_special_tokens=dict(attributes),
    )


def token_id(token: str) -> int:
    """Id of a token of ``SPECIAL_TOKENS`` or ``FAMILY_SPECIAL_TOKENS`` (the same in every family's
    tokenizer)."""
    if token in SPECIAL_TOKENS:
        return SPECIAL_TOKENS.index(token)
    if token in FAMILY_SPECIAL_TOKENS:
        return _trained_vocab_size() + FAMILY_SPECIAL_TOKENS.index(token)
    raise ValueError(f"{token!r} is not a special token of the tiny tokenizer")


# ---------------------------------------------------------------------------------------------------
# Tiny families: one entry per family
#
# Everything the tiny builders know about a family is its ``TinyFamily`` entry below (config,
# processor, placeholders, tokenizer attributes, batching limits). Adding a family = its adapter in
# ``pact/models`` + one entry here (DESIGN.md, "Adding a model family").

_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": TEXT_VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    # ~1/sqrt(hidden): HF's default 0.02 leaves the residual stream ~ the token embedding, so logits
    # are nearly flat (std 0.16), greedy decoding echoes the last token and barely depends on the
    # image. At this scale logits have unit spread and outputs depend on the whole context.
    "initializer_range": 0.125,
    "bos_token_id": token_id("<bos>"),
    "eos_token_id": token_id("<eos>"),
    "pad_token_id": token_id("<pad>"),
}
"""The tiny text decoder every family shares (its ``model_type`` comes from the family's entry)."""

_NO_LIMIT = "none"
_STACKED_FRAMES = "videos with different frame counts (the stock video processor stacks frames)"


@dataclasses.dataclass(frozen=True)
class TinyFamily:
    """How to build a tiny model, processor and prompts of one family.

    ``config(text, vision_overrides)`` returns the model's ``PretrainedConfig`` given the text
    sub-config dict (``_TEXT_CONFIG`` with the caller's overrides) and the caller's vision overrides;
    ``processor(tokenizer, chat_template)`` the stock processor built from local parts.
    ``image_placeholder`` / ``video_placeholder``: the prompt text of one image / video (the processor
    expands it); ``placeholder_tokens``: the tokens whose positions receive vision features;
    ``tokenizer_attributes``: attributes the stock processor reads from the tokenizer
    (``image_token`` ...); ``special_tokens``: tokens the family needs beyond ``SPECIAL_TOKENS``
    (added after the tokenizer is trained, so existing ids and merges never change);
    ``newline_placeholders``: the placeholder runs also hold the learned ``image_newline`` rows;
    ``batch_limit``: what ``build_inputs`` cannot put in one batch; ``mixes_images_and_videos``:
    False when the stock processor cannot put images and videos in one batch (``build_inputs``
    then refuses, naming ``batch_limit``); ``post_init(model)``: weights the family's own
    initialisation leaves degenerate for a random model, re-drawn after construction (under the
    model's seed).
    """

    config: Callable[[dict[str, Any], Mapping[str, Any] | None], Any]
    processor: Callable[[Any, str], Any]
    image_placeholder: str
    placeholder_tokens: tuple[str, ...]
    tokenizer_attributes: Mapping[str, str]
    video_placeholder: str | None = None
    special_tokens: tuple[str, ...] = ()
    newline_placeholders: bool = False
    batch_limit: str = _NO_LIMIT
    mixes_images_and_videos: bool = True
    post_init: Callable[[Any], None] | None = None


def _merged(base: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    out = dict(base)
    out.update(overrides or {})
    return out


# Qwen2-VL / Qwen2.5-VL: M-RoPE text decoder, 14-px patches merged 2 x 2, 16..64 tokens per image.
_QWEN_MIN_PIXELS = 28 * 28 * 16
_QWEN_MAX_PIXELS = 28 * 28 * 64
_QWEN_IDS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def _mrope_text(text: dict[str, Any]) -> dict[str, Any]:
    """``text`` with M-RoPE sections that follow its head size (unless given).

    M-RoPE splits the rotary half-dimension into (temporal, height, width) sections; real
    checkpoints use 1/4, 3/8, 3/8 of it ([16, 24, 24] for head_dim 128). The sum must be
    head_dim / 2, else the rotary embedding silently has the wrong size.
    """
    if "rope_parameters" in text:
        return text
    half = text.get("head_dim", text["hidden_size"] // text["num_attention_heads"]) // 2
    height = (half - half // 4 + 1) // 2
    section = [half // 4, height, half - half // 4 - height]
    return {
        **text,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
    }


def _qwen_ids() -> dict[str, int]:
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return {name: token_id(token) for name, token in zip(names, _QWEN_IDS, strict=True)}


def _qwen2_vl_config(text: dict[str, Any], vision_overrides: Mapping[str, Any] | None) -> Any:
    import transformers as T

    text = _mrope_text(text)
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": text["hidden_size"], "num_heads": 2}
    return T.Qwen2VLConfig(text_config=text, vision_config=_merged(vision, vision_overrides), **_qwen_ids())


def _qwen2_5_vl_config(text: dict[str, Any], vision_overrides: Mapping[str, Any] | None) -> Any:
    import transformers as T

    text = _mrope_text(text)
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": text["hidden_size"],
        "window_size": 56,
        "fullatt_block_indexes": [1],
    }
    return T.Qwen2_5_VLConfig(
        text_config=text, vision_config=_merged(vision, vision_overrides), **_qwen_ids()
    )


def _qwen_processor(cls_name: str) -> Callable[[Any, str], Any]:
    def build(tokenizer: Any, template: str) -> Any:
        import transformers as T

        image = T.Qwen2VLImageProcessor(
            size={"shortest_edge": _QWEN_MIN_PIXELS, "longest_edge": _QWEN_MAX_PIXELS}
        )
        # cap_pixels_per_frame=True: the qwen-vl-utils (reference) behaviour; also silences a warning.
        video = T.Qwen2VLVideoProcessor(
            size={"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 16}, cap_pixels_per_frame=True
        )
        cls = getattr(T, cls_name)
        return cls(image_processor=image, tokenizer=tokenizer, video_processor=video, chat_template=template)

    return build


_QWEN_ENTRY = {
    "image_placeholder": "<|vision_start|><|image_pad|><|vision_end|>",
    "video_placeholder": "<|vision_start|><|video_pad|><|vision_end|>",
    "placeholder_tokens": ("<|image_pad|>", "<|video_pad|>"),
    "tokenizer_attributes": {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
}

# LLaVA-OneVision / LLaVA-NeXT / InternVL: 56-px crops or tiles (16 patches of 14 px).
_VISION_SIZE = 56
_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112], [56, 168], [168, 56]]


def _llava_onevision_config(text: dict[str, Any], vision_overrides: Mapping[str, Any] | None) -> Any:
    import transformers as T

    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": _VISION_SIZE,
        "patch_size": 14,
    }
    return T.LlavaOnevisionConfig(
        text_config={"model_type": "qwen2", **text},
        vision_config=_merged(vision, vision_overrides),
        image_token_index=token_id("<image>"),
        video_token_index=token_id("<video>"),
        image_grid_pinpoints=_PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )


def _llava_onevision_processor(tokenizer: Any, template: str) -> Any:
    import transformers as T

    return T.LlavaOnevisionProcessor(
        image_processor=T.LlavaOnevisionImageProcessor(
            size={"height": _VISION_SIZE, "width": _VISION_SIZE}, image_grid_pinpoints=_PINPOINTS
        ),
        tokenizer=tokenizer,
        video_processor=T.LlavaOnevisionVideoProcessor(size={"height": _VISION_SIZE, "width": _VISION_SIZE}),
        num_image_tokens=(_VISION_SIZE // 14) ** 2,
        vision_feature_select_strategy="full",
        chat_template=template,
    )


# LLaVA-1.5 has one fixed crop: 6 x 6 patches = 36 tokens.
_LLAVA_SIZE = 84


def _clip_llava_config(size: int) -> dict[str, Any]:
    """The config keyword arguments LLaVA-NeXT and LLaVA-1.5 share (CLIP tower minus [CLS])."""
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": size,
        "patch_size": 14,
        "projection_dim": 32,
    }
    return {
        "vision_config": vision,
        "image_token_index": token_id("<image>"),
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": -2,
        "image_seq_length": (size // 14) ** 2,
    }


def _llava_next_config(text: dict[str, Any], vision_overrides: Mapping[str, Any] | None) -> Any:
    import transformers as T

    common = _clip_llava_config(_VISION_SIZE)
    common["vision_config"] = _merged(common["vision_config"], vision_overrides)
    return T.LlavaNextConfig(
        text_config={"model_type": "llama", **text}, image_grid_pinpoints=_PINPOINTS, **common
    )


def _llava_config(text: dict[str, Any], vision_overrides: Mapping[str, Any] | None) -> Any:
    import transformers as T

    common = _clip_llava_config(_LLAVA_SIZE)
    common["vision_config"] = _merged(common["vision_config"], vision_overrides)
    return T.LlavaConfig(text_config={"model_type": "llama", **text}, **common)


def _clip_llava_processor(cls_name: str, image_processor: Callable[[], Any]) -> Callable[[Any, str], Any]:
    def build(tokenizer: Any, template: str) -> Any:
        import transformers as T

        # CLIP prepends a [CLS] token (num_additional_image_tokens=1) that "default" drops again.
        return getattr(T, cls_name)(
            image_processor=image_processor(),
            tokenizer=tokenizer,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=template,
        )

    return build


def _llava_next_image_processor() -> Any:
    import transformers as T

    return T.LlavaNextImageProcessor(
        size={"shortest_edge": _VISION_SIZE},
        crop_size={"height": _VISION_SIZE, "width": _VISION_SIZE},
        image_grid_pinpoints=_PINPOINTS,
    )


def _llava_image_processor() -> Any:
    import transformers as T

    return T.CLIPImageProcessor(
        size={"shortest_edge": _LLAVA_SIZE}, crop_size={"height": _LLAVA_SIZE, "width": _LLAVA_SIZE}
    )


# InternVL: up to 6 tiles of 56 px (+ thumbnail), pixel shuffle 0.5 -> 4 tokens per tile.
_INTERNVL_MAX_TILES = 6
_INTERNVL_TOKENS_PER_TILE = 4


def _internvl_config(text: dict[str, Any], vision_overrides: Mapping[str, Any] | None) -> Any:
    import transformers as T

    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": [_VISION_SIZE, _VISION_SIZE],
        "patch_size": [14, 14],
    }
    return T.InternVLConfig(
        text_config={"model_type": "qwen2", **text},
        vision_config=_merged(vision, vision_overrides),
        image_token_id=token_id("<IMG_CONTEXT>"),
        image_seq_length=_INTERNVL_TOKENS_PER_TILE,
        downsample_ratio=0.5,
    )


def _internvl_processor(tokenizer: Any, template: str) -> Any:
    import transformers as T

    return T.InternVLProcessor(
        image_processor=T.GotOcr2ImageProcessor(
            size={"height": _VISION_SIZE, "width": _VISION_SIZE},
            crop_to_patches=True,
            min_patches=1,
            max_patches=_INTERNVL_MAX_TILES,
        ),
        tokenizer=tokenizer,
        video_processor=T.InternVLVideoProcessor(size={"height": _VISION_SIZE, "width": _VISION_SIZE}),
        image_seq_length=_INTERNVL_TOKENS_PER_TILE,
        chat_template=template,
    )


# SmolVLM2: 56-px sub-images of 7-px patches, pixel shuffle 2 -> 4 x 4 = 16 tokens per sub-image and
# per global image; images up to 84 px on the longest edge, split into at most 2 x 2 sub-images.
_SMOLVLM_SIZE = 56
_SMOLVLM_PATCH = 7
_SMOLVLM_SCALE = 2
_SMOLVLM_TOKENS = (_SMOLVLM_SIZE // _SMOLVLM_PATCH // _SMOLVLM_SCALE) ** 2
_SMOLVLM_TOKENS_AROUND = (
    "<fake_token_around_image>",
    "<global-img>",
    *(f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2)),
    "<end_of_utterance>",
)


def _smolvlm_config(text: dict[str, Any], vision_overrides: Mapping[str, Any] | None) -> Any:
    import transformers as T

    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": _SMOLVLM_SIZE,
        "patch_size": _SMOLVLM_PATCH,
    }
    return T.SmolVLMConfig(
        text_config={"model_type": "llama", **text},
        vision_config=_merged(vision, vision_overrides),
        image_token_id=token_id("<image>"),
        scale_factor=_SMOLVLM_SCALE,
    )


def _smolvlm_processor(tokenizer: Any, template: str) -> Any:
    import transformers as T

    size = {"longest_edge": _SMOLVLM_SIZE}
    return T.SmolVLMProcessor(
        image_processor=T.SmolVLMImageProcessor(
            size={"longest_edge": _SMOLVLM_SIZE * 3 // 2}, max_image_size=size
        ),
        tokenizer=tokenizer,
        video_processor=T.SmolVLMVideoProcessor(size=size, max_image_size=size),
        image_seq_len=_SMOLVLM_TOKENS,
        chat_template=template,
    )


# GLM-4.1V: Qwen2-VL-like ViT (14-px patches merged 2 x 2 by a convolution), 3-D M-RoPE on the first
# half of each head (partial_rotary_factor 0.5), 16..64 tokens per image like the Qwen tiny models.
_GLM4V_IDS = ("<|image|>", "<|video|>", "<|begin_of_image|>", "<|end_of_image|>")
_GLM4V_IDS += ("<|begin_of_video|>", "<|end_of_video|>")


def _glm4v_config(text: dict[str, Any], vision_overrides: Mapping[str, Any] | None) -> Any:
    import transformers as T

    if "rope_parameters" not in text:
        # M-RoPE sections over the rotary half of the rotary half-head (real: [8, 12, 12] of 32)
        rotary_half = text.get("head_dim", text["hidden_size"] // text["num_attention_heads"]) // 4
        section = _mrope_text({**text, "head_dim": 2 * rotary_half})["rope_parameters"]["mrope_section"]
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        text = {**text, "rope_parameters": {**rope, "mrope_section": section}}
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": text["hidden_size"],
        "image_size": 112,
    }
    names = ("image_token_id", "video_token_id", "image_start_token_id", "image_end_token_id")
    names += ("video_start_token_id", "video_end_token_id")
    ids = {name: token_id(token) for name, token in zip(names, _GLM4V_IDS, strict=True)}
    return T.Glm4vConfig(text_config=text, vision_config=_merged(vision, vision_overrides), **ids)


def _glm4v_processor(tokenizer: Any, template: str) -> Any:
    import transformers as T

    # GLM's smart_resize counts the 2 temporal copies of an image: twice Qwen's pixels, same tokens
    size = {"shortest_edge": 2 * _QWEN_MIN_PIXELS, "longest_edge": 2 * _QWEN_MAX_PIXELS}
    video = {"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 16 * 4}
    return T.Glm4vProcessor(
        image_processor=T.Glm4vImageProcessor(size=size),
        tokenizer=tokenizer,
        # pre-sampled frames (no metadata): GLM4V samples by fps only with metadata
        video_processor=T.Glm4vVideoProcessor(
            size=video, max_image_size={"longest_edge": video["longest_edge"]}, do_sample_frames=False
        ),
        chat_template=template,
    )


# Qwen3-VL: interleaved M-RoPE text decoder with q/k norms, 16-px patches merged 2 x 2 (32 px per
# token, 16..64 tokens per image), and DeepStack: features of vision layers 0, 1, 2 added after text
# layers 0, 1, 2 (three, like the released checkpoints, so a 4-layer decoder has a reduction layer
# before, at and after each injection; hence a 3-layer vision tower).
_QWEN3_VL_MIN_PIXELS = 32 * 32 * 16
_QWEN3_VL_MAX_PIXELS = 32 * 32 * 64


def _qwen3_vl_text(text: dict[str, Any]) -> dict[str, Any]:
    """``text`` with Qwen3-VL's head_dim (its config default is 128) and interleaved M-RoPE sections
    in the released proportions [24, 20, 20] of the rotary half-dimension (h and w take every third
    frequency from 1 and 2, t the rest): [4, 2, 2] for head_dim 16."""
    head_dim = text.get("head_dim", text["hidden_size"] // text["num_attention_heads"])
    half = head_dim // 2
    spatial = max(1, half * 20 // 64)
    rope = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [half - 2 * spatial, spatial, spatial],
    }
    return {"head_dim": head_dim, "rope_parameters": rope, **text}


def _qwen3_vl_vision(text: dict[str, Any], vision_overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    vision = {
        "depth": 3,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 16,
        "out_hidden_size": text["hidden_size"],
        "num_position_embeddings": 256,
        "deepstack_visual_indexes": [0, 1, 2],
    }
    return _merged(vision, vision_overrides)


def _qwen3_vl_config(text: dict[str, Any], vision_overrides: Mapping[str, Any] | None) -> Any:
    import transformers as T

    return T.Qwen3VLConfig(
        text_config=_qwen3_vl_text(text),
        vision_config=_qwen3_vl_vision(text, vision_overrides),
        **_qwen_ids(),
    )


def _qwen3_vl_moe_config(text: dict[str, Any], vision_overrides: Mapping[str, Any] | None) -> Any:
    """Qwen3-VL-MoE: the same, with every decoder MLP a mixture of 4 experts (2 per token)."""
    import transformers as T

    moe = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "decoder_sparse_step": 1}
    return T.Qwen3VLMoeConfig(
        text_config={**moe, **_qwen3_vl_text(text)},
        vision_config=_qwen3_vl_vision(text, vision_overrides),
        **_qwen_ids(),
    )


def _qwen3_vl_processor(tokenizer: Any, template: str) -> Any:
    import transformers as T

    image = T.Qwen2VLImageProcessor(
        size={"shortest_edge": _QWEN3_VL_MIN_PIXELS, "longest_edge": _QWEN3_VL_MAX_PIXELS},
        patch_size=16,
        merge_size=2,
    )
    # frames are given already sampled (no file, no fps): keep them all, as the Qwen2-VL entries do;
    # a 4-frame sample_video() gives 2 temporal steps of 2 x 3 tokens
    video = T.Qwen3VLVideoProcessor(
        size={"shortest_edge": 32 * 32 * 8, "longest_edge": 32 * 32 * 32},
        cap_pixels_per_frame=True,
        do_sample_frames=False,
    )
    return T.Qwen3VLProcessor(
        image_processor=image, tokenizer=tokenizer, video_processor=video, chat_template=template
    )


# Qwen3.5: hybrid decoder (Gated DeltaNet linear-attention layers and gated full-attention layers
# with per-head q/k norms), interleaved M-RoPE on a partial rotary dimension, 16-px patches merged
# 2 x 2 (32 px per visual token), 16..64 tokens per image; videos are frames, each its own
# <|vision_start|> ... <|vision_end|> run after a "<t seconds>" timestamp (Qwen3VLProcessor).
_QWEN3_5_MIN_PIXELS = 32 * 32 * 16
_QWEN3_5_MAX_PIXELS = 32 * 32 * 64


def _qwen3_5_text(text: dict[str, Any]) -> dict[str, Any]:
    """The shared tiny decoder as a Qwen3.5 text config: RoPE on half of each head (real
    checkpoints: a quarter, 64 of 256 dims) with interleaved M-RoPE sections that follow the rotary
    size ([2, 1, 1] for head_dim 16; real: [11, 11, 10]), small Gated DeltaNet heads, and full
    attention every 2nd layer (real checkpoints: every 4th), so that even 4 tiny layers hold both
    kinds twice: a reduction at a linear or a full-attention layer, followed by both kinds."""
    head_dim = text.get("head_dim", text["hidden_size"] // text["num_attention_heads"])
    half = head_dim // 4  # half of the rotary dims (partial_rotary_factor 0.5)
    t_section = -(-half // 3)
    h_section = -(-(half - t_section) // 2)
    out = {
        "head_dim": head_dim,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [t_section, h_section, half - t_section - h_section],
            "mrope_interleaved": True,
            "partial_rotary_factor": 0.5,
        },
        **text,
    }
    if "layer_types" not in out:
        n = int(out["num_hidden_layers"])
        out["layer_types"] = ["full_attention" if i % 2 else "linear_attention" for i in range(n)]
    return out


def _qwen3_5_vision(text: dict[str, Any], vision_overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": text["hidden_size"],
        "patch_size": 16,
        "num_position_embeddings": 64,
    }
    return _merged(vision, vision_overrides)


def _qwen3_5_config(text: dict[str, Any], vision_overrides: Mapping[str, Any] | None) -> Any:
    import transformers as T

    text = _qwen3_5_text(text)
    return T.Qwen3_5Config(
        text_config=text, vision_config=_qwen3_5_vision(text, vision_overrides), **_qwen_ids()
    )


def _qwen3_5_moe_config(text: dict[str, Any], vision_overrides: Mapping[str, Any] | None) -> Any:
    """Qwen3.5-MoE: the Qwen3.5 tiny model with 4 experts (top 2) and a shared expert per layer."""
    import transformers as T

    moe = {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
    }
    text = _qwen3_5_text({**moe, **text})
    return T.Qwen3_5MoeConfig(
        text_config=text, vision_config=_qwen3_5_vision(text, vision_overrides), **_qwen_ids()
    )


def _qwen3_5_processor(tokenizer: Any, template: str) -> Any:
    import transformers as T

    image = T.Qwen2VLImageProcessor(
        size={"shortest_edge": _QWEN3_5_MIN_PIXELS, "longest_edge": _QWEN3_5_MAX_PIXELS},
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
    )
    video = T.Qwen3VLVideoProcessor(  # sample_video(): 2 x 3 tokens per frame pair, as Qwen2-VL's
        size={"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 32},
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        cap_pixels_per_frame=True,
    )
    return T.Qwen3VLProcessor(
        image_processor=image, tokenizer=tokenizer, video_processor=video, chat_template=template
    )


# Gemma 3: a SigLIP tower (7-px patches, 8 x 8 per 56-px image) average-pooled 2 x 2 into 16 soft
# tokens per image, and a decoder that alternates sliding-window (window 24: one image fits, like
# 256 tokens in the released 1024) and global layers, each kind with its own RoPE table.
_GEMMA3_SIZE = 56
_GEMMA3_TOKENS = 16
_GEMMA3_WINDOW = 24
_GEMMA3_IDS = ("<image_soft_token>", "<start_of_image>", "<end_of_image>")


def _gemma3_config(text: dict[str, Any], vision_overrides: Mapping[str, Any] | None) -> Any:
    import transformers as T

    head_dim = text.get("head_dim", text["hidden_size"] // text["num_attention_heads"])
    kinds = ("sliding_attention", "full_attention")
    gemma = {
        "head_dim": head_dim,
        "query_pre_attn_scalar": head_dim,  # the 4B/12B checkpoints' scale: 1/sqrt(head_dim)
        "sliding_window": _GEMMA3_WINDOW,
        "layer_types": [kinds[i % 2] for i in range(text["num_hidden_layers"])],
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": _GEMMA3_SIZE,
        "patch_size": 7,
    }
    names = ("image_token_id", "boi_token_id", "eoi_token_id")
    ids = {name: token_id(token) for name, token in zip(names, _GEMMA3_IDS, strict=True)}
    return T.Gemma3Config(
        text_config={**gemma, **text},
        vision_config=_merged(vision, vision_overrides),
        mm_tokens_per_image=_GEMMA3_TOKENS,
        # the released models tie the output matrix to the (sqrt(hidden)-scaled) embeddings; a random
        # tied model only echoes its last input token, so the tiny one has its own output matrix
        tie_word_embeddings=False,
        initializer_range=text["initializer_range"],  # the output matrix's, as the text decoder's
        **ids,
    )


def _gemma3_post_init(model: Any) -> None:
    """Gemma's RMSNorms scale by (1 + weight) with weight initialised to 0. Per-head q/k norms would
    give all keys one norm (norm-based choices, DART's pivots, become rounding ties), and the four
    sandwich norms of every layer make each layer's output one unit-scale direction that greedy
    decoding repeats whatever the input; the decoder's norms get random weights, as a trained
    model's have. The projection matrix (initialised to zeros, 0.02 after ``_reinit_zero_weights``)
    gets unit-variance outputs, so images weigh as much as text in the residual stream (Gemma scales
    the text embeddings by sqrt(hidden))."""
    for name, param in model.named_parameters():
        if "language_model" in name and name.endswith(("layernorm.weight", "q_norm.weight", "k_norm.weight")):
            param.normal_(0.0, 0.5)
        if name.endswith("mm_input_projection_weight"):
            param.normal_(0.0, param.shape[0] ** -0.5)


def _gemma3_processor(tokenizer: Any, template: str) -> Any:
    import transformers as T

    image = T.Gemma3ImageProcessor(
        size={"height": _GEMMA3_SIZE, "width": _GEMMA3_SIZE},
        # pan-and-scan (off by default, as in the released preprocessor configs) at the tiny scale
        pan_and_scan_min_crop_size=_GEMMA3_SIZE // 2,
    )
    return T.Gemma3Processor(
        image_processor=image, tokenizer=tokenizer, chat_template=template, image_seq_length=_GEMMA3_TOKENS
    )


# the processor wraps every frame in <|vision_start|> ... <|vision_end|> after its timestamp
_QWEN3_5_ENTRY = {**_QWEN_ENTRY, "video_placeholder": "<|video_pad|>"}


TINY_FAMILIES: dict[str, TinyFamily] = {
    "qwen2_vl": TinyFamily(
        config=_qwen2_vl_config, processor=_qwen_processor("Qwen2VLProcessor"), **_QWEN_ENTRY
    ),
    "qwen2_5_vl": TinyFamily(
        config=_qwen2_5_vl_config, processor=_qwen_processor("Qwen2_5_VLProcessor"), **_QWEN_ENTRY
    ),
    "llava_onevision": TinyFamily(
        config=_llava_onevision_config,
        processor=_llava_onevision_processor,
        image_placeholder="<image>",
        video_placeholder="<video>",
        placeholder_tokens=("<image>", "<video>"),
        tokenizer_attributes={"image_token": "<image>", "video_token": "<video>"},
        newline_placeholders=True,
        batch_limit=_STACKED_FRAMES,
    ),
    "llava_next": TinyFamily(
        config=_llava_next_config,
        processor=_clip_llava_processor("LlavaNextProcessor", _llava_next_image_processor),
        image_placeholder="<image>",
        placeholder_tokens=("<image>",),
        tokenizer_attributes={"image_token": "<image>"},
        newline_placeholders=True,
        batch_limit=_NO_LIMIT + " (no video support)",
    ),
    "llava": TinyFamily(
        config=_llava_config,
        processor=_clip_llava_processor("LlavaProcessor", _llava_image_processor),
        image_placeholder="<image>",
        placeholder_tokens=("<image>",),
        tokenizer_attributes={"image_token": "<image>"},
        batch_limit=_NO_LIMIT + " (no video support)",
    ),
    "internvl": TinyFamily(
        config=_internvl_config,
        processor=_internvl_processor,
        image_placeholder="<IMG_CONTEXT>",
        video_placeholder="<video>",
        placeholder_tokens=("<IMG_CONTEXT>",),  # InternVL videos are frames of <IMG_CONTEXT> tokens too
        tokenizer_attributes={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        batch_limit=_STACKED_FRAMES,
    ),
    "qwen3_vl": TinyFamily(config=_qwen3_vl_config, processor=_qwen3_vl_processor, **_QWEN_ENTRY),
    "qwen3_vl_moe": TinyFamily(config=_qwen3_vl_moe_config, processor=_qwen3_vl_processor, **_QWEN_ENTRY),
    "smolvlm": TinyFamily(
        config=_smolvlm_config,
        processor=_smolvlm_processor,
        image_placeholder="<image>",
        video_placeholder="<video>",
        placeholder_tokens=("<image>",),  # video frames are <image> tokens too
        tokenizer_attributes={
            "image_token": "<image>",
            "video_token": "<video>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
        special_tokens=_SMOLVLM_TOKENS_AROUND,
        batch_limit="images and videos in one batch (the stock processor returns both as pixel_values: "
        "the videos' replace the images')",
        mixes_images_and_videos=False,
    ),
    "glm4v": TinyFamily(
        config=_glm4v_config,
        processor=_glm4v_processor,
        image_placeholder="<|begin_of_image|><|image|><|end_of_image|>",
        video_placeholder="<|begin_of_video|><|video|><|end_of_video|>",
        placeholder_tokens=("<|image|>",),  # video frames are <|image|> tokens too
        tokenizer_attributes={"image_token": "<|image|>", "video_token": "<|video|>"},
        special_tokens=_GLM4V_IDS,
        batch_limit="images and videos in one batch (the stock model scatters image features into the "
        "image token positions of videos too: both use the <|image|> id)",
        mixes_images_and_videos=False,
    ),
    "qwen3_5": TinyFamily(config=_qwen3_5_config, processor=_qwen3_5_processor, **_QWEN3_5_ENTRY),
    "qwen3_5_moe": TinyFamily(config=_qwen3_5_moe_config, processor=_qwen3_5_processor, **_QWEN3_5_ENTRY),
    "gemma3": TinyFamily(
        config=_gemma3_config,
        processor=_gemma3_processor,
        image_placeholder="<start_of_image>",
        placeholder_tokens=("<image_soft_token>",),
        tokenizer_attributes={
            "image_token": "<image_soft_token>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
        },
        special_tokens=_GEMMA3_IDS,
        batch_limit=_NO_LIMIT + " (no video support)",
        post_init=_gemma3_post_init,
    ),
}
"""family -> its ``TinyFamily`` entry; must cover every adapter of ``pact.models.ADAPTERS``."""

_missing = [family for family in FAMILIES if family not in TINY_FAMILIES]
if _missing:
    raise ImportError(f"pact.testing: no TinyFamily entry for the adapter families {', '.join(_missing)}")

BATCH_LIMITS: dict[str, str] = {family: TINY_FAMILIES[family].batch_limit for family in FAMILIES}
"""Per family, the sample mixes ``build_inputs`` cannot put in one batch (measured on transformers
5.23). Everything else batches: text-only next to image samples, one image next to several images
of different sizes, image next to video samples, image and video in one sample."""

FAMILY_SPECIAL_TOKENS: tuple[str, ...] = tuple(
    dict.fromkeys(token for family in FAMILIES for token in TINY_FAMILIES[family].special_tokens)
)
"""Tokens some family needs beyond ``SPECIAL_TOKENS``, in family order; every tiny tokenizer has them
all, added after training (ids right after the trained vocabulary, the same for every family)."""


def tiny_config(
    family: str,
    *,
    num_hidden_layers: int = 4,
    text_overrides: Mapping[str, Any] | None = None,
    vision_overrides: Mapping[str, Any] | None = None,
) -> Any:
    """The ``PretrainedConfig`` of a tiny ``family`` model (see ``tiny_model`` for the shapes).

    ``text_overrides`` / ``vision_overrides`` update the text / vision sub-config dicts (e.g.
    ``{"hidden_size": 128}``); for the Qwen families the M-RoPE sections follow the final head size.
    """
    _check_family(family)
    text = _merged({**_TEXT_CONFIG, "num_hidden_layers": num_hidden_layers}, text_overrides)
    return TINY_FAMILIES[family].config(text, vision_overrides)


_MODEL_CLASSES: dict[str, str] = {family: adapter.class_names[0] for family, adapter in ADAPTERS.items()}
"""family -> its ``*ForConditionalGeneration`` class name (the adapter's first class name)."""


def model_class(family: str) -> type:
    """The Hugging Face ``...ForConditionalGeneration`` class of ``family``."""
    import transformers

    _check_family(family)
    return getattr(transformers, _MODEL_CLASSES[family])


def _reinit_zero_weights(model: torch.nn.Module, std: float = 0.02) -> None:
    """Give all-zero matrices/embeddings (e.g. InternViT's position embeddings and CLS token, which HF
    initialises to zeros for fine-tuning from a checkpoint) small random values, so that no part of a
    random model is degenerate. Biases and norms (1-D) are left as initialised."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and param.is_floating_point() and not param.any():
                param.normal_(0.0, std)


def _initialise(model: torch.nn.Module, family: str) -> None:
    """Re-draw what a random ``family`` model would otherwise have degenerate (zero matrices, and the
    family's ``post_init``); call under the model's seeded RNG."""
    _reinit_zero_weights(model)
    post_init = TINY_FAMILIES[family].post_init
    if post_init is not None:
        with torch.no_grad():
            post_init(model)


def tiny_model(
    family: str,
    *,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    num_hidden_layers: int = 4,
    dtype: torch.dtype = torch.float32,
    text_overrides: Mapping[str, Any] | None = None,
    vision_overrides: Mapping[str, Any] | None = None,
) -> Any:
    """A tiny random ``family`` model in eval mode, with deterministic weights for a given ``seed``.

    Text decoder: vocab 512, hidden 64, ``num_hidden_layers`` layers, 4 query heads, 2 KV heads
    (GQA), head_dim 16, MLP 128. Vision tower: 2 layers, width 32. The global torch RNG is seeded
    with ``seed`` before construction and restored afterwards.
    """
    config = tiny_config(
        family,
        num_hidden_layers=num_hidden_layers,
        text_overrides=text_overrides,
        vision_overrides=vision_overrides,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(family)._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
        _initialise(model, family)
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = (token_id(t) for t in ("<pad>", "<eos>", "<bos>"))
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# Processors


@functools.cache
def _cached_processor(family: str) -> Any:
    return TINY_FAMILIES[family].processor(tiny_tokenizer(family), chat_template(family))


def tiny_processor(family: str) -> Any:
    """The stock Hugging Face processor of ``family`` built from local parts, with a chat template.

    Image sizes are small: Qwen images are resized to 16..64 merged tokens; LLaVA-OneVision/-NeXT
    use 56-px crops (16 tokens each) with anyres grids up to 112 x 112 / 56 x 168; LLaVA-1.5 one
    84-px crop (36 tokens); InternVL up to 6 tiles of 56 px (+ thumbnail), 4 tokens per tile. The
    default ``sample_image()`` gives 20 / 70 / 70 / 36 / 28 visual tokens, the 512 x 600
    ``demo_photo()`` 56 / 72 / 72 / 36 / 20. Families in ``VIDEO_FAMILIES`` also get their stock
    video processor. Returns a fresh copy each call (construction is cached).
    """
    _check_family(family)
    return copy.deepcopy(_cached_processor(family))


def tiny_pair(family: str, **model_kwargs: Any) -> tuple[Any, Any]:
    """``(tiny_model(family, **model_kwargs), tiny_processor(family))``."""
    return tiny_model(family, **model_kwargs), tiny_processor(family)


# ---------------------------------------------------------------------------------------------------
# Images and videos


def _palette(rng: np.random.Generator, n: int) -> list[tuple[int, int, int]]:
    """``n`` saturated, well-separated colors (random hue offset, evenly spaced hues)."""
    import colorsys

    offset = rng.random()
    colors = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb(
            (offset + i / n) % 1.0, 0.55 + 0.4 * rng.random(), 0.6 + 0.4 * rng.random()
        )
        colors.append((int(r * 255), int(g * 255), int(b * 255)))
    return colors


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Sky-like vertical gradient above a flat "ground" band, with a striped texture patch."""
    top, bottom, ground, stripe = _palette(rng, 4)
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    sky = (1 - t) * np.array(top, np.float32) + t * np.array(bottom, np.float32)
    arr = np.broadcast_to(sky, (height, width, 3)).copy()
    horizon = int(height * (0.55 + 0.2 * rng.random()))
    arr[horizon:] = ground
    # High-frequency texture: vertical stripes in one corner of the ground.
    x0 = int(rng.integers(0, max(1, width // 2)))
    x1 = min(width, x0 + max(4, width // 4))
    cols = np.arange(x0, x1)
    arr[horizon:, cols[(cols // 2) % 2 == 0]] = stripe
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def _draw_shapes(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int, count: int
) -> None:
    """Flat-colored rectangles, ellipses and triangles with dark outlines (sharp edges)."""
    for color, kind in zip(_palette(rng, count), rng.integers(0, 3, count), strict=True):
        w = int(width * (0.15 + 0.25 * rng.random()))
        h = int(height * (0.15 + 0.25 * rng.random()))
        x = int(rng.integers(0, max(1, width - w)))
        y = int(rng.integers(0, max(1, height - h)))
        box = (x, y, x + w, y + h)
        if kind == 0:
            draw.rectangle(box, fill=color, outline=(20, 20, 20))
        elif kind == 1:
            draw.ellipse(box, fill=color, outline=(20, 20, 20))
        else:
            draw.polygon([(x, y + h), (x + w // 2, y), (x + w, y + h)], fill=color, outline=(20, 20, 20))


def sample_image(seed: int = 0, size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A deterministic synthetic RGB scene of ``size = (width, height)`` pixels.

    It has what token clustering needs to find: a smooth gradient (sky), a flat region (ground),
    a striped texture, 3-5 flat shapes with sharp outlines and a thin diagonal line. Different seeds
    give different colors and layouts; the same seed always gives the same pixels.
    """
    width, height = size
    rng = np.random.default_rng(seed)
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    _draw_shapes(draw, rng, width, height, int(rng.integers(3, 6)))
    draw.line([(0, height - 1), (width - 1, 0)], fill=(250, 250, 250), width=1)
    return image


def sample_video(seed: int = 0, num_frames: int = 4, size: tuple[int, int] = (96, 64)) -> list[Image.Image]:
    """``num_frames`` deterministic RGB frames of ``size = (width, height)``: a static scene in which
    two shapes move (one left to right, one top to bottom), so consecutive frames are largely redundant.

    This list-of-PIL-frames form is what every video processor here accepts for one video.
    """
    width, height = size
    rng = np.random.default_rng(seed)
    scene = _background(rng, width, height)
    ImageDraw.Draw(scene).line([(0, height - 1), (width - 1, 0)], fill=(250, 250, 250), width=1)
    ball, box = _palette(rng, 2)
    radius = max(3, min(width, height) // 8)
    frames = []
    for i in range(num_frames):
        t = i / max(1, num_frames - 1)
        frame = scene.copy()
        draw = ImageDraw.Draw(frame)
        cx = int(radius + t * (width - 2 * radius))
        draw.ellipse((cx - radius, height // 3 - radius, cx + radius, height // 3 + radius), fill=ball)
        cy = int(t * (height - 2 * radius))
        draw.rectangle((width - 3 * radius, cy, width - radius, cy + 2 * radius), fill=box, outline=(0, 0, 0))
        frames.append(frame)
    return frames


def demo_photo() -> Image.Image:
    """A real photograph shipped with the package: Grace Hopper (US Navy, public domain), 512 x 600.

    See ``pact/assets/README.md`` for provenance. Returned as a fully loaded RGB PIL image.
    """
    asset = resources.files("pact") / "assets" / "grace_hopper.jpg"
    with resources.as_file(asset) as path, Image.open(path) as im:
        return im.convert("RGB")


# ---------------------------------------------------------------------------------------------------
# Inputs


def prompt_messages(sample: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The one-turn chat (``[{"role": "user", "content": [...]}]``) for a sample dict:
    its images, then its videos, then the question text."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in sample.get("images") or ()]
    content += [{"type": "video"} for _ in sample.get("videos") or ()]
    content.append({"type": "text", "text": sample.get("question", "")})
    return [{"role": "user", "content": content}]


def build_inputs(
    family: str,
    processor: Any,
    samples: Sequence[Mapping[str, Any]],
    *,
    padding_side: str = "left",
    add_generation_prompt: bool = True,
) -> Any:
    """Tokenize a batch of samples with the family's processor; the result feeds ``model(**x)`` and
    ``model.generate(**x)``.

    Each sample is ``{"question": str, "images": [PIL, ...], "videos": [[PIL frame, ...], ...]}``
    (images and videos optional). The chat template puts each image/video placeholder before the
    question; the processor expands placeholders to the right number of visual tokens and pads the
    batch on ``padding_side``. Returns a ``BatchFeature`` of torch tensors (Qwen families include
    ``mm_token_type_ids``; LLaVA-OneVision ``batch_num_images``).
    """
    _check_family(family)
    if not samples:
        raise ValueError("build_inputs needs at least one sample")
    videos = [list(v) for s in samples for v in s.get("videos") or ()]
    if videos and family not in VIDEO_FAMILIES:
        raise ValueError(f"{family} does not accept videos (video families: {', '.join(VIDEO_FAMILIES)})")
    if videos and any(s.get("images") for s in samples) and not TINY_FAMILIES[family].mixes_images_and_videos:
        raise ValueError(f"{family} cannot batch {TINY_FAMILIES[family].batch_limit}; build separate batches")
    texts = [
        processor.apply_chat_template(
            prompt_messages(s), tokenize=False, add_generation_prompt=add_generation_prompt
        )
        for s in samples
    ]
    kwargs: dict[str, Any] = {}
    images = [list(s.get("images") or ()) for s in samples]
    if any(images):
        # Nested per sample: LLaVA-OneVision derives batch_num_images (multi-image mode) from it.
        kwargs["images"] = images
    if videos:
        kwargs["videos"] = videos
    return processor(text=texts, padding=True, padding_side=padding_side, return_tensors="pt", **kwargs)


def placeholder_token_ids(family: str) -> set[int]:
    """Token ids whose positions receive vision features in ``family`` (image and video placeholders)."""
    _check_family(family)
    return {token_id(token) for token in TINY_FAMILIES[family].placeholder_tokens}


def placeholder_mask(family: str, inputs: Mapping[str, Any]) -> torch.Tensor:
    """Bool ``(B, T)``: positions of ``inputs["input_ids"]`` that hold image/video placeholder tokens."""
    ids = inputs["input_ids"]
    return torch.isin(ids, torch.tensor(sorted(placeholder_token_ids(family)), device=ids.device))


def expected_visual_count(family: str, inputs: Mapping[str, Any], *, per_sample: bool = False) -> Any:
    """Number of image/video placeholder tokens in ``inputs`` (an int, or a list per sample).

    The model's vision side must produce exactly this many embeddings (its forward raises
    otherwise). For LLaVA-OneVision/-NeXT the count includes the ``image_newline`` slots, which
    share the ``<image>``/``<video>`` id (see ``patch_token_mask``).
    """
    counts = placeholder_mask(family, inputs).sum(dim=1)
    return counts.tolist() if per_sample else int(counts.sum())


# ---------------------------------------------------------------------------------------------------
# Model-side facts (test oracles)


def family_of(model: Any) -> str:
    """The family name of a model built by this module (or a real checkpoint of the same class)."""
    name = type(model).__name__
    for family, cls_name in _MODEL_CLASSES.items():
        if name == cls_name:
            return family
    raise ValueError(f"{name} is not one of the supported classes: {', '.join(_MODEL_CLASSES.values())}")


@torch.no_grad()
def patch_token_mask(model: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
    """Bool ``(B, T)``: placeholder positions that receive a vision-encoder patch feature.

    It differs from ``placeholder_mask`` only for LLaVA-OneVision/-NeXT, whose placeholder runs also
    hold copies of the learned ``image_newline`` vector (same token id as the patches). This oracle
    asks the model itself: it runs the vision side and marks the rows equal to ``image_newline``,
    so it is independent of any token-layout arithmetic it is used to test.
    """
    family = family_of(model)
    mask = placeholder_mask(family, inputs)
    if not TINY_FAMILIES[family].newline_placeholders:
        return mask
    core = model.model
    ids = inputs["input_ids"]
    newline = core.image_newline
    if inputs.get("pixel_values") is not None:
        kwargs = {"image_sizes": inputs["image_sizes"]}
        if family == "llava_onevision" and inputs.get("batch_num_images") is not None:
            kwargs["batch_num_images"] = inputs["batch_num_images"]
        features = torch.cat(list(core.get_image_features(inputs["pixel_values"], **kwargs).pooler_output))
        mask[ids == model.config.image_token_id] = ~(features == newline.to(features)).all(-1)
    if inputs.get("pixel_values_videos") is not None:
        features = core.get_video_features(inputs["pixel_values_videos"]).pooler_output.flatten(0, 1)
        mask[ids == model.config.video_token_id] = ~(features == newline.to(features)).all(-1)
    return mask


# ---------------------------------------------------------------------------------------------------
# Saving


def save_tiny(family: str, path: str | Path, **model_kwargs: Any) -> Path:
    """Save a tiny ``family`` model and its processor (tokenizer, image/video processors, chat
    template) to ``path`` so that ``AutoModelForImageTextToText.from_pretrained(path)`` and
    ``AutoProcessor.from_pretrained(path)`` load them offline. ``model_kwargs`` go to
    ``tiny_model``. Returns ``Path(path)``."""
    model, processor = tiny_pair(family, **model_kwargs)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------
# What a decoder layer's attention really receives (the q/k contract of the adapters)

_CAPTURE_IMPL = "pact_capture_qk"


def attention_qk(
    model: Any, inputs: Mapping[str, Any], layer_index: int, adapter: Any = None
) -> dict[str, torch.Tensor]:
    """Run one forward of ``model`` on ``inputs`` (no reduction) and return what decoder layer
    ``layer_index`` received and what its attention function was given:

        hidden: (B, T, D) hidden states entering the layer (before its input norm);
        cos, sin: (B, T, head_dim) the rotary tables passed to the layer;
        queries: (B, H, T, d), keys: (B, H_kv, T, d) exactly as the attention function received
            them (after q/k norms and RoPE).

    The attention function is a stock SDPA call under a test-only implementation name that records
    its arguments; the model's configs are switched back afterwards (the model is not changed).
    This is the ground truth that ``ModelAdapter.queries_keys`` must reproduce. ``adapter``: the
    adapter to find the layers with (default: ``pact.models.get_adapter(model)``).

    A linear-attention layer (Qwen3.5's Gated DeltaNet, ``layer.linear_attn``) has no attention
    function: its queries/keys are those its chunked delta-rule kernel received, L2-normalised per
    head as the kernel does (``use_qk_l2norm_in_kernel``), as (B, H, T, d).
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    from pact import attention_backend
    from pact.models import get_adapter

    adapter = adapter if adapter is not None else get_adapter(model)
    layer = adapter.layers[layer_index]
    seen: dict[str, torch.Tensor] = {}

    def capture(module: Any, query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if module is layer.self_attn:
            seen["queries"], seen["keys"] = query.detach().clone(), key.detach().clone()
        return sdpa_attention_forward(module, query, key, *args, **kwargs)

    def grab_inputs(module: Any, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]  # (1 or B, T, d): 1-D RoPE shares one table
        B = hidden.shape[0]
        seen["hidden"] = hidden.detach().clone()
        seen["cos"], seen["sin"] = cos.detach().expand(B, -1, -1), sin.detach().expand(B, -1, -1)

    if hasattr(layer, "linear_attn"):
        return _linear_attention_qk(model, inputs, layer, grab_inputs, seen)
    AttentionInterface.register(_CAPTURE_IMPL, capture)
    if _CAPTURE_IMPL not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(_CAPTURE_IMPL, sdpa_mask)
    configs = attention_backend.attention_configs(adapter)
    before = [cfg._attn_implementation for cfg in configs]
    handle = layer.register_forward_pre_hook(grab_inputs, with_kwargs=True)
    try:
        for cfg in configs:
            cfg._attn_implementation = {"": _CAPTURE_IMPL}
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
        for cfg, impl in zip(configs, before, strict=True):
            cfg._attn_implementation = {"": impl}
    if "queries" not in seen:
        raise RuntimeError(f"decoder layer {layer_index}'s attention was not called through the interface")
    return seen


def _linear_attention_qk(
    model: Any, inputs: Mapping[str, Any], layer: Any, grab_inputs: Callable, seen: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``attention_qk`` of a Gated DeltaNet layer: records the q/k its chunked kernel receives (the
    module's ``torch_chunk_gated_delta_rule``, patched for this one forward)."""
    import sys

    module = sys.modules[type(layer.linear_attn).__module__]
    kernel = module.torch_chunk_gated_delta_rule

    def record(query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("use_qk_l2norm_in_kernel"):
            query = module.l2norm(query.float(), dim=-1, eps=1e-6).to(query.dtype)
            key = module.l2norm(key.float(), dim=-1, eps=1e-6).to(key.dtype)
        seen["queries"] = query.detach().transpose(1, 2).clone()  # (B, T, H, d) -> (B, H, T, d)
        seen["keys"] = key.detach().transpose(1, 2).clone()
        return kernel(query, key, *args, **kwargs)

    def only_this_layer(*args: Any, **kwargs: Any) -> Any:
        return (record if active[0] else kernel)(*args, **kwargs)

    active = [False]

    def on(*_: Any) -> None:
        active[0] = True

    def off(*_: Any) -> None:
        active[0] = False

    handles = [
        layer.register_forward_pre_hook(grab_inputs, with_kwargs=True),
        layer.linear_attn.register_forward_pre_hook(on),
        layer.linear_attn.register_forward_hook(off),
    ]
    module.torch_chunk_gated_delta_rule = only_this_layer
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        module.torch_chunk_gated_delta_rule = kernel
        for h in handles:
            h.remove()
    if "queries" not in seen:
        raise RuntimeError("the linear-attention layer's chunked kernel was not called")
    return seen


# ---------------------------------------------------------------------------------------------------
# Real-size processors and random models of any size (benchmarks without weights)

CHECKPOINT_PINPOINTS: list[list[int]] = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
"""``image_grid_pinpoints`` of the released LLaVA-OneVision checkpoints (anyres_max_9): every grid of
1..6 x 1..6 crops of 384 px."""

QWEN2_VL_MIN_PIXELS = 56 * 56
QWEN2_VL_MAX_PIXELS = 28 * 28 * 16384
"""``min_pixels`` / ``max_pixels`` of the released Qwen2-VL-Instruct processors (3136 / 12845056)."""

CHECKPOINT_PROCESSOR_FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "llava_onevision")
"""Families ``checkpoint_processor`` covers."""


def checkpoint_processor(family: str) -> Any:
    """The stock processor of ``family`` with the image settings of the released checkpoints, so that
    an image gets the visual-token count the real model gives it; the tokenizer is the tiny one
    (its ids fit any vocabulary) and the placeholder ids are those of ``tiny_config``.

    - ``llava_onevision`` (llava-hf/llava-onevision-qwen2-{0.5b,7b}-ov-hf): 384 x 384 SigLIP crops
      (27 x 27 = 729 tokens each), ``CHECKPOINT_PINPOINTS``, anyres_max_9, SigLIP mean/std 0.5.
    - ``qwen2_vl`` / ``qwen2_5_vl`` (Qwen/Qwen2-VL-*-Instruct, Qwen/Qwen2.5-VL-*-Instruct): 14-px
      patches merged 2 x 2, ``QWEN2_VL_MIN_PIXELS`` .. ``QWEN2_VL_MAX_PIXELS``.

    The model must have the matching vision shape (``image_size`` 384 and the pinpoints in its config
    for LLaVA-OneVision); the tiny models do not.
    """
    import transformers as T

    if family not in CHECKPOINT_PROCESSOR_FAMILIES:
        raise ValueError(
            f"checkpoint_processor: family {family!r} is not covered; expected one of "
            f"{', '.join(CHECKPOINT_PROCESSOR_FAMILIES)}"
        )
    tok = tiny_tokenizer(family)
    template = chat_template(family)
    if family == "llava_onevision":
        image = T.LlavaOnevisionImageProcessor(
            size={"height": 384, "width": 384},
            image_grid_pinpoints=CHECKPOINT_PINPOINTS,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
        video = T.LlavaOnevisionVideoProcessor(size={"height": 384, "width": 384})
        return T.LlavaOnevisionProcessor(
            image_processor=image,
            tokenizer=tok,
            video_processor=video,
            num_image_tokens=(384 // 14) ** 2,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
            chat_template=template,
        )
    size = {"shortest_edge": QWEN2_VL_MIN_PIXELS, "longest_edge": QWEN2_VL_MAX_PIXELS}
    image = T.Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    video = T.Qwen2VLVideoProcessor(cap_pixels_per_frame=True)
    cls = T.Qwen2VLProcessor if family == "qwen2_vl" else T.Qwen2_5_VLProcessor
    return cls(image_processor=image, tokenizer=tok, video_processor=video, chat_template=template)


def random_model(
    family: str,
    config: Any,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> Any:
    """A random ``family`` model of any ``config`` (e.g. ``tiny_config`` with real-size overrides),
    in eval mode, built directly on ``device`` in ``dtype``.

    Every parameter is created where it lives: a 7B model needs its bf16 size on the GPU and no
    float32 copy in host RAM. Weights follow the config's initialisation (normal with std
    ``initializer_range`` for the matrices) from the torch RNG seeded with ``seed`` (deterministic
    for a given device), restored afterwards. ``device="meta"`` gives the shapes without memory
    (nothing is initialised).
    """
    _check_family(family)
    device = torch.device(device)
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        with device:
            model = model_class(family)._from_config(
                config, attn_implementation=attn_implementation, dtype=dtype
            )
        if device.type != "meta":
            _initialise(model, family)
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = (token_id(t) for t in ("<pad>", "<eos>", "<bos>"))
    return model.eval()
