"""`pact bench prefill`: what visual-token reduction buys at prefill, measured and predicted.

The benchmark runs one image prompt through a vision-language model twice -- stock, then with a
reduction config applied -- and reports, for each:

* prefill time of the language model (the decoder call, reduction included), and of the whole
  model call (vision tower + embedding + decoder + LM head for the last token);
* the reduction's own time (``pact.stats(model).seconds_reducing``) as a share of the UNREDUCED
  prefill;
* decode tokens/s (greedy steps on the prefill's cache);
* peak memory of the prefill (CUDA: ``max_memory_allocated`` above the level before the call; CPU:
  the sampled growth of the process's resident memory -- a proxy, labelled as such);
* KV-cache bytes, counted exactly from the cache tensors (and predicted from the token counts);

and compares the measured ``speedup`` (LLM prefill, stock / reduced) with ``ideal_speedup``, the
ratio of the FLOPs the decoder must do (``prefill_flops``: per layer, the q/k/v/o projections with
grouped KV heads, the SwiGLU MLP and the causal attention products with the token count that layer
sees, plus the LM head for the last token), the reduced side also paying for the reduction's own
work (layer-L queries/keys of every token, DBDPC's distance matrix, the retrieval distances).

Without ``--model`` it builds a random-weight Qwen2-VL whose language model has the shape of the
0.5B class (hidden 896, 24 layers, 14 query / 2 KV heads, MLP 4864, vocabulary 151936 with a tied
head) and a one-layer, 64-wide vision tower: the vision encoder is not what is measured (its cost is
the same with and without reduction; it only appears in the whole-call time). The bundled photo is
resized to about ``--visual-tokens`` visual tokens (default 3000). ``--model DIR`` measures a local
checkpoint instead. Random weights make the text meaningless but not the timings.

Budget (``--budget``): ``calibrate`` (default) finds, once and outside the timed runs, the DBDPC
cutoff (or the pruning keep ratio for pruning-only methods) that lands on ``--target-ratio`` for
this input and then times those fixed settings, as a deployment would; ``target`` passes
``target_ratio`` to the method so its own per-sample search is inside the timed reduction;
``fixed`` uses the config exactly as given.

    pact bench prefill --json outputs/bench/prefill.json
    pact bench prefill --sweep 0.3,0.5,0.85 --plot docs/figures/prefill_speedup.png
    pact bench prefill --tiny --json /tmp/p.json       # seconds: the tiny test model
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pact.bench import load_average, machine_info
from pact.cli import (
    add_config_arguments,
    device_name,
    existing_dir,
    existing_file,
    int_at_least,
    output_file,
    parse_overrides,
    ratio_list,
    reduction_ratio,
)

PROMPT = "Describe this photo in one sentence."
PIXELS_PER_TOKEN = 28 * 28  # Qwen2-VL: 14-px patches merged 2 x 2 into one LLM token

# The default random model: the language model of the 0.5B class (Qwen2-0.5B / LLaVA-OV-0.5B shape).
TEXT_0P5B: dict[str, Any] = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    # head_dim 64 -> rotary half-dimension 32, split (t, h, w) like the real checkpoints (1/4, 3/8, 3/8)
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
}
TINY_VISION: dict[str, Any] = {"depth": 1, "embed_dim": 64, "num_heads": 2, "mlp_ratio": 1}


# ================================================================================================
# FLOP model
# ================================================================================================


@dataclass(frozen=True)
class DecoderShape:
    """The shapes of a decoder-only language model that set its FLOPs."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, text_config: Any) -> DecoderShape:
        """From a Hugging Face text config (``model.config.get_text_config()``)."""
        heads = int(text_config.num_attention_heads)
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        return cls(
            hidden=int(text_config.hidden_size),
            layers=int(text_config.num_hidden_layers),
            heads=heads,
            kv_heads=int(getattr(text_config, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            intermediate=int(text_config.intermediate_size),
            vocab=int(text_config.vocab_size),
        )

    @property
    def linear_flops_per_token(self) -> int:
        """Multiply-adds x 2 of one token through one layer's matrices: q and o (H*d wide), k and v
        (H_kv*d wide, grouped-query attention), and the SwiGLU MLP's three matrices."""
        d, q_width, kv_width = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention_proj = 2 * d * q_width + 2 * 2 * d * kv_width + 2 * q_width * d
        mlp = 3 * 2 * d * self.intermediate
        return attention_proj + mlp


def attention_pairs(tokens: int, causal: bool = True) -> int:
    """(query, key) pairs a prefill of ``tokens`` tokens scores: T(T+1)/2 causal, T^2 otherwise."""
    return tokens * (tokens + 1) // 2 if causal else tokens * tokens


def layer_flops(shape: DecoderShape, tokens: int, causal: bool = True) -> int:
    """FLOPs of one decoder layer over a prefill of ``tokens`` tokens (no cache before it).

    Linear part: ``tokens * shape.linear_flops_per_token``. Attention part: per query head and
    scored pair, 2*d for q.k and 2*d for the weighted sum of values. Norms, rotary, softmax and
    residual adds (O(T*D) elementwise work) are left out.
    """
    linear = tokens * shape.linear_flops_per_token
    attention = 4 * shape.heads * shape.head_dim * attention_pairs(tokens, causal)
    return linear + attention


def tokens_per_layer(num_layers: int, tokens: int, removed_at: dict[int, int] | None = None) -> list[int]:
    """Sequence length each decoder layer sees when ``removed_at[l]`` tokens leave before layer l."""
    removed_at = removed_at or {}
    out, current = [], tokens
    for i in range(num_layers):
        current -= int(removed_at.get(i, 0))
        out.append(current)
    return out


def prefill_flops(
    shape: DecoderShape, per_layer: list[int], *, logits_tokens: int = 1, causal: bool = True
) -> int:
    """FLOPs of a decoder prefill whose layer i sees ``per_layer[i]`` tokens, plus the LM head for
    ``logits_tokens`` positions (1 with ``logits_to_keep=1``, as in generation)."""
    if len(per_layer) != shape.layers:
        raise ValueError(f"per_layer has {len(per_layer)} entries for a {shape.layers}-layer model")
    body = sum(layer_flops(shape, t, causal) for t in per_layer)
    return body + 2 * shape.hidden * shape.vocab * logits_tokens


def reduction_flops(
    shape: DecoderShape,
    tokens: int,
    *,
    clustered: int = 0,
    pruned: int = 0,
    centers: int = 0,
    feature_dim: int | None = None,
) -> int:
    """FLOPs of one PACT-style reduction step that the stock model does not do.

    * the layer-L queries and keys of all ``tokens`` tokens (EUTI and the clustering features; the
      layer itself then recomputes them for the kept tokens only): 2*T*D*(H*d + H_kv*d);
    * DBDPC's pairwise distances among the ``clustered`` tokens: 2*n^2*F;
    * the retrieval of the ``pruned`` tokens: distances to the ``centers``, 2*n_pruned*C*F.
    F defaults to the concatenated key width H_kv*d. EUTI's scores (one dot product per token and
    head) and the O(n^2) elementwise passes of DBDPC are left out.
    """
    f = feature_dim or shape.kv_heads * shape.head_dim
    qk = 2 * tokens * shape.hidden * (shape.heads + shape.kv_heads) * shape.head_dim
    return qk + 2 * clustered * clustered * f + 2 * pruned * centers * f


def ideal_speedup(
    shape: DecoderShape,
    tokens: int,
    *,
    layer: int,
    visual_before: int,
    visual_after: int,
    keep_ratio: float | None = None,
    causal: bool = True,
) -> dict[str, float]:
    """The FLOP-model speed-up of reducing ``visual_before`` -> ``visual_after`` visual tokens
    before decoder ``layer`` of a ``tokens``-token prefill.

    ``keep_ratio``: the pruning keep ratio of a PACT-style method (DBDPC then clusters
    ``int(N * keep_ratio)`` tokens and the rest go through retrieval); None = pure clustering of all
    N tokens (keep ratio 1). Returns the FLOPs of both sides and their ratio.
    """
    n = int(visual_before)
    removed = n - int(visual_after)
    base = prefill_flops(shape, tokens_per_layer(shape.layers, tokens), causal=causal)
    reduced = prefill_flops(shape, tokens_per_layer(shape.layers, tokens, {layer: removed}), causal=causal)
    clustered = n if keep_ratio is None else int(n * keep_ratio)
    extra = reduction_flops(
        shape, tokens, clustered=clustered, pruned=n - clustered, centers=int(visual_after)
    )
    return {
        "flops_baseline": float(base),
        "flops_reduced": float(reduced),
        "flops_reduction": float(extra),
        "ideal_speedup": base / (reduced + extra),
    }


def ideal_curve(
    shape: DecoderShape,
    tokens: int,
    *,
    layer: int,
    visual: int,
    keep_ratio: float | None = None,
    ratios: list[float] | None = None,
) -> list[tuple[float, float]]:
    """(reduction ratio, ideal speed-up) points from ratio 0 to 0.95 for the plot; a prune-then-
    cluster method's keep ratio follows ``calibration_keep_ratio`` as in the measured runs."""
    ratios = ratios if ratios is not None else [i / 40 for i in range(39)]
    out = []
    for r in ratios:
        after = visual - round(r * visual)
        keep = None if keep_ratio is None else calibration_keep_ratio(keep_ratio, r)
        sp = ideal_speedup(
            shape, tokens, layer=layer, visual_before=visual, visual_after=after, keep_ratio=keep
        )
        out.append((float(r), sp["ideal_speedup"]))
    return out


# ================================================================================================
# Measurement tools
# ================================================================================================


class RssSampler:
    """Peak resident-set growth of this process while a block runs (CPU; a proxy for peak memory).

    torch keeps no allocator statistics on CPU, so a thread samples ``/proc/self/statm`` (torch
    kernels release the GIL). glibc's ``malloc_trim`` runs first so that memory freed by an earlier
    run goes back to the OS instead of silently absorbing this run's allocations.
    """

    kind = "peak RSS growth (CPU, sampled every 2 ms)"

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _rss_pages() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1])

    def __enter__(self) -> RssSampler:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.base = self.peak = self._rss_pages()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss_pages())
            time.sleep(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self._rss_pages())

    @property
    def growth_bytes(self) -> int:
        return (self.peak - self.base) * self.page


class CudaPeak:
    """Peak CUDA memory allocated while a block runs, above the level at its start."""

    kind = "CUDA max_memory_allocated above the level before the call"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = self.peak = 0

    def __enter__(self) -> CudaPeak:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device)

    @property
    def growth_bytes(self) -> int:
        return self.peak - self.base


def memory_probe(device: torch.device) -> RssSampler | CudaPeak:
    return CudaPeak(device) if device.type == "cuda" else RssSampler()


class Stopwatch:
    """Intervals on a device: CUDA events on a GPU (no sync until read), ``perf_counter`` on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._open: Any = None
        self._spans: list[Any] = []

    def start(self) -> None:
        if self.cuda:
            self._open = torch.cuda.Event(enable_timing=True)
            self._open.record()
        else:
            self._open = time.perf_counter()

    def stop(self) -> None:
        if self._open is None:
            return
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._spans.append((self._open, end))
        else:
            self._spans.append(time.perf_counter() - self._open)
        self._open = None

    def reset(self) -> None:
        self._open, self._spans = None, []

    def seconds(self) -> list[float]:
        """Every closed interval, in seconds (synchronises CUDA)."""
        if not self.cuda:
            return list(self._spans)
        out = []
        for start, end in self._spans:
            end.synchronize()
            out.append(start.elapsed_time(end) / 1000.0)
        return out


class ModuleTimer:
    """Times the calls of one module (e.g. the language model) with forward pre/post hooks.

    Install AFTER ``pact.apply`` so that the window covers pact's own hooks on the module (the
    pre-hook is prepended, the post-hook appended): the reduction, which runs inside the decoder
    layers' pre-hooks, is inside the window either way.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.watch = Stopwatch(device)
        self._handles = [
            module.register_forward_pre_hook(lambda *_: self.watch.start(), prepend=True),
            module.register_forward_hook(lambda *_: self.watch.stop()),
        ]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def kv_cache_bytes(cache: Any) -> int:
    """Bytes held by the key and value tensors of a transformers cache (exact)."""
    total = 0
    for layer in getattr(cache, "layers", []) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def kv_cache_lengths(cache: Any) -> list[int]:
    """Cached sequence length of every layer."""
    return [
        int(layer.keys.shape[-2])
        for layer in getattr(cache, "layers", []) or []
        if isinstance(getattr(layer, "keys", None), torch.Tensor)
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# ================================================================================================
# Model, inputs, configs
# ================================================================================================


def build_random_model(
    *, tiny: bool, layers: int | None, dtype: torch.dtype, attn: str
) -> tuple[Any, Any, str]:
    """(model, processor, description) of the random Qwen2-VL this benchmark uses without --model."""
    from pact import testing

    processor = testing.tiny_processor("qwen2_vl")
    if tiny:
        n = layers or 4
        model = testing.tiny_model("qwen2_vl", dtype=dtype, num_hidden_layers=n, attn_implementation=attn)
        what = f"tiny random Qwen2-VL (hidden 64, {n} layers; test size)"
        return model, processor, what
    n = layers or 24
    model = testing.tiny_model(
        "qwen2_vl",
        dtype=dtype,
        num_hidden_layers=n,
        attn_implementation=attn,
        text_overrides=TEXT_0P5B,
        vision_overrides={**TINY_VISION, "hidden_size": TEXT_0P5B["hidden_size"]},
    )
    what = (
        f"random-weight Qwen2-VL, 0.5B-class language model (hidden 896, {n} layers, 14 heads, 2 KV "
        "heads, MLP 4864, vocab 151936) with a 1-layer 64-wide vision tower"
    )
    return model, processor, what


def load_checkpoint(path: str, dtype: torch.dtype, attn: str) -> tuple[Any, Any, str]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn).eval()
    return model, AutoProcessor.from_pretrained(path), f"checkpoint {path}"


def build_inputs(processor: Any, image: Any, visual_tokens: int | None) -> Any:
    """One chat prompt (the image, then ``PROMPT``). For Qwen-style processors (patch merging)
    the image is resized to about ``visual_tokens`` LLM tokens; other processors use their own
    resolution."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    kwargs: dict[str, Any] = {}
    if visual_tokens and hasattr(processor.image_processor, "merge_size"):
        px = int(visual_tokens) * PIXELS_PER_TOKEN
        kwargs["images_kwargs"] = {"size": {"shortest_edge": px, "longest_edge": px}}
    return processor(text=[text], images=[image], return_tensors="pt", **kwargs)


def count_visual(model: Any, inputs: Any) -> int:
    """Visual patch tokens of the (single-sample) input, as the engine finds them."""
    from pact.models import get_adapter

    return int(get_adapter(model).candidate_mask(inputs["input_ids"], inputs).sum())


def calibration_keep_ratio(keep_ratio: float, target_ratio: float) -> float:
    """The pruning keep ratio a prune-then-cluster method uses for ``target_ratio``.

    Pruning alone already removes ``1 - keep_ratio``; when that is not clearly below the target
    (less than 90% of it) the clustering would have nothing left to do, or the target would be out
    of reach (PACT keeps at most ``keep_ratio * N`` tokens). Then pruning takes half the budget and
    clustering the other half: ``keep_ratio = 1 - target_ratio / 2``.
    """
    return keep_ratio if 1.0 - keep_ratio < 0.9 * target_ratio else 1.0 - target_ratio / 2


class _CalibrationDoneError(Exception):
    """Raised inside the prefill once the calibration has its answer (the rest is not needed)."""


def calibrate(model: Any, inputs: Any, cfg: Any, target_ratio: float) -> tuple[Any, dict[str, Any]]:
    """Fixed settings of ``cfg``'s method that reach ``target_ratio`` on this input.

    Runs the prefill up to the reduction layer once with a probe method that sees the real layer
    signals: for a DBDPC method it bisects ``cutoff`` (keeping ``keep_ratio``) so that the kept
    count is closest to ``floor(N * (1 - target_ratio))``; for a pruning-only method it sets
    ``keep_ratio = 1 - target_ratio``. Returns (config, info).
    """
    import pact.api
    from pact.methods.base import Method, build_method
    from pact.methods.budget import search_threshold

    n_visual = count_visual(model, inputs)
    target = max(0, min(n_visual, math.floor(n_visual * (1.0 - target_ratio) + 1e-9)))
    if cfg.pruning != "none" and cfg.clustering != "none":
        cfg = cfg.replace(keep_ratio=calibration_keep_ratio(cfg.keep_ratio, target_ratio))
    if cfg.clustering == "none":
        if cfg.pruning == "none":
            raise ValueError("calibration needs a method that removes tokens (pruning or clustering)")
        out = cfg.replace(keep_ratio=max(1e-6, 1.0 - target_ratio))
        return out, {"knob": "keep_ratio", "value": out.keep_ratio, "target_tokens": target}
    if cfg.clustering != "dbdpc":
        raise ValueError(
            f"--budget calibrate knows DBDPC (cutoff) and pruning-only methods (keep_ratio), not "
            f"clustering={cfg.clustering!r}; use --budget target"
        )
    found: dict[str, Any] = {}

    class Probe(Method):
        name = "calibration probe"

        def layers(self, num_layers: int) -> list[int]:
            return build_method(cfg).layers(num_layers)[:1]

        def reduce(self, signals: Any) -> Any:
            def kept(cutoff: float) -> int:
                return int(build_method(cfg.replace(cutoff=cutoff)).reduce(signals).kept.numel())

            n = signals.num_visual
            goal = max(0, min(n, math.floor(n * (1.0 - target_ratio) + 1e-9)))
            found["cutoff"], found["kept"] = search_threshold(kept, goal, 1e-4, 2.0, iters=30)
            raise _CalibrationDoneError

    pact.api.apply(model, cfg, method=Probe(cfg))
    try:
        with torch.inference_mode(), contextlib.suppress(_CalibrationDoneError):
            model(**inputs, use_cache=True, logits_to_keep=1)
    finally:
        pact.api.remove(model)
    if "cutoff" not in found:
        raise RuntimeError("calibration probe never ran (no visual tokens reached the reduction layer?)")
    out = cfg.replace(cutoff=float(found["cutoff"]))
    info = {
        "knob": "cutoff",
        "value": out.cutoff,
        "keep_ratio": out.keep_ratio,
        "target_tokens": target,
        "calibrated_kept": found["kept"],
    }
    return out, info


# ================================================================================================
# One configuration, measured
# ================================================================================================


@dataclass
class RunResult:
    """Measurements of one configuration (lists: one entry per timed repetition)."""

    label: str
    llm_prefill_s: list[float] = field(default_factory=list)
    whole_call_s: list[float] = field(default_factory=list)
    reduction_s: list[float] = field(default_factory=list)
    decode_tokens_per_s: list[float] = field(default_factory=list)
    peak_memory_bytes: list[int] = field(default_factory=list)
    peak_memory_kind: str = ""
    kv_cache_bytes: int = 0
    kv_cache_lengths: list[int] = field(default_factory=list)
    visual_before: int = 0
    visual_after: int = 0
    reduction_layers: list[int] = field(default_factory=list)
    config: dict[str, Any] | None = None
    budget: dict[str, Any] | None = None

    @property
    def reduction_ratio(self) -> float:
        return 1.0 - self.visual_after / self.visual_before if self.visual_before else 0.0

    def summary(self) -> dict[str, Any]:
        """Medians plus the raw samples, JSON-ready."""
        d = asdict(self)
        d.update(
            llm_prefill_seconds=_median(self.llm_prefill_s),
            whole_call_seconds=_median(self.whole_call_s),
            reduction_seconds=_median(self.reduction_s) if self.reduction_s else 0.0,
            decode_tokens_per_second=_median(self.decode_tokens_per_s),
            peak_memory_median_bytes=int(_median([float(x) for x in self.peak_memory_bytes]))
            if self.peak_memory_bytes
            else 0,
            reduction_ratio=self.reduction_ratio,
        )
        return d


@torch.inference_mode()
def _decode(model: Any, first_logits: torch.Tensor, cache: Any, steps: int, device: torch.device) -> float:
    """Greedy decode ``steps`` tokens on ``cache``; returns tokens per second (0 if steps == 0)."""
    if steps <= 0:
        return 0.0
    token = first_logits[:, -1].argmax(-1, keepdim=True)
    watch = Stopwatch(device)
    watch.start()
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    watch.stop()
    return steps / watch.seconds()[0]


@torch.inference_mode()
def _one_repetition(
    model: Any, inputs: Any, res: RunResult, *, timed: bool, decode_tokens: int, device: torch.device
) -> None:
    """One prefill (+ decode steps) of the model as it is now (stock or with pact applied); the
    figures go into ``res`` when ``timed``."""
    import pact.api

    engine = pact.api.engine_of(model)
    timer = ModuleTimer(model.model.language_model, device)
    whole = Stopwatch(device)
    try:
        probe = memory_probe(device)
        with probe:
            _sync(device)
            whole.start()
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            whole.stop()
            _sync(device)
        llm_s, whole_s = timer.watch.seconds()[0], whole.seconds()[0]
    finally:
        timer.close()
    cache = out.past_key_values
    if timed:
        res.llm_prefill_s.append(llm_s)
        res.whole_call_s.append(whole_s)
        res.peak_memory_bytes.append(int(probe.growth_bytes))
        res.peak_memory_kind = probe.kind
        res.kv_cache_bytes = kv_cache_bytes(cache)
        res.kv_cache_lengths = kv_cache_lengths(cache)
        if engine is not None:
            st = pact.api.stats(model)
            res.reduction_s.append(float(st.seconds_reducing))
            res.visual_before = int(sum(st.visual_before))
            res.visual_after = int(sum(st.visual_after))
            res.reduction_layers = list(st.layers)
        else:
            res.visual_before = res.visual_after = count_visual(model, inputs)
    tps = _decode(model, out.logits, cache, decode_tokens if timed else min(decode_tokens, 2), device)
    if timed and decode_tokens > 0:
        res.decode_tokens_per_s.append(tps)


def measure_interleaved(
    model: Any,
    inputs: Any,
    configs: list[tuple[str, Any]],
    *,
    repeats: int,
    warmup: int,
    decode_tokens: int,
    device: torch.device,
    log: Any = None,
) -> list[RunResult]:
    """Time every ``(label, config)`` (config None = the stock model) in interleaved rounds.

    Each round runs one prefill (+ ``decode_tokens`` greedy steps) of every configuration in turn
    (``pact.apply`` / ``pact.remove`` between them), so a change of machine load during the
    benchmark hits every configuration alike instead of biasing whichever ran at the time; the
    first ``warmup`` rounds are not timed. Returns one RunResult per configuration.
    """
    import pact.api

    results = [RunResult(label=label) for label, _ in configs]
    try:
        for rnd in range(warmup + repeats):
            timed = rnd >= warmup
            for (label, cfg), res in zip(configs, results, strict=True):
                if cfg is None:
                    pact.api.remove(model)
                else:
                    pact.api.apply(model, cfg)
                _one_repetition(model, inputs, res, timed=timed, decode_tokens=decode_tokens, device=device)
                if log and timed:
                    red_s = res.reduction_s[-1] if res.reduction_s else 0.0
                    log(
                        f"  round {rnd - warmup + 1}/{repeats}: {label}: LLM prefill "
                        f"{res.llm_prefill_s[-1]:.3f} s, reduction {red_s:.4f} s"
                    )
    finally:
        pact.api.remove(model)
    return results


def measure(
    model: Any,
    inputs: Any,
    *,
    label: str,
    repeats: int,
    warmup: int,
    decode_tokens: int,
    device: torch.device,
    log: Any = None,
) -> RunResult:
    """Time ``repeats`` prefills (after ``warmup`` untimed ones) of the model as it is now (stock or
    with pact applied), each followed by ``decode_tokens`` greedy decode steps."""
    res = RunResult(label=label)
    for i in range(warmup + repeats):
        _one_repetition(model, inputs, res, timed=i >= warmup, decode_tokens=decode_tokens, device=device)
        if log and i >= warmup:
            log(
                f"  {label}: repetition {i - warmup + 1}/{repeats}: LLM prefill {res.llm_prefill_s[-1]:.3f} s"
            )
    return res


# ================================================================================================
# The benchmark
# ================================================================================================


def budget_config(model: Any, inputs: Any, cfg: Any, ratio: float, mode: str) -> tuple[Any, dict[str, Any]]:
    """The config to time for reduction ratio ``ratio`` under the ``--budget`` mode."""
    if mode == "fixed":
        return cfg, {"mode": "fixed"}
    if mode == "target":
        return cfg.replace(target_ratio=ratio), {"mode": "target", "target_ratio": ratio}
    out, info = calibrate(model, inputs, cfg, ratio)
    return out, {"mode": "calibrate", "target_ratio": ratio, **info}


def figures(base: RunResult, red: RunResult, shape: DecoderShape, tokens: int, cfg: Any) -> dict[str, Any]:
    """Speed-ups, overhead, KV ratios and the FLOP model for one reduced run against the stock run."""
    b, r = base.summary(), red.summary()
    layer = red.reduction_layers[0] if red.reduction_layers else int(cfg.layer)
    keep = float(cfg.keep_ratio) if cfg.pruning != "none" else None
    model_flops = ideal_speedup(
        shape,
        tokens,
        layer=layer,
        visual_before=red.visual_before,
        visual_after=red.visual_after,
        keep_ratio=keep,
    )
    removed = red.visual_before - red.visual_after
    predicted_lengths = tokens_per_layer(shape.layers, tokens, {layer: removed})
    kv_expected = sum(predicted_lengths) / (shape.layers * tokens)
    kv_ratio = red.kv_cache_bytes / base.kv_cache_bytes if base.kv_cache_bytes else float("nan")
    speedup = b["llm_prefill_seconds"] / r["llm_prefill_seconds"]
    # noise checks on a shared machine: the median of the per-round ratios (rounds are interleaved,
    # so both sides of a ratio ran within seconds of each other) and the ratio of the fastest runs
    paired = [x / y for x, y in zip(base.llm_prefill_s, red.llm_prefill_s, strict=False)]
    return {
        "reduction_ratio": red.reduction_ratio,
        "visual_before": red.visual_before,
        "visual_after": red.visual_after,
        "layer": layer,
        "speedup": speedup,
        "speedup_paired_median": _median(paired),
        "speedup_best": min(base.llm_prefill_s) / min(red.llm_prefill_s),
        "speedup_whole_call": b["whole_call_seconds"] / r["whole_call_seconds"],
        "ideal_speedup": model_flops["ideal_speedup"],
        # the same with every (query, key) pair scored (a kernel that does not skip masked blocks)
        "ideal_speedup_full_attention": ideal_speedup(
            shape,
            tokens,
            layer=layer,
            visual_before=red.visual_before,
            visual_after=red.visual_after,
            keep_ratio=keep,
            causal=False,
        )["ideal_speedup"],
        "speedup_over_ideal": speedup / model_flops["ideal_speedup"],
        "reduction_overhead": r["reduction_seconds"] / b["llm_prefill_seconds"],
        "decode_speedup": (
            r["decode_tokens_per_second"] / b["decode_tokens_per_second"]
            if b["decode_tokens_per_second"]
            else float("nan")
        ),
        "kv_cache_ratio": kv_ratio,
        "kv_cache_ratio_expected": kv_expected,
        "kv_cache_lengths_expected": predicted_lengths,
        "peak_memory_ratio": (
            r["peak_memory_median_bytes"] / b["peak_memory_median_bytes"]
            if b["peak_memory_median_bytes"]
            else float("nan")
        ),
        "flops": model_flops,
    }


def targets(fig: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, each with its value and whether it is met."""
    kv_ok = abs(fig["kv_cache_ratio"] - fig["kv_cache_ratio_expected"]) < 1e-9
    return {
        "speedup_at_least_90pct_of_ideal": {
            "value": fig["speedup_over_ideal"],
            "threshold": 0.9,
            "met": fig["speedup_over_ideal"] >= 0.9,
        },
        "reduction_overhead_at_most_3pct": {
            "value": fig["reduction_overhead"],
            "threshold": 0.03,
            "met": fig["reduction_overhead"] <= 0.03,
        },
        "kv_cache_bytes_proportional": {
            "value": fig["kv_cache_ratio"],
            "expected": fig["kv_cache_ratio_expected"],
            "met": kv_ok,
        },
    }


def _row(name: str, r: dict[str, Any]) -> str:
    return (
        f"{name:<22}{r['visual_before']:>7}{r['visual_after']:>7}{r['reduction_ratio']:>8.1%}"
        f"{r['llm_prefill_seconds']:>10.3f}{r['whole_call_seconds']:>10.3f}{r['reduction_seconds']:>9.4f}"
        f"{r['decode_tokens_per_second']:>9.2f}{r['peak_memory_median_bytes'] / 2**20:>10.1f}"
        f"{r['kv_cache_bytes'] / 2**20:>8.2f}"
    )


def format_report(result: dict[str, Any]) -> str:
    head = (
        f"{'run':<22}{'vis in':>7}{'vis out':>7}{'reduced':>8}{'LLM s':>10}{'call s':>10}{'reduce s':>9}"
        f"{'dec t/s':>9}{'peak MiB':>10}{'KV MiB':>8}"
    )
    lines = [head, "-" * len(head), _row("no reduction", result["baseline"])]
    for run in result["runs"]:
        lines.append(_row(run["label"], run["measured"]))
    if result.get("identity"):
        lines.append(_row("identity (0% removed)", result["identity"]))
    lines.append("")
    for run in result["runs"]:
        f = run["figures"]
        lines.append(
            f"{run['label']}: speedup {f['speedup']:.2f}x (paired {f['speedup_paired_median']:.2f}x, best "
            f"{f['speedup_best']:.2f}x, whole call {f['speedup_whole_call']:.2f}x), "
            f"ideal {f['ideal_speedup']:.2f}x -> {f['speedup_over_ideal']:.0%} of ideal; reduction overhead "
            f"{f['reduction_overhead']:.2%} of the unreduced prefill; KV bytes x{f['kv_cache_ratio']:.4f} "
            f"(expected x{f['kv_cache_ratio_expected']:.4f}); decode x{f['decode_speedup']:.2f}"
        )
    if result.get("identity"):
        slow = result["identity"]["slowdown_vs_stock"]
        lines.append(f"engine with nothing removed: LLM prefill x{slow:.3f} of the stock model")
    lines.append(f"peak memory: {result['baseline']['peak_memory_kind']}")
    return "\n".join(lines)


def plot_speedup(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Speed-up vs reduction ratio: the FLOP model's ideal curve and the measured runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pact.eval.plot import save_figure

    curve = result["ideal_curve"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.plot(
        [c[0] for c in curve],
        [c[1] for c in curve],
        color="0.3",
        lw=1.5,
        label="ideal (FLOP model, reduction cost included)",
    )
    ax.plot(
        [c[0] for c in curve], [0.9 * c[1] for c in curve], color="0.6", lw=1, ls="--", label="90% of ideal"
    )
    runs = result["runs"]
    xs = [r["figures"]["reduction_ratio"] for r in runs]
    ax.scatter(
        xs,
        [r["figures"]["speedup"] for r in runs],
        color="C0",
        zorder=3,
        label="measured: LLM prefill (reduction included)",
    )
    ax.scatter(
        xs,
        [r["figures"]["speedup_whole_call"] for r in runs],
        color="C1",
        marker="x",
        zorder=3,
        label="measured: whole call (tiny vision tower)",
    )
    if result.get("identity"):
        ax.scatter(
            [0.0],
            [1.0 / result["identity"]["slowdown_vs_stock"]],
            color="C3",
            marker="v",
            zorder=3,
            label="measured: engine with nothing removed",
        )
    m = result["machine"]
    where = m.get("gpu") or f"CPU {m['cpu']} ({m['torch_threads']} threads)"
    ax.set_title(
        f"{result['method']} at layer {runs[0]['figures']['layer'] if runs else '?'}: "
        f"{result['input']['tokens']} tokens, {result['input']['visual_tokens']} visual\n"
        f"{where}, {m['date'][:10]}",
        fontsize=9,
    )
    ax.set_xlabel("visual-token reduction ratio")
    ax.set_ylabel("prefill speed-up (x)")
    ax.set_xlim(0, 1)
    lows = [r["figures"][k] for r in runs for k in ("speedup", "speedup_whole_call")]
    if result.get("identity"):
        lows.append(1.0 / result["identity"]["slowdown_vs_stock"])
    ax.set_ylim(bottom=min([0.8, *[0.9 * x for x in lows]]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return save_figure(fig, path, dpi=120)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `pact bench prefill` (also used by pact.bench's subparser)."""
    p.add_argument(
        "--model",
        type=existing_dir,
        help="local checkpoint directory (default: a random 0.5B-class Qwen2-VL)",
    )
    p.add_argument("--tiny", action="store_true", help="tiny random model (tests; seconds)")
    p.add_argument(
        "--layers", type=int_at_least(1), help="decoder layers of the random model (default 24; --tiny: 4)"
    )
    p.add_argument(
        "--visual-tokens",
        type=int_at_least(1),
        default=None,
        help="resize the image to about this many visual tokens (default 3000; --tiny: 64)",
    )
    p.add_argument("--image", type=existing_file, help="image path (default: the bundled photo)")
    add_config_arguments(p)
    p.add_argument(
        "--target-ratio",
        type=reduction_ratio,
        default=0.7,
        help="visual-token reduction ratio to reach, in [0, 1) (default 0.7)",
    )
    p.add_argument(
        "--budget",
        choices=["calibrate", "target", "fixed"],
        default="calibrate",
        help="how the ratio is reached (see the module help; default calibrate)",
    )
    p.add_argument(
        "--sweep", type=ratio_list, default=(), help="extra reduction ratios to measure, e.g. 0.3,0.5,0.85"
    )
    p.add_argument(
        "--identity",
        action="store_true",
        help="also time the engine with nothing removed (diagnoses the fixed costs)",
    )
    p.add_argument(
        "--repeats", type=int_at_least(1), default=3, help="timed repetitions per configuration (median)"
    )
    p.add_argument(
        "--warmup", type=int_at_least(0), default=1, help="untimed prefills before each configuration"
    )
    p.add_argument(
        "--decode-tokens", type=int_at_least(0), default=16, help="greedy decode steps after each prefill"
    )
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--threads", type=int_at_least(1), help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=output_file, help="write the figures to this JSON file")
    p.add_argument("--plot", type=output_file, help="write the speed-up vs reduction-ratio PNG here")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by parsed ``args``; returns the JSON-ready result."""
    import pact.api
    from pact import testing
    from pact.config import load_config

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # The config first: a typo in --config/--set fails here, not after the model is built.
    overrides = parse_overrides(args.set, "--set")
    base_cfg = load_config(args.config, **overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    load_before = load_average()
    t0 = time.perf_counter()
    if args.model:
        model, processor, what = load_checkpoint(args.model, dtype, args.attn)
    else:
        model, processor, what = build_random_model(
            tiny=args.tiny, layers=args.layers, dtype=dtype, attn=args.attn
        )
    model.to(device)
    build_s = time.perf_counter() - t0
    log(f"pact bench prefill: {what} (built in {build_s:.1f} s)")
    from PIL import Image

    image = Image.open(args.image).convert("RGB") if args.image else testing.demo_photo()
    visual_tokens = args.visual_tokens or (64 if args.tiny else 3000)
    inputs = build_inputs(processor, image, visual_tokens).to(device)
    tokens = int(inputs["input_ids"].shape[1])
    n_visual = count_visual(model, inputs)
    shape = DecoderShape.from_config(model.config.get_text_config())
    if args.tiny and base_cfg.layer >= shape.layers and not overrides:
        base_cfg = base_cfg.replace(layer=shape.layers // 2)  # the tiny model is shallower than L=4
    log(
        f"input: {tokens} tokens, {n_visual} visual; config {base_cfg.describe()}; device {device}, "
        f"{args.dtype}, {args.attn}, {torch.get_num_threads()} threads; load {load_before}"
    )

    ratios = [args.target_ratio, *args.sweep]
    planned: list[tuple[str, Any, dict[str, Any], float]] = []
    for ratio in ratios:
        try:
            cfg, budget = budget_config(model, inputs, base_cfg, ratio, args.budget)
            pact.api.apply(model, cfg)  # validates the config on this model before anything is timed
            pact.api.remove(model)
        except ValueError as e:
            raise SystemExit(f"pact bench prefill: --budget {args.budget} at ratio {ratio:g}: {e}") from e
        label = f"{cfg.pruning}+{cfg.clustering} r={ratio:g}"
        log(f"{label}: {budget}")
        planned.append((label, cfg, budget, ratio))
    configs: list[tuple[str, Any]] = [("no reduction", None)] + [(p[0], p[1]) for p in planned]
    if args.identity:
        # The engine's path with nothing removed (identity method at the same layer): what the hooks,
        # the q/k signals and the explicit 4-D float mask cost before any token is saved.
        configs.append(("identity (0% removed)", base_cfg.replace(pruning="none", clustering="none")))
    measured = measure_interleaved(
        model,
        inputs,
        configs,
        repeats=args.repeats,
        warmup=args.warmup,
        decode_tokens=args.decode_tokens,
        device=device,
        log=log,
    )
    baseline = measured[0]
    runs = []
    for (label, cfg, budget, ratio), red in zip(planned, measured[1:], strict=False):
        red.config, red.budget = cfg.to_dict(), budget
        fig = figures(baseline, red, shape, tokens, cfg)
        runs.append(
            {
                "label": label,
                "target_ratio": ratio,
                "budget": budget,
                "measured": red.summary(),
                "figures": fig,
                "targets": targets(fig),
            }
        )
    identity = None
    if args.identity:
        identity = measured[-1].summary()
        base_s = baseline.summary()["llm_prefill_seconds"]
        identity["slowdown_vs_stock"] = identity["llm_prefill_seconds"] / base_s
    main_run = runs[0]
    keep = float(base_cfg.keep_ratio) if base_cfg.pruning != "none" else None
    result: dict[str, Any] = {
        "benchmark": "prefill",
        "command": "pact bench prefill " + " ".join(getattr(args, "argv", []) or []),
        "machine": {**machine_info(device), "load_before": load_before, "load_after": load_average()},
        "model": {
            "description": what,
            "random_weights": not args.model,
            "dtype": args.dtype,
            "attention": args.attn,
            "build_seconds": build_s,
            "shape": asdict(shape),
        },
        "input": {
            "tokens": tokens,
            "visual_tokens": n_visual,
            "text_tokens": tokens - n_visual,
            "prompt": PROMPT,
            "image_grid_thw": inputs["image_grid_thw"].tolist() if "image_grid_thw" in inputs else None,
        },
        "method": f"{base_cfg.pruning}+{base_cfg.clustering}",
        "flop_model": "per layer: q/k/v/o projections (GQA) + SwiGLU MLP (3 matmuls) + causal attention "
        "(T(T+1)/2 pairs x 4*H*d); LM head for the last token; norms/softmax/rotary omitted; "
        "reduced side adds layer-L q/k of all tokens, DBDPC distances and retrieval distances",
        "repeats": args.repeats,
        "design": f"{args.warmup} untimed + {args.repeats} timed interleaved rounds (every configuration "
        "once per round, stock first); medians",
        "baseline": baseline.summary(),
        "runs": runs,
        "identity": identity,
        # headline figures: the --target-ratio run
        **{
            k: main_run["figures"][k]
            for k in (
                "speedup",
                "ideal_speedup",
                "speedup_over_ideal",
                "speedup_paired_median",
                "speedup_best",
                "speedup_whole_call",
                "reduction_ratio",
                "reduction_overhead",
                "kv_cache_ratio",
                "kv_cache_ratio_expected",
                "decode_speedup",
                "peak_memory_ratio",
            )
        },
        "prefill_seconds": main_run["measured"]["llm_prefill_seconds"],
        "prefill_seconds_baseline": baseline.summary()["llm_prefill_seconds"],
        "reduction_seconds": main_run["measured"]["reduction_seconds"],
        "decode_tokens_per_second": main_run["measured"]["decode_tokens_per_second"],
        "decode_tokens_per_second_baseline": baseline.summary()["decode_tokens_per_second"],
        "peak_memory_bytes": main_run["measured"]["peak_memory_median_bytes"],
        "peak_memory_bytes_baseline": baseline.summary()["peak_memory_median_bytes"],
        "peak_memory_kind": baseline.peak_memory_kind,
        "kv_cache_bytes": main_run["measured"]["kv_cache_bytes"],
        "kv_cache_bytes_baseline": baseline.kv_cache_bytes,
        "targets": main_run["targets"],
        "ideal_curve": ideal_curve(
            shape, tokens, layer=main_run["figures"]["layer"], visual=n_visual, keep_ratio=keep
        ),
    }
    return result


report = format_report
plot = plot_speedup
