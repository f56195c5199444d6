"""`pact calibrate`: choose the reduction layer L for a model (paper section 3, Fig. 3) and,
optionally, the DBDPC cutoff (and EUTI keep ratio) that reach a requested reduction ratio.

    pact calibrate --model /ckpt/llava-onevision-qwen2-7b-ov-hf --images a.jpg b.jpg --out runs/cal
    pact calibrate --tiny qwen2_vl --target-ratio 0.7          # tiny random model, bundled images

What it does:

1. Runs the stock model (no reduction) on a few calibration inputs (images / videos given on the
   command line, or the bundled default set) and, at every decoder layer, takes the keys of the
   visual patch tokens exactly as that layer computes them (``ModelAdapter.queries_keys`` on the
   hidden states entering the layer, as the engine does at L). By default these are the
   **post-RoPE** keys with the KV heads concatenated, i.e. exactly the vectors DBDPC compares
   (``cluster_features="keys_rope"``, the reference's ``current_k_cosine``); ``--features keys``
   uses the pre-RoPE keys.
2. Per layer and input: the cosine distance ``max(0, 1 - cos)`` (DBDPC's distance) over every pair
   of visual tokens -- its maximum (the paper's statistic), mean and percentiles, computed in row
   blocks (memory O(N x block), percentiles from a 4000-bin histogram on [0, 2], i.e. to 5e-4).
   Per layer the values are averaged over the inputs.
3. The paper picks "the earliest layer whose keys' maximum distance is large enough" and leaves the
   threshold open in the text we have. Rule used here (``choose_layer``): among the candidate layers
   ``[min_layer, max_layer]`` (default ``[0, n_layers // 2]``: a late layer saves little), L is the
   earliest whose statistic reaches ``threshold x`` the largest statistic of the candidates
   (``--rule relative``, default threshold 0.5), or reaches ``threshold`` itself as a cosine distance
   (``--rule absolute``). The relative form is scale-free: the cosine scale of keys differs between
   families (head count, GQA, RoPE flavour), while "the keys have spread out to at least half of
   what they reach in the early network" means the same thing everywhere. docs/CONFIGDOC.md records
   the choice.
4. ``--target-ratio R``: the keep ratio is fixed (``--keep-ratio``, or ``1 - 0.631 R``, the paper's
   split: at its 71.3 % point EUTI removes 45 of the 71.3 points, so R = 0.713 gives 0.55), then the
   DBDPC cutoff is bisected so that PACT itself (the registered method, on the layer-L signals of the
   calibration inputs) removes the share of visual tokens closest to R, token-weighted over inputs.
5. Writes ``config.json`` (the base config with layer, and cutoff/keep ratio when calibrated; it
   loads with ``pact.load_config`` and applies with ``pact.apply``), ``calibration.json`` (every
   statistic) and ``key_distances.png`` (the per-layer curve, the paper's Fig. 3 for this model).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pact.ops.dbdpc import normalize_rows

DEFAULT_OUT = Path("outputs/calibrate")
DEFAULT_THRESHOLD = 0.5
RULES = ("relative", "absolute")
FEATURES = ("keys_rope", "keys")
PERCENTILES = (5, 25, 50, 75, 95, 99)
STATISTICS = ("max", "p99", "p95", "p75", "p50", "mean")
HIST_BINS = 4000  # on [0, 2]: percentiles resolved to 5e-4
PAPER_PRUNE_SHARE = 0.45 / 0.713  # EUTI's share of PACT's reduction at the paper's 71.3 % point
QUESTION = "Describe this image."
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")


# ---------------------------------------------------------------------------------------------------
# Pure statistics


def key_distance_stats(
    keys: torch.Tensor, *, percentiles: Sequence[int] = PERCENTILES, block_rows: int = 1024
) -> dict[str, float]:
    """Statistics of the pairwise cosine distances ``max(0, 1 - cos)`` between the rows of ``keys``.

    Args:
        keys: (N, F) vectors of one input's visual tokens (any float dtype; computed in float32).
        percentiles: which percentiles of the N (N - 1) / 2 distances to report (0-100).
        block_rows: rows per matmul block (extra memory O(block_rows x N)).
    Returns:
        {"max", "mean", "p<q>" for each q, "pairs"} over the pairs i < j. Percentiles come from a
        histogram of ``HIST_BINS`` bins on [0, 2] (upper bin edge, so within 2 / HIST_BINS above the
        exact value); max and mean are exact. Fewer than two rows: every value 0.
    """
    if keys.dim() != 2:
        raise ValueError(f"keys must be (N, F), got shape {tuple(keys.shape)}")
    if not bool(torch.isfinite(keys).all()):
        raise ValueError("keys contain NaN/inf values")
    n = int(keys.shape[0])
    out = {"max": 0.0, "mean": 0.0, "pairs": n * (n - 1) // 2, **{f"p{q}": 0.0 for q in percentiles}}
    if n < 2:
        return out
    x = normalize_rows(keys)
    hist = torch.zeros(HIST_BINS, dtype=torch.float64, device=x.device)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    best = torch.zeros((), dtype=torch.float32, device=x.device)
    cols = torch.arange(n, device=x.device)
    for a in range(0, n - 1, block_rows):
        b = min(n - 1, a + block_rows)
        dist = (1.0 - x[a:b] @ x.T).clamp_(min=0.0)  # (r, N), DBDPC's distance
        upper = cols[None, :] > torch.arange(a, b, device=x.device)[:, None]  # pairs i < j only
        values = dist[upper]
        best = torch.maximum(best, values.max())
        total += values.double().sum()
        idx = (values * (HIST_BINS / 2.0)).long().clamp_(0, HIST_BINS - 1)
        hist += torch.bincount(idx, minlength=HIST_BINS).double()
    pairs = n * (n - 1) // 2
    cum = hist.cumsum(0)
    out["max"] = float(best)
    out["mean"] = float(total / pairs)
    for q in percentiles:
        rank = max(1.0, math.ceil(q / 100.0 * pairs))  # the rank-th smallest distance (nearest rank)
        bin_index = int(torch.searchsorted(cum, torch.tensor(rank, dtype=torch.float64, device=cum.device)))
        out[f"p{q}"] = min(2.0, (bin_index + 1) * 2.0 / HIST_BINS)
    return out


def choose_layer(
    values: Sequence[float],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    rule: str = "relative",
    min_layer: int = 0,
    max_layer: int | None = None,
) -> tuple[int, float]:
    """The paper's rule: the earliest layer whose key-distance statistic is large enough.

    Args:
        values: the statistic of every decoder layer (index = layer).
        threshold: "relative": fraction in (0, 1] of the largest value among the candidate layers;
            "absolute": a cosine distance in (0, 2].
        rule: "relative" or "absolute".
        min_layer, max_layer: the candidate layers (inclusive); max_layer None = len(values) // 2.
    Returns:
        (layer, the value it had to reach).
    Raises:
        ValueError: bad arguments, or no candidate layer reaches the threshold (the message gives
        the largest value found).
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    n = len(values)
    hi = n // 2 if max_layer is None else max_layer
    if not 0 <= min_layer <= hi < n:
        raise ValueError(f"candidate layers [{min_layer}, {hi}] are not within the model's {n} layers")
    if rule == "relative" and not 0 < threshold <= 1:
        raise ValueError(f"a relative threshold must be in (0, 1], got {threshold}")
    if rule == "absolute" and not 0 < threshold <= 2:
        raise ValueError(f"an absolute threshold (a cosine distance) must be in (0, 2], got {threshold}")
    candidates = list(range(min_layer, hi + 1))
    top = max(values[i] for i in candidates)
    if top <= 0:
        raise ValueError(
            f"the visual tokens' keys are identical in every candidate layer {min_layer}..{hi} "
            "(largest distance 0): no layer separates them"
        )
    needed = threshold * top if rule == "relative" else threshold
    for i in candidates:
        if values[i] >= needed:
            return i, needed
    raise ValueError(
        f"no layer in {min_layer}..{hi} reaches the absolute threshold {threshold} (largest value "
        f"{top:.4f} at layer {candidates[[values[i] for i in candidates].index(top)]}); lower --threshold "
        "or use --rule relative"
    )


def keep_ratio_for(target_ratio: float) -> float:
    """EUTI keep ratio for a total reduction ``target_ratio`` with the paper's split of the reduction
    between pruning and clustering (0.55 at 71.3 %)."""
    return 1.0 - PAPER_PRUNE_SHARE * target_ratio


# ---------------------------------------------------------------------------------------------------
# Inputs


def default_samples() -> list[dict[str, Any]]:
    """The bundled calibration set: the bundled photograph and three synthetic scenes."""
    from pact import testing

    images = [testing.demo_photo()] + [testing.sample_image(seed, size=(448, 336)) for seed in range(3)]
    return [{"question": QUESTION, "images": [im]} for im in images]


def load_image(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def load_video(path: Path, frames: int) -> list[Any]:
    """``frames`` RGB frames sampled uniformly from a directory of images (sorted by name) or a video
    file (decoded with PyAV)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"video directory {path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        pick = _uniform(len(files), frames)
        return [load_image(files[i]) for i in pick]
    import av

    with av.open(str(path)) as container:
        decoded = [f.to_image().convert("RGB") for f in container.decode(video=0)]
    if not decoded:
        raise ValueError(f"video {path} has no frames")
    return [decoded[i] for i in _uniform(len(decoded), frames)]


def _uniform(total: int, count: int) -> list[int]:
    if total <= count:
        return list(range(total))
    return [round(i * (total - 1) / (count - 1)) if count > 1 else 0 for i in range(count)]


def build_inputs(processor: Any, sample: Mapping[str, Any], device: Any, max_pixels: int | None) -> Any:
    """One sample (``{"question", "images": [PIL], "videos": [[PIL]]}``) tokenized by the model's
    processor, on ``device``."""
    from pact.testing import prompt_messages

    text = processor.apply_chat_template(prompt_messages(sample), tokenize=False, add_generation_prompt=True)
    kwargs: dict[str, Any] = {}
    if sample.get("images"):
        kwargs["images"] = [list(sample["images"])]
    if sample.get("videos"):
        kwargs["videos"] = [list(v) for v in sample["videos"]]
    if max_pixels is not None and "Qwen" in type(getattr(processor, "image_processor", None)).__name__:
        kwargs["images_kwargs"] = {"max_pixels": max_pixels, "min_pixels": min(max_pixels, 56 * 56)}
    return processor(text=[text], return_tensors="pt", **kwargs).to(device)


# ---------------------------------------------------------------------------------------------------
# Model passes


@dataclass
class LayerStats:
    """Key-distance statistics of one decoder layer, averaged over the calibration inputs."""

    layer: int
    values: dict[str, float]
    per_input_max: list[float] = field(default_factory=list)


def _visual_mask(adapter: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
    ids = inputs["input_ids"]
    mask = adapter.candidate_mask(ids, dict(inputs))
    if not bool(mask.any()):
        raise ValueError("a calibration input has no visual tokens (does the processor know the model?)")
    return mask[0]


@torch.inference_mode()
def layer_key_stats(
    model: Any,
    processor: Any,
    samples: Sequence[Mapping[str, Any]],
    *,
    features: str = "keys_rope",
    max_pixels: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[LayerStats]:
    """Per decoder layer, the key-distance statistics of the visual tokens of ``samples`` (stock
    model, no reduction; each sample alone, batch size 1).

    The keys are those the layer computes (``ModelAdapter.queries_keys`` on the hidden states
    entering it, with the rotary tables it receives): ``features="keys_rope"`` post-RoPE, ``"keys"``
    pre-RoPE; (N, H_kv * d) per input, KV heads concatenated as DBDPC sees them.
    """
    from pact.api import engine_of
    from pact.models import get_adapter

    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    if engine_of(model) is not None:
        raise ValueError(
            "pact is applied to this model: calibrate the stock model (pact.remove(model) first)"
        )
    adapter = get_adapter(model)
    layers = adapter.layers
    per_layer: list[list[dict[str, float]]] = [[] for _ in layers]
    device = next(model.parameters()).device
    state: dict[str, Any] = {}

    def hook(i: int) -> Callable:
        def fn(layer: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"]
            rope = features == "keys_rope"
            _, k, _, k_rope = adapter.queries_keys(
                layer, hidden[0], cos[0] if rope else None, sin[0] if rope else None, False, True
            )
            keys = (k_rope if rope else k)[state["visual"]]
            per_layer[i].append(key_distance_stats(keys.reshape(keys.shape[0], -1)))

        return fn

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for s, sample in enumerate(samples):
            t0 = time.perf_counter()
            inputs = build_inputs(processor, sample, device, max_pixels)
            state["visual"] = _visual_mask(adapter, inputs).to(device)
            model(**inputs, use_cache=False, logits_to_keep=1)
            if progress:
                n = int(state["visual"].sum())
                progress(
                    f"input {s + 1}/{len(samples)}: {n} visual tokens, {len(layers)} layers "
                    f"({time.perf_counter() - t0:.1f}s)"
                )
    finally:
        for h in handles:
            h.remove()
    out = []
    for i, rows in enumerate(per_layer):
        keys = rows[0].keys()
        values = {k: sum(r[k] for r in rows) / len(rows) for k in keys if k != "pairs"}
        out.append(LayerStats(layer=i, values=values, per_input_max=[r["max"] for r in rows]))
    return out


class _CapturedError(Exception):
    """Raised by the capture hook to stop the forward pass once layer L's input is taken."""


@torch.inference_mode()
def layer_signals(
    model: Any,
    processor: Any,
    samples: Sequence[Mapping[str, Any]],
    layer: int,
    config: Any,
    *,
    max_pixels: int | None = None,
) -> list[Any]:
    """``pact.methods.base.Signals`` of every sample at ``layer`` on the stock model (the forward
    stops there), as the engine builds them for a first reduction: what the method will see."""
    from pact.methods.base import Signals
    from pact.models import get_adapter

    adapter = get_adapter(model)
    target = adapter.layers[layer]
    device = next(model.parameters()).device
    box: dict[str, Any] = {}

    def text_pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        box["positions"] = adapter.normalize_positions(kwargs.get("position_ids"), 1)

    def layer_pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        box["hidden"] = (args[0] if args else kwargs["hidden_states"])[0]
        box["cos_sin"] = tuple(t[0] for t in kwargs["position_embeddings"])
        raise _CapturedError

    out = []
    handles = [
        adapter.text_model.register_forward_pre_hook(text_pre, with_kwargs=True),
        target.register_forward_pre_hook(layer_pre, with_kwargs=True),
    ]
    try:
        for sample in samples:
            inputs = build_inputs(processor, sample, device, max_pixels)
            visual = _visual_mask(adapter, inputs).to(device)
            with contextlib.suppress(_CapturedError):
                model(**inputs, use_cache=False)
            hidden, (cos, sin) = box["hidden"], box["cos_sin"]
            t = hidden.shape[0]
            positions = box.get("positions")
            positions = torch.arange(t, device=device)[None] if positions is None else positions[:, 0]
            n = int(visual.sum())

            def qk_fn(j: int, h: torch.Tensor, rope: bool, want_q: bool, want_k: bool, c=cos, s=sin) -> tuple:
                if j != layer:
                    raise ValueError(f"only layer {layer}'s queries/keys were captured, not layer {j}'s")
                return adapter.queries_keys(
                    target, h, c if rope else None, s if rope else None, want_q, want_k
                )

            def no_inputs(j: int) -> torch.Tensor:
                raise ValueError("calibration does not capture earlier layers' inputs")

            out.append(
                Signals(
                    layer=layer, sample=0, hidden=hidden, visual_mask=visual,
                    sizes=torch.ones(n, dtype=torch.float32, device=device), positions=positions,
                    visual_index=torch.arange(n, device=device), config=config, qk_fn=qk_fn,
                    cos_sin_fn=lambda c=cos, s=sin: (c, s), layer_input_fn=no_inputs,
                    model=model, adapter=adapter, inputs=dict(inputs),
                )
            )  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    return out


@torch.inference_mode()
def reduction_ratio(signals: Sequence[Any], config: Any) -> float:
    """1 - kept / visual tokens (summed over the inputs) of the method ``config`` selects, run on the
    captured ``signals`` exactly as the engine runs it at its first reduction layer."""
    from pact.methods.base import build_method

    method = build_method(config)
    before = after = 0
    for s in signals:
        red = method.reduce(s)
        before += s.num_visual
        after += int(red.kept.numel())
    return 1.0 - after / before if before else 0.0


@dataclass
class CutoffResult:
    cutoff: float
    keep_ratio: float
    reduction_ratio: float
    target_ratio: float
    steps: list[tuple[float, float]]  # (cutoff, reduction ratio) evaluated, in order


def calibrate_cutoff(
    signals: Sequence[Any],
    config: Any,
    target_ratio: float,
    *,
    iterations: int = 30,
    progress: Callable[[str], None] | None = None,
) -> CutoffResult:
    """Bisect the DBDPC cutoff (``config.keep_ratio`` fixed) so that the reduction ratio on
    ``signals`` is the closest to ``target_ratio`` (ties: the smaller cutoff). The ratio grows with
    the cutoff (a larger radius never yields more clusters in practice; the search keeps the best
    point seen, so a non-monotone step cannot make it worse than a point it evaluated).

    Raises:
        ValueError: the target is outside what the cutoff can reach with this keep ratio.
    """
    if config.clustering != "dbdpc":
        raise ValueError(f"cutoff calibration needs clustering='dbdpc' (got {config.clustering!r})")
    total = sum(s.num_visual for s in signals)
    steps: list[tuple[float, float]] = []

    def at(c: float) -> float:
        r = reduction_ratio(signals, config.replace(cutoff=c))
        steps.append((c, r))
        if progress:
            progress(f"cutoff {c:.5f}: reduction {r:.4f} (target {target_ratio:.4f})")
        return r

    lo, hi = 1e-6, 2.0
    r_lo, r_hi = at(lo), at(hi)
    if not r_lo <= target_ratio <= r_hi:
        raise ValueError(
            f"target ratio {target_ratio} is outside what the cutoff reaches with keep_ratio="
            f"{config.keep_ratio}: {r_lo:.4f} (cutoff -> 0) to {r_hi:.4f} (cutoff 2); change "
            "--keep-ratio or --target-ratio"
        )
    best = min(((abs(r_lo - target_ratio), lo, r_lo), (abs(r_hi - target_ratio), hi, r_hi)))
    for _ in range(iterations):
        if best[0] <= 0.5 / total:  # within half a token per calibration set: nothing closer exists
            break
        mid = 0.5 * (lo + hi)
        r = at(mid)
        best = min(best, (abs(r - target_ratio), mid, r))
        if r < target_ratio:
            lo = mid
        else:
            hi = mid
    return CutoffResult(
        cutoff=float(best[1]), keep_ratio=float(config.keep_ratio), reduction_ratio=float(best[2]),
        target_ratio=float(target_ratio), steps=steps,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Figure


def plot_curve(
    stats: Sequence[LayerStats], path: Path, *, layer: int, statistic: str, needed: float, title: str
) -> Path:
    """The per-layer key-distance curve (paper Fig. 3): max, median, the p5-p95 band, the threshold
    and the chosen layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pact.eval.plot import save_figure

    xs = [s.layer for s in stats]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.fill_between(
        xs,
        [s.values["p5"] for s in stats],
        [s.values["p95"] for s in stats],
        color="tab:blue",
        alpha=0.15,
        label="p5-p95",
    )
    ax.plot(xs, [s.values["max"] for s in stats], "o-", color="tab:red", lw=2, label="max (paper)")
    ax.plot(xs, [s.values["p99"] for s in stats], ".-", color="tab:orange", lw=1, label="p99")
    ax.plot(xs, [s.values["p50"] for s in stats], ".-", color="tab:blue", lw=1, label="median")
    ax.axhline(needed, color="gray", ls="--", lw=1, label=f"threshold on {statistic} = {needed:.3f}")
    ax.axvline(layer, color="black", ls=":", lw=1.5, label=f"chosen L = {layer}")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("cosine distance between visual-token keys")
    ax.set_title(title, fontsize=10)
    ax.grid(True, ls="--", alpha=0.4)
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path, dpi=130)


# ---------------------------------------------------------------------------------------------------
# End to end


@dataclass
class CalibrationResult:
    layer: int
    statistic: str
    rule: str
    threshold: float
    needed: float
    features: str
    layers: list[LayerStats]
    config: Any
    cutoff: CutoffResult | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "statistic": self.statistic,
            "rule": self.rule,
            "threshold": self.threshold,
            "needed": self.needed,
            "features": self.features,
            "layers": [asdict(s) for s in self.layers],
            "cutoff": None if self.cutoff is None else asdict(self.cutoff),
            "config": self.config.to_dict(),
        }


def calibrate(
    model: Any,
    processor: Any,
    samples: Sequence[Mapping[str, Any]] | None = None,
    *,
    base_config: Any = "pact",
    features: str | None = None,
    statistic: str = "max",
    rule: str = "relative",
    threshold: float = DEFAULT_THRESHOLD,
    min_layer: int = 0,
    max_layer: int | None = None,
    target_ratio: float | None = None,
    keep_ratio: float | None = None,
    max_pixels: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> CalibrationResult:
    """Choose L on ``model`` (and the cutoff for ``target_ratio``); see the module docstring.

    Returns the statistics, the chosen layer and the ready ``PactConfig`` (``result.config``).
    """
    from pact.config import load_config

    cfg = load_config(base_config)
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if features is None:
        features = cfg.cluster_features if cfg.cluster_features in FEATURES else "keys_rope"
    samples = list(samples) if samples is not None else default_samples()
    if not samples:
        raise ValueError("calibration needs at least one input")
    stats = layer_key_stats(
        model, processor, samples, features=features, max_pixels=max_pixels, progress=progress
    )
    layer, needed = choose_layer(
        [s.values[statistic] for s in stats],
        threshold=threshold,
        rule=rule,
        min_layer=min_layer,
        max_layer=max_layer,
    )
    if progress:
        progress(
            f"chosen layer L = {layer} ({statistic} {stats[layer].values[statistic]:.4f} >= {needed:.4f})"
        )
    cfg = cfg.replace(layer=layer)
    cut = None
    if target_ratio is not None:
        if cfg.pruning == "euti":
            cfg = cfg.replace(
                keep_ratio=keep_ratio if keep_ratio is not None else keep_ratio_for(target_ratio)
            )
        signals = layer_signals(model, processor, samples, layer, cfg, max_pixels=max_pixels)
        cut = calibrate_cutoff(signals, cfg, target_ratio, progress=progress)
        cfg = cfg.replace(cutoff=cut.cutoff)
    return CalibrationResult(
        layer=layer,
        statistic=statistic,
        rule=rule,
        threshold=threshold,
        needed=needed,
        features=features,
        layers=stats,
        config=cfg,
        cutoff=cut,
    )


# ---------------------------------------------------------------------------------------------------
# Command line


class _UsageError(Exception):
    """A user mistake: one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of argparse's usage block
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    from pact.testing import FAMILIES

    p = _Parser(
        prog="pact calibrate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="local checkpoint directory")
    src.add_argument("--tiny", choices=FAMILIES, help="a tiny random model of this family (default qwen2_vl)")
    p.add_argument(
        "--tiny-layers", type=int, default=8, help="decoder layers of the --tiny model (default 8)"
    )
    p.add_argument("--images", nargs="+", default=[], help="calibration images")
    p.add_argument("--videos", nargs="+", default=[], help="calibration videos (files or frame folders)")
    p.add_argument("--frames", type=int, default=8, help="frames sampled per video (default 8)")
    p.add_argument("--question", default=QUESTION, help="prompt text of every input")
    p.add_argument("--config", default="pact", help="base config name or JSON (default: pact)")
    p.add_argument(
        "--features",
        choices=FEATURES,
        help="keys_rope (post-RoPE) or keys (pre-RoPE); "
        "default: the config's cluster_features if it is one of them, else keys_rope",
    )
    p.add_argument(
        "--statistic",
        choices=STATISTICS,
        default="max",
        help="per-layer value the rule reads (default max, the paper's)",
    )
    p.add_argument("--rule", choices=RULES, default="relative")
    p.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="relative: fraction of the largest candidate value (default 0.5); absolute: a cosine distance",
    )
    p.add_argument("--min-layer", type=int, default=0)
    p.add_argument("--max-layer", type=int, help="last candidate layer (default: half the layers)")
    p.add_argument(
        "--target-ratio", type=float, help="also calibrate the DBDPC cutoff to this reduction ratio"
    )
    p.add_argument(
        "--keep-ratio", type=float, help="EUTI keep ratio with --target-ratio (default 1 - 0.631 R)"
    )
    p.add_argument("--max-pixels", type=int, help="Qwen-family image pixel cap (default: the processor's)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default outputs/calibrate)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="default: bfloat16 on CUDA, float32 on CPU",
    )
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    return p


def _family_of_checkpoint(path: Path) -> tuple[str, int]:
    """(family, decoder layers) from the checkpoint's config.json, without loading weights."""
    from transformers import AutoConfig

    from pact.models import ADAPTERS

    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as e:  # any reading failure is the path's
        raise _UsageError(f"--model {path}: cannot read its config.json ({type(e).__name__}: {e})") from e
    for family, cls in ADAPTERS.items():
        if config.model_type in cls.model_types:
            return family, int(config.get_text_config().num_hidden_layers)
    raise _UsageError(f"--model {path}: model_type {config.model_type!r} is not supported by pact")


def _validate(args: argparse.Namespace) -> tuple[str, int, Any, list[dict[str, Any]] | None]:
    """Everything checkable before a model is built; returns (family, layers, config, samples)."""
    from pact.config import load_config
    from pact.testing import VIDEO_FAMILIES

    if args.model:
        path = Path(args.model)
        if not path.is_dir():
            raise _UsageError(f"--model {args.model}: no such directory")
        family, n_layers = _family_of_checkpoint(path)
    else:
        family = args.tiny or "qwen2_vl"
        if args.tiny_layers < 2:
            raise _UsageError(f"--tiny-layers must be >= 2, got {args.tiny_layers}")
        n_layers = args.tiny_layers
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise _UsageError(f"--device {args.device}: CUDA is not available on this machine")
    if args.rule == "relative" and not 0 < args.threshold <= 1:
        raise _UsageError(f"--threshold {args.threshold}: a relative threshold must be in (0, 1]")
    if args.rule == "absolute" and not 0 < args.threshold <= 2:
        raise _UsageError(f"--threshold {args.threshold}: an absolute threshold must be in (0, 2]")
    max_layer = n_layers // 2 if args.max_layer is None else args.max_layer
    if not 0 <= args.min_layer <= max_layer < n_layers:
        raise _UsageError(
            f"--min-layer {args.min_layer} / --max-layer {max_layer}: need 0 <= min <= max < "
            f"{n_layers} (the model's decoder layers)"
        )
    if args.target_ratio is not None and not 0 < args.target_ratio < 1:
        raise _UsageError(f"--target-ratio {args.target_ratio}: must be in (0, 1)")
    if args.keep_ratio is not None and (args.target_ratio is None or not 0 < args.keep_ratio <= 1):
        raise _UsageError(f"--keep-ratio {args.keep_ratio}: needs --target-ratio and a value in (0, 1]")
    if args.frames < 1:
        raise _UsageError(f"--frames must be >= 1, got {args.frames}")
    if args.max_pixels is not None and args.max_pixels < 56 * 56:
        raise _UsageError(f"--max-pixels {args.max_pixels}: must be >= {56 * 56}")
    try:
        cfg = load_config(args.config)
    except (ValueError, FileNotFoundError) as e:
        raise _UsageError(f"--config {args.config}: {str(e).splitlines()[0]}") from e
    if args.target_ratio is not None and cfg.clustering != "dbdpc":
        raise _UsageError(
            f"--target-ratio calibrates the DBDPC cutoff; --config {args.config} has "
            f"clustering={cfg.clustering!r}"
        )
    if args.videos and family not in VIDEO_FAMILIES:
        raise _UsageError(
            f"--videos: {family} models take no videos (video families: {', '.join(VIDEO_FAMILIES)})"
        )
    if not args.images and not args.videos:
        return family, n_layers, cfg, None
    samples = []
    for name in args.images:
        path = Path(name)
        if not path.is_file():
            raise _UsageError(f"--images {name}: no such file")
        try:
            samples.append({"question": args.question, "images": [load_image(path)]})
        except Exception as e:  # PIL raises many types
            raise _UsageError(f"--images {name}: not a readable image ({e})") from e
    for name in args.videos:
        path = Path(name)
        if not (path.is_dir() or (path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES)):
            raise _UsageError(
                f"--videos {name}: need a folder of frames or a video file ({', '.join(VIDEO_SUFFIXES)})"
            )
        try:
            samples.append({"question": args.question, "videos": [load_video(path, args.frames)]})
        except Exception as e:  # decoders raise many types
            raise _UsageError(f"--videos {name}: cannot read it ({e})") from e
    return family, n_layers, cfg, samples


def _load_model(args: argparse.Namespace, family: str, dtype: torch.dtype) -> tuple[Any, Any]:
    if args.model:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(
            args.model, dtype=dtype, attn_implementation=args.attn
        )
        return model.to(args.device).eval(), AutoProcessor.from_pretrained(args.model)
    from pact import testing

    model = testing.tiny_model(
        family, dtype=dtype, attn_implementation=args.attn, num_hidden_layers=args.tiny_layers
    )
    return model.to(args.device), testing.tiny_processor(family)


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        family, _, cfg, samples = _validate(args)
    except _UsageError as e:
        print(f"pact calibrate: error: {e}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))

    def progress(msg: str) -> None:
        print(f"[calibrate] {msg}", file=sys.stderr, flush=True)

    what = args.model or f"tiny random {family} ({args.tiny_layers} layers)"
    progress(
        f"model {what}, device {args.device}, dtype {dtype}; "
        f"{len(samples) if samples else 'bundled'} calibration inputs"
    )
    model, processor = _load_model(args, family, dtype)
    if samples is None:
        samples = [dict(s, question=args.question) for s in default_samples()]
    try:
        result = calibrate(
            model, processor, samples, base_config=cfg, features=args.features, statistic=args.statistic,
            rule=args.rule, threshold=args.threshold, min_layer=args.min_layer, max_layer=args.max_layer,
            target_ratio=args.target_ratio, keep_ratio=args.keep_ratio, max_pixels=args.max_pixels,
            progress=progress,
        )  # fmt: skip
    except ValueError as e:
        print(f"pact calibrate: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.json"
    result.config.to_json(config_path)
    payload = {"model": what, "family": family, "inputs": len(samples), **result.to_dict()}
    (out / "calibration.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    png = plot_curve(
        result.layers,
        out / "key_distances.png",
        layer=result.layer,
        statistic=result.statistic,
        needed=result.needed,
        title=f"visual-token key distances per layer: {what}",
    )
    print(_table(result))
    print(f"chosen layer L = {result.layer}")
    if result.cutoff is not None:
        c = result.cutoff
        print(
            f"cutoff {c.cutoff:.4f}, keep_ratio {c.keep_ratio:.4f}: reduction {c.reduction_ratio:.4f} "
            f"on the calibration inputs (target {c.target_ratio})"
        )
    print(f"wrote {config_path}, {out / 'calibration.json'}, {png}")
    return 0


def _table(result: CalibrationResult) -> str:
    cols = ["max", "p99", "p95", "p50", "p5", "mean"]
    head = f"{'layer':>5}" + "".join(f"{c:>9}" for c in cols)
    lines = [head, "-" * len(head)]
    for s in result.layers:
        mark = "  <- L" if s.layer == result.layer else ""
        lines.append(f"{s.layer:>5}" + "".join(f"{s.values[c]:>9.4f}" for c in cols) + mark)
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
