"""Run-level metrics of an evaluation: visual tokens, reduction ratios, timings and peak memory.

The lmms-eval models (``pact.eval.models``) record one ``SampleRecord`` per request and one
``BatchRecord`` per model call, then ``summarize`` turns them into the numbers of the metrics JSON:

=============================== ==================================================================
key                             definition
=============================== ==================================================================
reduction_ratio                 1 - sum(visual after) / sum(visual before), token-weighted over the
                                run (after = tokens left after the LAST reduction step of a sample)
layer_mean_reduction_ratio      1 - sum_layers sum_samples present / sum_samples (n_layers * before):
                                the share of (layer, visual token) pairs the decoder did not process
                                in the prefill; the number to compare for progressive methods
equivalent_reduction_ratio      the one-step reduction at ``reference_layer`` with the same layer
                                mean: layer_mean * n_layers / (n_layers - reference_layer); equals
                                reduction_ratio for one-step methods, and gives VTW / ToMe their
                                "equivalent" x position (the reference's L_eq convention)
prefill_seconds_mean            time to first token per model call: from the call until the first
                                forward returned (vision encoder + LLM prefill + reduction)
decode_tokens_per_second        generated tokens after the first one / time after the first forward
end_to_end_seconds_mean         per model call: preprocessing (processor) + the whole model call
                                (vision encoder, prefill, decode)
samples_per_second              requests / sum of end-to-end seconds
peak_memory_gb_max / _mean      peak memory of each model call, the counter reset before each call:
                                CUDA ``max_memory_allocated`` on GPU; on CPU the process peak
                                resident set (VmHWM, reset through /proc/self/clear_refs), which
                                includes the weights and the Python heap (``memory_kind`` says which)
=============================== ==================================================================

Timings are per model call (a batch); with batch size 1 they are per sample.
"""

from __future__ import annotations

import math
import re
import resource
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

METRICS_VERSION = 1


# ---------------------------------------------------------------------------------------------------
# Records


@dataclass
class SampleRecord:
    """One request (one prompt in one batch) of the run."""

    task: str
    doc_id: Any
    kind: str  # "generate_until" | "generate_until_multi_round" | "loglikelihood"
    visual_before: int
    visual_after: int
    layer_mean_visual: float  # mean over decoder layers of the visual tokens present in the prefill
    batch: int  # index of the BatchRecord it ran in
    padding: bool = False  # an lmms-eval padding duplicate (data parallel); left out of summaries


@dataclass
class BatchRecord:
    """One model call (``generate`` or one forward for log-likelihoods)."""

    kind: str
    size: int
    preprocess_s: float
    prefill_s: float
    decode_s: float
    e2e_s: float
    vision_s: float | None
    generated_tokens: int  # all new tokens of the call (0 for log-likelihood)
    decode_tokens: int  # new tokens after the first one of each sample
    seconds_reducing: float
    peak_memory_gb: float | None


# ---------------------------------------------------------------------------------------------------
# Pure helpers


def reduction_ratio(before: Iterable[int], after: Iterable[int]) -> float:
    """``1 - sum(after) / sum(before)`` (0.0 when there were no visual tokens)."""
    total_before = sum(before)
    return 0.0 if total_before == 0 else 1.0 - sum(after) / total_before


def layer_mean_visual(before: int, steps: Sequence[tuple[int, int]], n_layers: int) -> float:
    """Mean over the ``n_layers`` decoder layers of the visual tokens a layer processes in the prefill.

    Args:
        before: visual tokens entering the decoder.
        steps: ``(layer, tokens left)`` per reduction step, the step running BEFORE ``layer``.
        n_layers: decoder depth.
    """
    if n_layers <= 0:
        return float(before)
    present = [before] * n_layers
    for layer, left in sorted(steps):
        for i in range(max(layer, 0), n_layers):
            present[i] = left
    return sum(present) / n_layers


def equivalent_reduction_ratio(layer_mean_ratio: float, n_layers: int, reference_layer: int) -> float:
    """The reduction ratio a single step before ``reference_layer`` needs to reach ``layer_mean_ratio``.

    Not clipped: a value above 1 says the method removed more than any one-step reduction at that
    layer could.
    """
    remaining = n_layers - reference_layer
    if n_layers <= 0 or remaining <= 0:
        return layer_mean_ratio
    return layer_mean_ratio * n_layers / remaining


_PRUNING_LABELS = {"withdraw": "vtw"}


def method_label(config: Mapping[str, Any]) -> str:
    """Short method name of an effective config (``PactConfig.to_dict()``), used to group runs in
    reports and plots: ``no_reduction``, ``pact`` (EUTI + DBDPC), ``dbdpc``, ``euti``, ``fastv``,
    ``vtw``, ``tome``, ``kmeans``, ``agglomerative_single`` ..., ``fastv+tome`` for other pairs."""
    if not config.get("reduction", True):
        return "no_reduction"
    pruning = str(config.get("pruning", "none"))
    clustering = str(config.get("clustering", "none"))
    if pruning == "euti" and clustering == "dbdpc":
        name = "pact"
    else:
        parts = [_PRUNING_LABELS.get(pruning, pruning)] if pruning != "none" else []
        if clustering != "none":
            extra = f"_{config.get('linkage', 'single')}" if clustering == "agglomerative" else ""
            parts.append(clustering + extra)
        name = "+".join(parts) or "identity"
    return name + ("_progressive" if config.get("progressive") and clustering != "tome" else "")


# Methods with their own stage schedule: (pruning value, config key of the layers, of their depth).
_STAGED_PRUNING = {"v2drop": ("v2drop_layers", "v2drop_depth"), "pdrop": ("pdrop_layers", "pdrop_depth")}


def reference_layer(config: Mapping[str, Any], n_layers: int | None = None) -> int:
    """The layer ``equivalent_reduction_ratio`` refers to: VTW's and ToMe's "equivalent layer" when
    they have one (the reference's L_eq), the first stage of a method with its own stage schedule
    (V2Drop, PyramidDrop: their layers scaled to the model's ``n_layers``), else the reduction layer."""
    layer = int(config.get("layer", 0))
    if config.get("pruning") == "withdraw" and int(config.get("vtw_equivalent_layer", -1)) >= 0:
        return int(config["vtw_equivalent_layer"])
    if config.get("clustering") == "tome":
        return int(config.get("tome_equivalent_layer", layer))
    staged = _STAGED_PRUNING.get(str(config.get("pruning")))
    if staged is not None and n_layers:
        from pact.ops.stages import parse_layers, scale_layers

        layers_key, depth_key = staged
        return scale_layers(parse_layers(str(config[layers_key])), int(config[depth_key]), n_layers)[0]
    return layer


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def summarize(
    samples: Sequence[SampleRecord],
    batches: Sequence[BatchRecord],
    *,
    n_layers: int,
    reference_layer: int,
) -> dict[str, Any]:
    """The run-level numbers (see the module docstring) from all ranks' records.

    Padding duplicates (data-parallel filler requests) are left out of the token counts; batches
    are kept whole (their time was spent).
    """
    real = [s for s in samples if not s.padding]
    before = [s.visual_before for s in real]
    after = [s.visual_after for s in real]
    total_before, total_after = sum(before), sum(after)
    lm = sum(s.layer_mean_visual for s in real)
    layer_mean_ratio = 0.0 if total_before == 0 else 1.0 - lm / total_before
    gen = [b for b in batches if b.kind.startswith("generate_until")]  # multi-round too
    decode_s = sum(b.decode_s for b in gen)
    decode_tokens = sum(b.decode_tokens for b in gen)
    e2e_total = sum(b.e2e_s for b in batches)
    peaks = [b.peak_memory_gb for b in batches if b.peak_memory_gb is not None]
    vision = [b.vision_s for b in batches if b.vision_s is not None]
    return {
        "num_requests": len(real),
        "num_model_calls": len(batches),
        "visual_tokens_before": total_before,
        "visual_tokens_after": total_after,
        "visual_tokens_before_mean": _mean(before),
        "visual_tokens_after_mean": _mean(after),
        "reduction_ratio": reduction_ratio(before, after),
        "layer_mean_reduction_ratio": layer_mean_ratio,
        "equivalent_reduction_ratio": equivalent_reduction_ratio(layer_mean_ratio, n_layers, reference_layer),
        "reference_layer": reference_layer,
        "n_layers": n_layers,
        "seconds_reducing_total": sum(b.seconds_reducing for b in batches),
        "seconds_reducing_mean": _mean([b.seconds_reducing for b in batches]),
        "prefill_seconds_mean": _mean([b.prefill_s for b in batches]),
        "vision_seconds_mean": _mean(vision),
        "decode_tokens": decode_tokens,
        "decode_seconds_total": decode_s,
        "decode_tokens_per_second": _ratio(decode_tokens, decode_s),
        "generated_tokens": sum(b.generated_tokens for b in gen),
        "preprocess_seconds_total": sum(b.preprocess_s for b in batches),
        "end_to_end_seconds_total": e2e_total,
        "end_to_end_seconds_mean": _mean([b.e2e_s for b in batches]),
        "samples_per_second": _ratio(len(real), e2e_total),
        "peak_memory_gb_max": max(peaks) if peaks else None,
        "peak_memory_gb_mean": _mean(peaks),
    }


def summarize_tasks(
    samples: Sequence[SampleRecord], *, n_layers: int, reference_layer: int
) -> dict[str, dict[str, Any]]:
    """Per task: requests, visual tokens before/after and the three reduction ratios."""
    out: dict[str, dict[str, Any]] = {}
    for task in sorted({s.task for s in samples if not s.padding}):
        rows = [s for s in samples if s.task == task and not s.padding]
        before = [s.visual_before for s in rows]
        after = [s.visual_after for s in rows]
        total = sum(before)
        layer_mean = 0.0 if total == 0 else 1.0 - sum(s.layer_mean_visual for s in rows) / total
        out[task] = {
            "num_requests": len(rows),
            "visual_tokens_before": total,
            "visual_tokens_after": sum(after),
            "reduction_ratio": reduction_ratio(before, after),
            "layer_mean_reduction_ratio": layer_mean,
            "equivalent_reduction_ratio": equivalent_reduction_ratio(layer_mean, n_layers, reference_layer),
        }
    return out


def records_to_json(samples: Sequence[SampleRecord], batches: Sequence[BatchRecord]) -> dict[str, list]:
    """Plain-JSON lists of the records (for the metrics file)."""
    return {"requests": [asdict(s) for s in samples], "model_calls": [asdict(b) for b in batches]}


# ---------------------------------------------------------------------------------------------------
# Table


_TABLE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("requests", "num_requests", "{:d}"),
    ("visual tokens before (mean)", "visual_tokens_before_mean", "{:.1f}"),
    ("visual tokens after (mean)", "visual_tokens_after_mean", "{:.1f}"),
    ("reduction ratio", "reduction_ratio", "{:.4f}"),
    ("layer-mean reduction ratio", "layer_mean_reduction_ratio", "{:.4f}"),
    ("equivalent reduction ratio", "equivalent_reduction_ratio", "{:.4f}"),
    ("seconds in reduction (mean/call)", "seconds_reducing_mean", "{:.4f}"),
    ("prefill = time to first token (s)", "prefill_seconds_mean", "{:.4f}"),
    ("vision encoder (s, mean/call)", "vision_seconds_mean", "{:.4f}"),
    ("decode tokens/s", "decode_tokens_per_second", "{:.2f}"),
    ("end-to-end (s, mean/call)", "end_to_end_seconds_mean", "{:.4f}"),
    ("samples/s", "samples_per_second", "{:.3f}"),
    ("peak memory (GB, max)", "peak_memory_gb_max", "{:.3f}"),
    ("peak memory (GB, mean)", "peak_memory_gb_mean", "{:.3f}"),
)


def format_table(summary: dict[str, Any], *, title: str = "", memory_kind: str = "") -> str:
    """A two-column text table of a summary (the one printed at the end of a run)."""
    rows = []
    for label, key, fmt in _TABLE_ROWS:
        value = summary.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            text = "-"
        else:
            text = fmt.format(int(value) if fmt == "{:d}" else value)
        if key.startswith("peak_memory") and memory_kind:
            label = f"{label} [{memory_kind}]"
        rows.append((label, text))
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    rule = "-" * (width + vwidth + 5)
    lines = [title, rule] if title else [rule]
    lines += [f"| {label:<{width}} | {text:>{vwidth}} |" for label, text in rows]
    lines.append(rule)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Measuring: memory and per-call timing


class MemoryMeter:
    """Peak memory of one model call, with the peak counter reset before the call.

    CUDA devices: ``torch.cuda.max_memory_allocated`` (tensors only, weights included). CPU: the
    process peak resident set size (VmHWM), reset by writing 5 to /proc/self/clear_refs (Linux); when
    that is not possible the lifetime peak (``ru_maxrss``) is reported and ``kind`` says so.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.kind = "cuda_max_memory_allocated"
        elif self._can_reset_rss():
            self.kind = "cpu_peak_rss"
        else:
            self.kind = "cpu_peak_rss_not_reset"

    @staticmethod
    def _can_reset_rss() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return _vm_hwm_kb() is not None
        except OSError:
            return False

    def reset(self) -> None:
        if self.kind == "cuda_max_memory_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "cpu_peak_rss":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak_gb(self) -> float | None:
        if self.kind == "cuda_max_memory_allocated":
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        kb = _vm_hwm_kb() if self.kind == "cpu_peak_rss" else None
        if kb is None:
            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return kb * 1024 / 1e9


def _vm_hwm_kb() -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"VmHWM:\s+(\d+)\s*kB", f.read())
    except OSError:
        return None
    return int(m.group(1)) if m else None


class CallTimer:
    """Times model calls with hooks: time to first forward (prefill), the rest (decode) and the
    vision encoder. On CUDA it synchronizes at the measurement points (once after the first forward,
    around the vision encoder, at the end), so the numbers are device time, not launch time.

        timer = CallTimer(model, vision_module, device)
        timer.start()
        out = model.generate(...)
        t = timer.stop()    # {"prefill_s", "decode_s", "call_s", "vision_s", "forwards"}
        timer.close()
    """

    def __init__(self, model: nn.Module, vision: nn.Module | None, device: torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._handles = [model.register_forward_hook(self._after_forward)]
        if vision is not None:
            self._handles.append(vision.register_forward_pre_hook(self._vision_in))
            self._handles.append(vision.register_forward_hook(self._vision_out))
        self._reset()

    def _reset(self) -> None:
        self.t0 = 0.0
        self.t_first: float | None = None
        self.forwards = 0
        self.vision_s = 0.0
        self._vision_t0: float | None = None
        self.active = False

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self.active:
            return
        if self.forwards == 0:
            self.t_first = self._now()
        self.forwards += 1

    def _vision_in(self, module: nn.Module, args: Any) -> None:
        if self.active and self._vision_t0 is None:
            self._vision_t0 = self._now()

    def _vision_out(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.active and self._vision_t0 is not None:
            self.vision_s += self._now() - self._vision_t0
            self._vision_t0 = None

    def start(self) -> None:
        self._reset()
        self.active = True
        self.t0 = self._now()

    def stop(self) -> dict[str, float]:
        end = self._now()
        self.active = False
        first = self.t_first if self.t_first is not None else end
        return {
            "call_s": end - self.t0,
            "prefill_s": first - self.t0,
            "decode_s": end - first,
            "vision_s": self.vision_s,
            "forwards": self.forwards,
        }

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@dataclass
class RunRecorder:
    """Accumulates the records of one process; ``merge`` joins the ranks' recorders."""

    samples: list[SampleRecord] = field(default_factory=list)
    batches: list[BatchRecord] = field(default_factory=list)

    def add_batch(self, batch: BatchRecord, samples: Sequence[SampleRecord]) -> None:
        index = len(self.batches)
        self.batches.append(batch)
        for s in samples:
            s.batch = index
            self.samples.append(s)

    @staticmethod
    def merge(parts: Sequence[RunRecorder]) -> RunRecorder:
        out = RunRecorder()
        for part in parts:
            offset = len(out.batches)
            out.batches.extend(part.batches)
            for s in part.samples:
                out.samples.append(SampleRecord(**{**asdict(s), "batch": s.batch + offset}))
        return out
