"""`pact demo`: PACT on a real photo, end to end, with numbers and a picture.

Without `--model` it builds a small **random-weight** Qwen2-VL (a 0.5B-class language model and a
small vision tower; no download, no network) so that it runs anywhere in about a minute on two CPU
cores. Random weights mean the generated text is meaningless; what the demo shows is the mechanics:
how many visual tokens PACT removes, what that does to prefill time and memory, and which image
regions were pruned or merged. `--model DIR` does the same with a real local checkpoint.

Timing: one untimed warm-up prefill of each side, then `--repeats` interleaved rounds (stock, then
reduced, in every round, so both sides see the same machine load); the table shows medians and the
speed-up its spread over the rounds. The FLOP model's ideal speed-up for the same reduction is printed
beside it; a measured value above the ideal is timing noise and is flagged as such.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pact.cli import (
    add_config_arguments,
    device_name,
    existing_dir,
    existing_file,
    int_at_least,
    load_config_arguments,
    output_dir,
)

DEFAULT_OUT = Path("outputs/demo")
QUESTION = "Describe this photo in one sentence."
DEFAULT_VISUAL_TOKENS = 1024


@dataclass
class RunResult:
    """Timed prefills of one side (stock or reduced): per-round seconds and the last run's numbers."""

    label: str
    visual_before: int
    visual_after: int
    seconds: list[float] = field(default_factory=list)
    reduce_seconds: float = 0.0
    peak_bytes: int = 0
    peak_kind: str = ""
    kv_cache_bytes: int = 0

    @property
    def prefill_seconds(self) -> float:
        return statistics.median(self.seconds)


def progress(message: str) -> None:
    """Progress lines go to stderr (the table and results stay alone on stdout)."""
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# model and inputs


def build_random_qwen2_vl(dtype: Any):
    """A Qwen2-VL with a 0.5B-class language model (hidden 896, 24 layers, 14 heads, 2 KV heads)
    and a small vision tower, random weights. Returns (model, processor)."""
    from pact import testing

    model = testing.tiny_model(
        "qwen2_vl",
        dtype=dtype,
        num_hidden_layers=24,
        text_overrides=dict(
            hidden_size=896,
            intermediate_size=4864,
            num_attention_heads=14,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
        ),  # sums to head_dim/2 = 32
        vision_overrides=dict(depth=2, embed_dim=128, num_heads=4, hidden_size=896),
    )
    processor = testing.tiny_processor("qwen2_vl")
    return model, processor


def load_checkpoint(path: str, dtype: Any, device: str, attn: str):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    model.to(device).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


def build_inputs(processor, image, device: str, visual_tokens: int):
    """The chat prompt (image + QUESTION); Qwen-style processors resize to about ``visual_tokens``."""
    from pact.bench.prefill import build_inputs as prompt_inputs

    return prompt_inputs(processor, image, visual_tokens).to(device)


# ----------------------------------------------------------------------------------------------
# measurement


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_prefill(model, inputs, device: str) -> tuple[float, int, str, int]:
    """One prefill (KV cache, last logits only): (seconds, peak bytes, peak kind, KV-cache bytes)."""
    import torch

    from pact.bench.prefill import RssSampler, kv_cache_bytes

    with torch.inference_mode():
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            _sync(device)
            t0 = time.perf_counter()
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            _sync(device)
            seconds = time.perf_counter() - t0
            peak, kind = torch.cuda.max_memory_allocated(), "CUDA max allocated"
        else:
            with RssSampler() as rss:
                t0 = time.perf_counter()
                out = model(**inputs, use_cache=True, logits_to_keep=1)
                seconds = time.perf_counter() - t0
            peak, kind = rss.growth_bytes, "peak RSS growth"
        kv = kv_cache_bytes(out.past_key_values)
    return seconds, peak, kind, kv


def measure(
    model, inputs, cfg, device: str, repeats: int, warmup: int, n_visual: int
) -> tuple[RunResult, RunResult]:
    """Interleaved rounds of stock and reduced prefills after ``warmup`` untimed ones of each."""
    import pact

    stock = RunResult("no reduction", n_visual, n_visual)
    reduced = RunResult("PACT", n_visual, n_visual)
    for i in range(warmup):
        progress(f"warm-up {i + 1}/{warmup} (untimed): stock and reduced prefill ...")
        time_prefill(model, inputs, device)
        pact.apply(model, cfg)
        time_prefill(model, inputs, device)
        pact.remove(model)
    for i in range(repeats):
        for side in (stock, reduced):
            if side is reduced:
                pact.apply(model, cfg)
            seconds, peak, kind, kv = time_prefill(model, inputs, device)
            side.seconds.append(seconds)
            side.peak_bytes, side.peak_kind = max(side.peak_bytes, peak), kind
            side.kv_cache_bytes = kv
            if side is reduced:
                st = pact.stats(model)
                reduced.visual_before = st.visual_before[0] if st.visual_before else n_visual
                reduced.visual_after = st.visual_after[0] if st.visual_after else n_visual
                reduced.reduce_seconds = float(st.seconds_reducing)
                pact.remove(model)
        progress(
            f"round {i + 1}/{repeats}: stock {stock.seconds[-1]:.3f} s, reduced {reduced.seconds[-1]:.3f} s"
        )
    return stock, reduced


def ideal_speedup(model, inputs, cfg, stats) -> float | None:
    """The FLOP model's prefill speed-up for the reduction ``stats`` describes (None: nothing reduced).

    One step: `pact.bench.prefill.ideal_speedup` (reduction cost included). Several steps
    (progressive methods): the ratio of decoder FLOPs with the per-step removals, reduction cost left
    out (so the bound is, if anything, too generous).
    """
    from pact.bench.prefill import DecoderShape, prefill_flops, tokens_per_layer
    from pact.bench.prefill import ideal_speedup as one_step

    if not stats.layers or not stats.records:
        return None
    shape = DecoderShape.from_config(model.config.get_text_config())
    tokens = int(inputs["input_ids"].shape[1])
    before, after = stats.visual_before[0], stats.visual_after[0]
    if len(stats.layers) == 1:
        keep = float(cfg.keep_ratio) if cfg.pruning not in ("none", "withdraw") else None
        return one_step(
            shape, tokens, layer=stats.layers[0], visual_before=before, visual_after=after, keep_ratio=keep
        )["ideal_speedup"]
    removed_at, current = {}, before
    for layer, step in zip(stats.layers, stats.records, strict=True):
        kept = int(step[0].kept.numel()) if step[0] is not None else current
        removed_at[layer] = current - kept
        current = kept
    base = prefill_flops(shape, tokens_per_layer(shape.layers, tokens))
    return base / prefill_flops(shape, tokens_per_layer(shape.layers, tokens, removed_at))


# ----------------------------------------------------------------------------------------------
# drawing


def draw_overlay(image, grid_hw: tuple[int, int], kept, labels, path: Path, title: str) -> None:
    """Save a two-panel PNG: the photo, and the photo with PACT's clusters and pruned tokens.

    grid_hw: (rows, cols) of visual tokens in raster order. labels: LongTensor[rows*cols], index of
    the kept token representing each visual token, -1 = pruned and dropped. kept: LongTensor[R].
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from pact.eval.plot import save_figure

    rows, cols = grid_hw
    lab = labels.reshape(rows, cols).numpy()
    rng = np.random.default_rng(0)
    palette = rng.uniform(0.15, 1.0, size=(max(int(lab.max()) + 1, 1), 3))
    rgb = np.zeros((rows, cols, 4))
    for r in range(rows):  # drawing only: a few thousand cells, not a hot path
        for c in range(cols):
            v = lab[r, c]
            rgb[r, c] = (0.05, 0.05, 0.05, 0.85) if v < 0 else (*palette[v], 0.55)
    img = np.asarray(image.resize((cols * 28, rows * 28)))
    fig, axes = plt.subplots(1, 2, figsize=(12, 6.5))
    axes[0].imshow(img)
    axes[0].set_title("input photo")
    axes[1].imshow(img)
    axes[1].imshow(rgb, extent=(0, cols * 28, rows * 28, 0), interpolation="nearest")
    # outline cluster boundaries so merged regions read as regions
    for r in range(rows):
        for c in range(cols):
            if c + 1 < cols and lab[r, c] != lab[r, c + 1]:
                axes[1].plot([(c + 1) * 28] * 2, [r * 28, (r + 1) * 28], color="white", lw=0.4)
            if r + 1 < rows and lab[r, c] != lab[r + 1, c]:
                axes[1].plot([c * 28, (c + 1) * 28], [(r + 1) * 28] * 2, color="white", lw=0.4)
    centers = kept.numpy()
    axes[1].scatter(centers % cols * 28 + 14, centers // cols * 28 + 14, s=4, c="red")
    axes[1].set_title(title, fontsize=10)
    for ax in axes:
        ax.axis("off")
    save_figure(fig, path, dpi=110)


def _table(rows: list[RunResult]) -> str:
    head = (
        f"{'run':<14}{'visual before':>14}{'visual after':>13}{'reduction':>10}{'prefill s':>11}"
        f"{'(min-max)':>16}{'reduce s':>10}{'peak MiB':>10}{'KV MiB':>9}"
    )
    out = [head, "-" * len(head)]
    for r in rows:
        red = 1 - r.visual_after / r.visual_before if r.visual_before else 0.0
        spread = f"{min(r.seconds):.3f}-{max(r.seconds):.3f}"
        out.append(
            f"{r.label:<14}{r.visual_before:>14}{r.visual_after:>13}{red:>10.1%}{r.prefill_seconds:>11.3f}"
            f"{spread:>16}{r.reduce_seconds:>10.3f}{r.peak_bytes / 2**20:>10.1f}"
            f"{r.kv_cache_bytes / 2**20:>9.1f}"
        )
    return "\n".join(out)


def speedup_lines(stock: RunResult, reduced: RunResult, ideal: float | None) -> list[str]:
    """The measured speed-up (median of the per-round ratios, with their range) beside the ideal."""
    ratios = [a / b for a, b in zip(stock.seconds, reduced.seconds, strict=True) if b > 0]
    if not ratios:
        return ["prefill speed-up: not measurable (zero prefill time)"]
    measured = statistics.median(ratios)
    spread = f"range {min(ratios):.2f}-{max(ratios):.2f}x over {len(ratios)} rounds"
    ideal_text = f"FLOP-model ideal {ideal:.2f}x" if ideal is not None else "no reduction happened"
    if ideal is not None and measured > ideal:
        return [
            f"prefill speed-up: {ideal_text}; measured {measured:.2f}x ({spread}) is ABOVE the ideal, so it "
            "is timing noise (machine load, caches), not a result: rerun with more --repeats when idle"
        ]
    return [f"prefill speed-up: {measured:.2f}x measured ({spread}); {ideal_text}"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pact demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", type=existing_dir, help="local checkpoint directory (default: a random-weight Qwen2-VL)"
    )
    add_config_arguments(p)
    p.add_argument("--image", type=existing_file, help="image path (default: the bundled photo)")
    p.add_argument("--out", type=output_dir, default=str(DEFAULT_OUT), help="output directory (outputs/demo)")
    p.add_argument(
        "--device",
        type=device_name,
        default=None,
        help="cpu, cuda, cuda:N (default: cuda if available)",
    )
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument(
        "--visual-tokens",
        type=int_at_least(1),
        default=DEFAULT_VISUAL_TOKENS,
        help="Qwen-family processors: resize the image to about this many visual tokens "
        f"(default {DEFAULT_VISUAL_TOKENS})",
    )
    p.add_argument("--repeats", type=int_at_least(1), default=3, help="timed rounds (median; default 3)")
    p.add_argument(
        "--warmup", type=int_at_least(0), default=1, help="untimed prefills of each side (default 1)"
    )
    p.add_argument("--max-new-tokens", type=int_at_least(0), default=8, help="generated tokens (default 8)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Everything that can be wrong in the arguments fails here, before the model is built.
    cfg = load_config_arguments(args.config, args.set)
    from PIL import Image

    from pact import testing

    if args.image:
        with Image.open(args.image) as img:
            image = img.convert("RGB")
    else:
        image = testing.demo_photo()

    import torch

    import pact
    from pact.bench.prefill import count_visual

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if args.model:
        progress(f"loading {args.model} ...")
        model, processor = load_checkpoint(args.model, dtype, device, args.attn)
        what = f"checkpoint {args.model}"
    else:
        progress("building a random-weight Qwen2-VL (0.5B-class language model) ...")
        model, processor = build_random_qwen2_vl(dtype)
        model.to(device)
        if args.attn != "sdpa":
            model.set_attn_implementation(args.attn)
        what = "a RANDOM-WEIGHT Qwen2-VL (0.5B-class language model, tiny vision tower; output text is noise)"
    progress(f"model ready in {time.perf_counter() - t0:.1f} s")
    pact.apply(model, cfg)  # the config against this model (depth, family, backend) before timing
    pact.remove(model)
    inputs = build_inputs(processor, image, device, args.visual_tokens)
    n_visual = count_visual(model, inputs)  # the engine's own count, right for every family
    print(f"pact demo: {what}")
    print(f"device {device}, dtype {args.dtype}, attention {args.attn}; config: {cfg.describe()}")
    print(f"input: {inputs['input_ids'].shape[1]} tokens, {n_visual} visual")

    stock, reduced = measure(model, inputs, cfg, device, args.repeats, args.warmup, n_visual)
    progress(f"generating {args.max_new_tokens} tokens with reduction ...")
    pact.apply(model, cfg)
    with torch.inference_mode():
        gen = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    st = pact.stats(model)
    print()
    print(_table([stock, reduced]))
    if not device.startswith("cuda"):
        print("(CPU: peak memory is the sampled growth of the process's resident memory during prefill)")
    for line in speedup_lines(stock, reduced, ideal_speedup(model, inputs, cfg, st)):
        print(line)
    text = processor.batch_decode(gen[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    print(f"generated ({args.max_new_tokens} tokens): {text!r}")

    out_dir = Path(args.out)
    grid = inputs.get("image_grid_thw")
    record = st.records[-1][0] if st.records else None  # last step, first (only) sample
    if grid is not None and record is not None:
        _, h, w = (int(v) for v in grid[0])
        merge = getattr(getattr(model.config, "vision_config", None), "spatial_merge_size", 2)
        png = out_dir / "pact_demo.png"
        title = (
            f"PACT: {reduced.visual_before} -> {reduced.visual_after} visual tokens\n"
            f"dark = pruned, colour = one merged token, red dot = its center"
        )
        draw_overlay(image, (h // merge, w // merge), record.kept, record.labels, png, title)
        print(f"wrote {png}")
    else:
        print("(overlay drawn only for Qwen-family image layouts)")
    pact.remove(model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
