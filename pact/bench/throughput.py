"""`pact bench throughput`: the paper's headline (generation throughput, TTFT, peak memory), on
random weights of the real model shapes, with and without PACT.

The paper (Table 1, LLaVA-OneVision-7B, one A100) reports that PACT at a 71.3 % visual-token
reduction runs at 225 % of the stock model's throughput and lowers the peak GPU memory from 27.4 GB to
19.05 GB. Speed and memory do not depend on the weights' values, so this benchmark builds the real
shape with random weights (no download) and measures, for the stock model and for PACT:

* end-to-end generation on a batch of ``--batch-size`` samples, each one real-size image and one
  question, answered with exactly ``--new-tokens`` tokens (``min_new_tokens = max_new_tokens``: EOS
  cannot end an answer early, so both sides generate the same number of tokens): seconds per batch,
  samples/s, generated tokens/s;
* time to first token (TTFT): from the start of ``generate`` to the end of the first LM-head call
  (vision tower, prefill and the first token's logits);
* peak memory of the whole ``generate`` call (CUDA: ``max_memory_allocated``, weights included, as
  the paper's "GPU max memory"; CPU: the process's peak resident memory, a proxy, labelled);
* KV-cache bytes after the prefill (exact, from the cache tensors);

and the ratios (throughput x, TTFT x, memory ratio) next to the paper's figures and the FLOP model's
ideal (``pact.bench.prefill``'s decoder FLOP model, here over the prefill and every decode step).

Shapes (``--shape``), per family (``--family``):

* ``7b``: LLaVA-OneVision-7B (llava-hf/llava-onevision-qwen2-7b-ov-hf: Qwen2-7B text, SigLIP
  so400m 384-px crops, anyres_max_9) and Qwen2-VL-7B-Instruct (Qwen2-7B text with M-RoPE, 32-layer
  ViT, patch 14, merge 2);
* ``0.5b``: LLaVA-OneVision-0.5B (Qwen2-0.5B text, same SigLIP); for Qwen2-VL, the 0.5B-class
  language model of ``pact bench prefill`` with the real ViT (no released checkpoint has it);
* ``2b`` (Qwen2-VL only): Qwen2-VL-2B-Instruct;
* ``tiny``: the test models of ``pact.testing`` (seconds on a CPU).

Non-tiny shapes use a processor configured like the checkpoint's (``pact.testing.
checkpoint_processor``), so an image gets the real visual-token count. ``--layers`` /
``--vision-layers`` cut the depth for a reduced run on a CPU (widths unchanged). The model is built
directly on ``--device`` in ``--dtype`` (``pact.testing.random_model``): a 7B model needs its bf16
size on the GPU, no float32 copy in host RAM; the benchmark refuses early when the weights alone do
not fit in the device's free memory.

PACT's DBDPC cutoff is calibrated once, outside the timed runs, on one sample so that the reduction
reaches ``--target-ratio`` (default 0.713, the paper's point), as ``pact bench prefill`` does.
With ``--attn flash_attention_2``, which cannot add the proportional-attention bias, PACT runs with
``proportional_attention=false`` and the result says so.

    pact bench throughput --shape tiny --batch-size 2 --json /tmp/t.json          # seconds (tests)
    pact bench throughput --family llava_onevision --shape 7b --batch-size 8 \\
        --attn flash_attention_2 --json outputs/bench/throughput_ov7b.json         # one GPU
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pact.bench import load_average, machine_info
from pact.bench import prefill as bp

PROMPT = "Describe this image in detail."

# What the paper reports (Table 1: LLaVA-OneVision-7B, one A100, "approach-to-reference" 98.6 %).
PAPER: dict[str, Any] = {
    "source": "PACT (CVPR 2025), Table 1: LLaVA-OneVision-7B on one A100",
    "reduction_ratio": 0.713,
    "throughput_ratio": 2.25,
    "peak_memory_gb_stock": 27.4,
    "peak_memory_gb_pact": 19.05,
    "peak_memory_ratio": 19.05 / 27.4,
}

FAMILIES: tuple[str, ...] = ("llava_onevision", "qwen2_vl")
ATTENTION: tuple[str, ...] = ("sdpa", "flash_attention_2", "eager")
DTYPES: tuple[str, ...] = ("bfloat16", "float16", "float32")
DEFAULT_IMAGE_SIZE = (1024, 768)

# ------------------------------------------------------------------------------------------ shapes

_QWEN2_7B: dict[str, Any] = {  # Qwen2-7B, the language model of both 7B checkpoints
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}
_QWEN2_0P5B: dict[str, Any] = {  # Qwen2-0.5B
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "initializer_range": 0.02,
}
_QWEN2_1P5B: dict[str, Any] = {  # Qwen2-1.5B, the language model of Qwen2-VL-2B
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "initializer_range": 0.02,
}
_ROPE = {"rope_type": "default", "rope_theta": 1e6}
_MROPE_128 = {**_ROPE, "mrope_section": [16, 24, 24]}  # head_dim 128
_MROPE_64 = {**_ROPE, "mrope_section": [8, 12, 12]}  # head_dim 64
# SigLIP so400m-patch14-384 as the -hf checkpoints keep it: 26 of its 27 layers (the feature layer
# is the last kept one), no pooling head.
_SIGLIP_SO400M: dict[str, Any] = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 26,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
    "vision_use_head": False,
}
_QWEN2_VL_VIT: dict[str, Any] = {  # Qwen2-VL's ViT (675M): out width = the text hidden size
    "depth": 32,
    "embed_dim": 1280,
    "num_heads": 16,
    "mlp_ratio": 4,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}


@dataclass(frozen=True)
class ModelShape:
    """One ``--shape`` of one ``--family``: the text and vision overrides of ``testing.tiny_config``."""

    description: str
    layers: int
    vision_layers: int
    text: dict[str, Any] = field(default_factory=dict)
    vision: dict[str, Any] = field(default_factory=dict)
    real_size: bool = True  # checkpoint processor (real visual-token counts) and pinpoints


SHAPES: dict[str, dict[str, ModelShape]] = {
    "llava_onevision": {
        "7b": ModelShape(
            "LLaVA-OneVision-7B (llava-hf/llava-onevision-qwen2-7b-ov-hf): Qwen2-7B text, SigLIP so400m",
            28,
            26,
            {**_QWEN2_7B, "vocab_size": 152128, "rope_parameters": _ROPE},
            _SIGLIP_SO400M,
        ),
        "0.5b": ModelShape(
            "LLaVA-OneVision-0.5B (llava-hf/llava-onevision-qwen2-0.5b-ov-hf): Qwen2-0.5B text, "
            "SigLIP so400m",
            24,
            26,
            {**_QWEN2_0P5B, "vocab_size": 152000, "rope_parameters": _ROPE},
            _SIGLIP_SO400M,
        ),
        "tiny": ModelShape("tiny LLaVA-OneVision of pact.testing (test size)", 6, 2, real_size=False),
    },
    "qwen2_vl": {
        "7b": ModelShape(
            "Qwen2-VL-7B-Instruct: Qwen2-7B text (M-RoPE), 32-layer ViT, patch 14, merge 2",
            28,
            32,
            {**_QWEN2_7B, "vocab_size": 152064, "rope_parameters": _MROPE_128},
            {**_QWEN2_VL_VIT, "hidden_size": _QWEN2_7B["hidden_size"]},
        ),
        "2b": ModelShape(
            "Qwen2-VL-2B-Instruct: Qwen2-1.5B text (M-RoPE), 32-layer ViT, patch 14, merge 2",
            28,
            32,
            {**_QWEN2_1P5B, "vocab_size": 151936, "rope_parameters": _MROPE_128},
            {**_QWEN2_VL_VIT, "hidden_size": _QWEN2_1P5B["hidden_size"]},
        ),
        "0.5b": ModelShape(
            "Qwen2-VL ViT with the 0.5B-class language model of `pact bench prefill` (Qwen2-0.5B "
            "shape, M-RoPE; no released checkpoint)",
            24,
            32,
            {**_QWEN2_0P5B, "vocab_size": 151936, "rope_parameters": _MROPE_64},
            {**_QWEN2_VL_VIT, "hidden_size": _QWEN2_0P5B["hidden_size"]},
        ),
        "tiny": ModelShape("tiny Qwen2-VL of pact.testing (test size)", 6, 2, real_size=False),
    },
}


def model_shape(family: str, shape: str) -> ModelShape:
    """The ``ModelShape`` of ``family`` / ``shape`` (ValueError naming what exists otherwise)."""
    if family not in SHAPES:
        raise ValueError(f"--family {family!r} is not benchmarked; expected one of {', '.join(SHAPES)}")
    if shape not in SHAPES[family]:
        raise ValueError(
            f"--shape {shape!r} does not exist for {family}; expected one of {', '.join(SHAPES[family])}"
        )
    return SHAPES[family][shape]


def build_config(
    family: str, shape: str, *, layers: int | None = None, vision_layers: int | None = None
) -> Any:
    """The Hugging Face config of ``family`` at ``shape``, with ``layers`` decoder layers and
    ``vision_layers`` vision layers (default: the real depths). Builds no model."""
    from pact import testing

    spec = model_shape(family, shape)
    depth_key = "depth" if family == "qwen2_vl" else "num_hidden_layers"
    vision = {**spec.vision, depth_key: vision_layers or spec.vision_layers}
    config = testing.tiny_config(
        family,
        num_hidden_layers=layers or spec.layers,
        text_overrides=spec.text,
        vision_overrides=vision,
    )
    if family == "llava_onevision" and spec.real_size:
        config.image_grid_pinpoints = [list(p) for p in testing.CHECKPOINT_PINPOINTS]
    return config


def build_processor(family: str, shape: str) -> Any:
    """The processor that goes with ``build_config(family, shape)``."""
    from pact import testing

    spec = model_shape(family, shape)
    return testing.checkpoint_processor(family) if spec.real_size else testing.tiny_processor(family)


def parameter_bytes(config: Any, family: str, dtype: torch.dtype) -> tuple[int, int]:
    """(parameter count, bytes in ``dtype``) of the model ``config`` describes, counted on the meta
    device (no memory)."""
    from pact import testing

    model = testing.random_model(family, config, device="meta", dtype=dtype)
    count = sum(p.numel() for p in model.parameters())
    return count, count * torch.empty((), dtype=dtype).element_size()


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory of ``device``: CUDA's free bytes, or the host's MemAvailable (None if unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


# ------------------------------------------------------------------------------------- FLOP model


def generation_flops(shape: bp.DecoderShape, per_layer: list[int], new_tokens: int) -> float:
    """Decoder FLOPs of one sample: the prefill (layer i sees ``per_layer[i]`` tokens; the LM head for
    the first new token) and ``new_tokens - 1`` decode steps, step s attending over ``per_layer[i] + s``
    cached keys in layer i, each with the LM head for one token (``bp.prefill_flops``' terms)."""
    steps = max(0, new_tokens - 1)
    decode = 0
    for cached in per_layer:
        attended = steps * cached + steps * (steps + 1) // 2  # sum over s = 1..steps of (cached + s)
        decode += steps * shape.linear_flops_per_token + 4 * shape.heads * shape.head_dim * attended
    decode += steps * 2 * shape.hidden * shape.vocab
    return float(bp.prefill_flops(shape, per_layer) + decode)


def ideal_figures(
    shape: bp.DecoderShape,
    tokens: int,
    *,
    layer: int,
    visual_before: int,
    visual_after: int,
    keep_ratio: float | None,
    new_tokens: int,
) -> dict[str, float]:
    """The FLOP model's speed-ups of one sample: prefill alone (``bp.ideal_speedup``) and the whole
    generation (prefill + decode, the reduction's own work on the reduced side)."""
    prefill = bp.ideal_speedup(
        shape,
        tokens,
        layer=layer,
        visual_before=visual_before,
        visual_after=visual_after,
        keep_ratio=keep_ratio,
    )
    removed = visual_before - visual_after
    stock = generation_flops(shape, bp.tokens_per_layer(shape.layers, tokens), new_tokens)
    reduced = generation_flops(shape, bp.tokens_per_layer(shape.layers, tokens, {layer: removed}), new_tokens)
    reduced += prefill["flops_reduction"]
    return {
        "prefill_speedup": prefill["ideal_speedup"],
        "generation_speedup": stock / reduced,
        "generation_flops_stock": stock,
        "generation_flops_pact": reduced,
    }


# ------------------------------------------------------------------------------------ measurement


@dataclass
class GenerationRun:
    """Measurements of one configuration; lists hold one entry per timed repetition."""

    label: str
    seconds: list[float] = field(default_factory=list)
    ttft_seconds: list[float] = field(default_factory=list)
    peak_memory_bytes: list[int] = field(default_factory=list)
    peak_memory_growth_bytes: list[int] = field(default_factory=list)
    peak_memory_kind: str = ""
    kv_cache_bytes: int = 0
    visual_before: list[int] = field(default_factory=list)
    visual_after: list[int] = field(default_factory=list)

    def summary(self, batch_size: int, new_tokens: int) -> dict[str, Any]:
        """Medians, spreads (min, max) and the raw samples, JSON-ready."""
        samples_per_s = [batch_size / s for s in self.seconds]
        tokens_per_s = [batch_size * new_tokens / s for s in self.seconds]

        def spread(xs: list[float]) -> dict[str, float]:
            return {"median": float(statistics.median(xs)), "min": float(min(xs)), "max": float(max(xs))}

        before, after = sum(self.visual_before), sum(self.visual_after)
        return {
            "label": self.label,
            "samples_per_second": spread(samples_per_s)["median"],
            "generated_tokens_per_second": spread(tokens_per_s)["median"],
            "seconds_per_batch": spread(self.seconds)["median"],
            "ttft_seconds": spread(self.ttft_seconds)["median"],
            "peak_memory_bytes": int(statistics.median(self.peak_memory_bytes)),
            "peak_memory_growth_bytes": int(statistics.median(self.peak_memory_growth_bytes)),
            "peak_memory_kind": self.peak_memory_kind,
            "kv_cache_bytes": self.kv_cache_bytes,
            "visual_before": list(self.visual_before),
            "visual_after": list(self.visual_after),
            "reduction_ratio": 1.0 - after / before if before else 0.0,
            "spread": {
                "samples_per_second": spread(samples_per_s),
                "seconds_per_batch": spread(self.seconds),
                "ttft_seconds": spread(self.ttft_seconds),
            },
            "raw": {
                "seconds_per_batch": list(self.seconds),
                "ttft_seconds": list(self.ttft_seconds),
                "peak_memory_bytes": list(self.peak_memory_bytes),
            },
        }


MEMORY_KIND = {
    True: "CUDA max_memory_allocated during generate (weights included; growth = above the level before)",
    False: "CPU proxy: the process's peak resident memory during generate, sampled every 2 ms (weights "
    "included; growth = above the level before)",
}


def _peak_absolute(probe: Any) -> int:
    """Absolute peak of a ``bp.memory_probe``: CUDA bytes allocated, or resident bytes on CPU."""
    if isinstance(probe, bp.CudaPeak):
        return int(probe.peak)
    return int(probe.peak * probe.page)


@torch.inference_mode()
def generate_once(model: Any, inputs: Any, new_tokens: int, device: torch.device) -> dict[str, Any]:
    """One timed ``generate`` of exactly ``new_tokens`` greedy tokens per sample on the model as it is
    now (stock or with pact applied): seconds, TTFT, peak memory (absolute and growth)."""
    head = model.get_output_embeddings()
    ttft = bp.Stopwatch(device)
    handle = head.register_forward_hook(lambda *_: ttft.stop())  # the first call closes the interval
    probe = bp.memory_probe(device)
    prompt_length = int(inputs["input_ids"].shape[1])
    try:
        with probe:
            bp._sync(device)
            start = time.perf_counter()
            ttft.start()
            sequences = model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,  # EOS is masked until then: every answer has new_tokens
                do_sample=False,
                use_cache=True,
            )
            bp._sync(device)
            seconds = time.perf_counter() - start
    finally:
        handle.remove()
    generated = int(sequences.shape[1]) - prompt_length
    if generated != new_tokens:
        raise RuntimeError(f"generate produced {generated} new tokens per sample, expected {new_tokens}")
    return {
        "seconds": seconds,
        "ttft_seconds": ttft.seconds()[0],
        "peak_memory_bytes": _peak_absolute(probe),
        "peak_memory_growth_bytes": int(probe.growth_bytes),
        "peak_memory_kind": MEMORY_KIND[device.type == "cuda"],
    }


def visual_per_sample(model: Any, inputs: Any) -> list[int]:
    """Visual patch tokens of each sample of ``inputs``, as the engine finds them."""
    from pact.models import get_adapter

    return [int(n) for n in get_adapter(model).candidate_mask(inputs["input_ids"], inputs).sum(1)]


@torch.inference_mode()
def prefill_kv_bytes(model: Any, inputs: Any) -> int:
    """Bytes of the KV cache right after the prefill of ``inputs`` (exact)."""
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    return bp.kv_cache_bytes(out.past_key_values)


def measure(
    model: Any,
    inputs: Any,
    pact_config: Any,
    *,
    new_tokens: int,
    repeats: int,
    warmup: int,
    device: torch.device,
    log: Any = None,
) -> tuple[GenerationRun, GenerationRun]:
    """(stock, pact) measured in interleaved rounds: each round runs one generation of each
    (``pact.apply`` / ``pact.remove`` in between), so a change of load hits both alike; the first
    ``warmup`` rounds are not timed."""
    import pact.api

    runs = (GenerationRun("stock"), GenerationRun("pact"))
    try:
        for rnd in range(warmup + repeats):
            timed = rnd >= warmup
            for run, cfg in zip(runs, (None, pact_config), strict=True):
                if cfg is None:
                    pact.api.remove(model)
                else:
                    pact.api.apply(model, cfg)
                m = generate_once(model, inputs, new_tokens, device)
                if not timed:
                    continue
                run.seconds.append(m["seconds"])
                run.ttft_seconds.append(m["ttft_seconds"])
                run.peak_memory_bytes.append(m["peak_memory_bytes"])
                run.peak_memory_growth_bytes.append(m["peak_memory_growth_bytes"])
                run.peak_memory_kind = m["peak_memory_kind"]
                if log:
                    log(
                        f"  round {rnd - warmup + 1}/{repeats}: {run.label}: {m['seconds']:.3f} s per batch, "
                        f"TTFT {m['ttft_seconds']:.3f} s, peak {m['peak_memory_bytes'] / 2**30:.2f} GiB"
                    )
        for run, cfg in zip(runs, (None, pact_config), strict=True):
            if cfg is None:
                pact.api.remove(model)
                run.visual_before = run.visual_after = visual_per_sample(model, inputs)
            else:
                pact.api.apply(model, cfg)
            run.kv_cache_bytes = prefill_kv_bytes(model, inputs)
            if cfg is not None:
                st = pact.api.stats(model)
                run.visual_before, run.visual_after = list(st.visual_before), list(st.visual_after)
    finally:
        pact.api.remove(model)
    return runs


# ----------------------------------------------------------------------------------------- the CLI


def _image_size(text: str) -> tuple[int, int] | None:
    if text == "native":
        return None
    w, sep, h = text.lower().partition("x")
    try:
        size = (int(w), int(h))
    except ValueError:
        size = (0, 0)
    if not sep or min(size) < 1:
        raise argparse.ArgumentTypeError(
            f"--image-size must be WIDTHxHEIGHT (e.g. 1024x768) or 'native', got {text!r}"
        )
    return size


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `pact bench throughput` (also used by pact.bench's subparser)."""
    p.add_argument("--family", default="llava_onevision", help=f"model family: {', '.join(FAMILIES)}")
    p.add_argument("--shape", default="7b", help="7b, 2b (qwen2_vl), 0.5b or tiny (default 7b)")
    p.add_argument("--layers", type=int, help="decoder layers (default: the real depth; cut for a CPU run)")
    p.add_argument("--vision-layers", type=int, help="vision-tower layers (default: the real depth)")
    p.add_argument("--batch-size", type=int, default=4, help="samples per generate call (default 4)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens every sample generates (default 32)")
    p.add_argument(
        "--image-size",
        type=_image_size,
        default=DEFAULT_IMAGE_SIZE,
        help="resize the image to WIDTHxHEIGHT, or 'native' (default 1024x768)",
    )
    p.add_argument("--image", help="image path (default: the bundled photo)")
    p.add_argument("--attn", default="sdpa", help=f"attention implementation: {', '.join(ATTENTION)}")
    p.add_argument("--dtype", default="bfloat16", help=f"{', '.join(DTYPES)} (default bfloat16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", default="pact", help="reduction config name or JSON path (default: pact)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable"
    )
    p.add_argument(
        "--target-ratio", type=float, default=PAPER["reduction_ratio"], help="reduction ratio (default 0.713)"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median; default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", help="write the result to this JSON file")


def _fail(message: str) -> SystemExit:
    return SystemExit(f"pact bench throughput: {message}")


def validate(args: argparse.Namespace) -> tuple[ModelShape, Any, list[str]]:
    """Check every argument before anything is built; returns (shape, pact config, notes about what
    the benchmark changed in the config). Raises SystemExit with a one-line message."""
    from pact.cli import load_config_arguments

    try:
        spec = model_shape(args.family, args.shape)
    except ValueError as e:
        raise _fail(str(e)) from None
    for name in ("batch_size", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise _fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise _fail(f"--warmup must be >= 0, got {args.warmup}")
    for name, real in (("layers", spec.layers), ("vision_layers", spec.vision_layers)):
        value = getattr(args, name)
        if value is not None and not 1 <= value <= real:
            raise _fail(f"--{name.replace('_', '-')} must be in 1..{real} for this shape, got {value}")
    if not 0.0 < args.target_ratio < 1.0:
        raise _fail(f"--target-ratio must be in (0, 1), got {args.target_ratio}")
    if args.attn not in ATTENTION:
        raise _fail(f"--attn {args.attn!r} is not one of {', '.join(ATTENTION)}")
    if args.dtype not in DTYPES:
        raise _fail(f"--dtype {args.dtype!r} is not one of {', '.join(DTYPES)}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise _fail(f"--device {args.device!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _fail(f"--device {args.device} asked for, but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise _fail(f"--device must be cpu or cuda, got {args.device!r}")
    if args.attn == "flash_attention_2":
        if device.type != "cuda":
            raise _fail("--attn flash_attention_2 needs --device cuda")
        if importlib.util.find_spec("flash_attn") is None:
            raise _fail("--attn flash_attention_2 needs the flash-attn package, which is not installed")
    if args.image and not Path(args.image).is_file():
        raise _fail(f"--image {args.image!r} is not a file")
    try:
        cfg = load_config_arguments(args.config, args.set)
    except (ValueError, OSError, KeyError) as e:
        raise _fail(f"--config {args.config!r}: {e}") from None
    if cfg.clustering not in ("dbdpc", "none") or (cfg.clustering == "none" and cfg.pruning == "none"):
        raise _fail(
            f"--config {args.config!r} ({cfg.pruning}+{cfg.clustering}): the ratio is calibrated for DBDPC "
            "(cutoff) or pruning-only methods (keep_ratio)"
        )
    layers = args.layers or spec.layers
    if cfg.layer >= layers:
        raise _fail(
            f"the config reduces before layer {cfg.layer}, but the model has {layers} layers (--layers)"
        )
    notes = []
    if args.attn == "flash_attention_2" and cfg.proportional_attention:
        # FlashAttention cannot add the log(size) bias to the logits; the engine refuses the pair.
        cfg = cfg.replace(proportional_attention=False)
        notes.append(
            "proportional_attention=false: flash_attention_2 cannot add the log(size) bias; merged tokens "
            "count once in attention (the paper's own FlashAttention setting is not stated)"
        )
    return spec, cfg, notes


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by parsed ``args``; returns the JSON-ready result."""
    import pact.api
    from pact import testing

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    spec, base_cfg, notes = validate(args)
    load_before = load_average()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    layers, vision_layers = args.layers or spec.layers, args.vision_layers or spec.vision_layers
    config = build_config(args.family, args.shape, layers=layers, vision_layers=vision_layers)
    n_params, n_bytes = parameter_bytes(config, args.family, dtype)
    free = free_memory_bytes(device)
    if free is not None and n_bytes > free:
        raise _fail(
            f"the weights alone take {n_bytes / 2**30:.1f} GiB in {args.dtype}, more than the "
            f"{free / 2**30:.1f} GiB free on {device}; cut --layers / --vision-layers or use a bigger device"
        )
    t0 = time.perf_counter()
    model = testing.random_model(
        args.family, config, device=device, dtype=dtype, attn_implementation=args.attn, seed=args.seed
    )
    build_s = time.perf_counter() - t0
    what = (
        f"{spec.description}; {layers}/{spec.layers} decoder layers, "
        f"{vision_layers}/{spec.vision_layers} vision layers"
    )
    log(f"pact bench throughput: {what}; {n_params / 1e6:,.1f} M parameters (built in {build_s:.1f} s)")

    from PIL import Image

    image = Image.open(args.image).convert("RGB") if args.image else testing.demo_photo()
    if args.image_size is not None:
        image = image.resize(args.image_size, Image.Resampling.BICUBIC)
    processor = build_processor(args.family, args.shape)
    sample = {"question": PROMPT, "images": [image]}
    inputs = testing.build_inputs(args.family, processor, [sample] * args.batch_size).to(device)
    single = testing.build_inputs(args.family, processor, [sample]).to(device)
    tokens = int(single["input_ids"].shape[1])
    n_visual = bp.count_visual(model, single)
    log(
        f"input: {args.batch_size} x (one {image.width}x{image.height} image + question): {tokens} "
        f"tokens per sample, {n_visual} visual; {args.new_tokens} new tokens each; {device}, "
        f"{args.dtype}, {args.attn}"
    )
    try:
        cfg, calibration = bp.calibrate(model, single, base_cfg, args.target_ratio)
        pact.api.apply(model, cfg)  # validates the config on this model before anything is timed
        pact.api.remove(model)
    except ValueError as e:
        raise _fail(f"calibration at ratio {args.target_ratio:g}: {e}") from None
    log(f"PACT: {cfg.describe()}; calibration {calibration}")
    for note in notes:
        log(f"note: {note}")

    stock, reduced = measure(
        model,
        inputs,
        cfg,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        device=device,
        log=log,
    )
    s = stock.summary(args.batch_size, args.new_tokens)
    r = reduced.summary(args.batch_size, args.new_tokens)
    paired = [a / b for a, b in zip(stock.seconds, reduced.seconds, strict=True)]
    shape = bp.DecoderShape.from_config(model.config.get_text_config())
    before = round(statistics.mean(r["visual_before"])) if r["visual_before"] else n_visual
    after = round(statistics.mean(r["visual_after"])) if r["visual_after"] else n_visual
    ideal = ideal_figures(
        shape,
        tokens,
        layer=int(cfg.layer),
        visual_before=before,
        visual_after=after,
        keep_ratio=float(cfg.keep_ratio) if cfg.pruning != "none" else None,
        new_tokens=args.new_tokens,
    )
    result: dict[str, Any] = {
        "benchmark": "throughput",
        "command": "pact bench throughput " + " ".join(getattr(args, "argv", []) or []),
        "machine": {**machine_info(device), "load_before": load_before, "load_after": load_average()},
        "model": {
            "family": args.family,
            "shape": args.shape,
            "description": what,
            "layers": layers,
            "real_layers": spec.layers,
            "vision_layers": vision_layers,
            "real_vision_layers": spec.vision_layers,
            "parameters": n_params,
            "parameter_bytes": n_bytes,
            "random_weights": True,
            "seed": args.seed,
            "dtype": args.dtype,
            "attention": args.attn,
            "build_seconds": build_s,
            "decoder_shape": shape.__dict__,
        },
        "input": {
            "batch_size": args.batch_size,
            "image": args.image or "bundled photo (pact/assets/grace_hopper.jpg)",
            "image_size": [image.width, image.height],
            "tokens_per_sample": tokens,
            "visual_tokens_per_sample": n_visual,
            "text_tokens_per_sample": tokens - n_visual,
            "new_tokens": args.new_tokens,
            "prompt": PROMPT,
            "real_size_processor": spec.real_size,
        },
        "config": cfg.to_dict(),
        "config_notes": notes,
        "calibration": calibration,
        "design": f"{args.warmup} untimed + {args.repeats} timed interleaved rounds (stock, then PACT); "
        "medians; generate with min_new_tokens = max_new_tokens (no early EOS); inputs already on the "
        "device (preprocessing not timed); TTFT = start of generate to the end of the first LM-head call",
        "stock": s,
        "pact": r,
        "reduction_ratio": r["reduction_ratio"],
        "throughput_ratio": r["samples_per_second"] / s["samples_per_second"],
        "throughput_ratio_paired_median": float(statistics.median(paired)),
        "ttft_speedup": s["ttft_seconds"] / r["ttft_seconds"],
        "peak_memory_ratio": r["peak_memory_bytes"] / s["peak_memory_bytes"]
        if s["peak_memory_bytes"]
        else math.nan,
        "kv_cache_ratio": r["kv_cache_bytes"] / s["kv_cache_bytes"] if s["kv_cache_bytes"] else math.nan,
        "peak_memory_kind": s["peak_memory_kind"],
        "ideal": ideal,
        "flop_model": "decoder only (vision tower excluded: the same on both sides): pact.bench.prefill's "
        "per-layer FLOPs for the prefill, plus new_tokens - 1 decode steps (linear layers, attention over "
        "the cache, LM head); PACT pays its own reduction FLOPs. Decode is memory-bound on GPUs, so the "
        "generation figure is a FLOP ratio, not a time ceiling",
        "paper": PAPER,
    }
    return result


def format_report(result: dict[str, Any]) -> str:
    """The human-readable table and ratios of a result."""
    head = (
        f"{'run':<7}{'vis in':>8}{'vis out':>8}{'s/batch':>10}{'samples/s':>11}{'tok/s':>10}{'TTFT s':>9}"
        f"{'peak GiB':>10}{'KV MiB':>9}"
    )
    lines = [head, "-" * len(head)]
    for key in ("stock", "pact"):
        x = result[key]
        lines.append(
            f"{key:<7}{statistics.mean(x['visual_before']):>8.0f}{statistics.mean(x['visual_after']):>8.0f}"
            f"{x['seconds_per_batch']:>10.3f}{x['samples_per_second']:>11.3f}"
            f"{x['generated_tokens_per_second']:>10.2f}{x['ttft_seconds']:>9.3f}"
            f"{x['peak_memory_bytes'] / 2**30:>10.2f}{x['kv_cache_bytes'] / 2**20:>9.1f}"
        )
    p, i = result["paper"], result["ideal"]
    lines += [
        "",
        f"reduction {result['reduction_ratio']:.1%} (paper {p['reduction_ratio']:.1%}); throughput "
        f"x{result['throughput_ratio']:.2f} (paired x{result['throughput_ratio_paired_median']:.2f}; paper "
        f"x{p['throughput_ratio']:.2f}; FLOP ideal x{i['generation_speedup']:.2f}); "
        f"TTFT x{result['ttft_speedup']:.2f} (FLOP ideal of the prefill x{i['prefill_speedup']:.2f})",
        f"peak memory x{result['peak_memory_ratio']:.3f} (paper {p['peak_memory_gb_stock']} -> "
        f"{p['peak_memory_gb_pact']} GB = x{p['peak_memory_ratio']:.3f}); "
        f"KV cache x{result['kv_cache_ratio']:.3f}",
        f"peak memory: {result['peak_memory_kind']}",
    ]
    lines += [f"note: {n}" for n in result["config_notes"]]
    return "\n".join(lines)


report = format_report
