"""`pact demo`: PACT on a real photo, end to end, with numbers and a picture.

Without `--model` it builds a small **random-weight** Qwen2-VL (a 0.5B-class language model and a
small vision tower; no download, no network) so that it runs anywhere in about a minute on two CPU
cores. Random weights mean the generated text is meaningless; what the demo shows is the mechanics:
how many visual tokens PACT removes, what that does to prefill time and memory, and which image
regions were pruned or merged. `--model DIR` does the same with a real local checkpoint.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pact.bench_prefill import RssSampler, kv_cache_bytes

DEFAULT_OUT = Path("outputs/demo")
QUESTION = "Describe this photo in one sentence."


@dataclass
class RunResult:
    label: str
    visual_before: int
    visual_after: int
    prefill_seconds: float
    reduce_seconds: float
    peak_bytes: int
    peak_kind: str
    kv_cache_bytes: int


# ----------------------------------------------------------------------------------------------
# model and inputs


def build_random_qwen2_vl(dtype: torch.dtype):
    """A Qwen2-VL with a 0.5B-class language model (hidden 896, 24 layers, 14 heads, 2 KV heads)
    and a small vision tower, random weights. Returns (model, processor)."""
    from pact import testing

    model = testing.tiny_model(
        "qwen2_vl",
        dtype=dtype,
        num_hidden_layers=24,
        text_overrides=dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                            num_key_value_heads=2,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                             "mrope_section": [8, 12, 12]}),  # sums to head_dim/2 = 32
        vision_overrides=dict(depth=2, embed_dim=128, num_heads=4, hidden_size=896),
    )
    processor = testing.tiny_processor("qwen2_vl")
    return model, processor


def load_checkpoint(path: str, dtype: torch.dtype, device: str, attn: str):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    model.to(device).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


def build_inputs(processor, image, device: str, min_pixels: int, max_pixels: int):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    kwargs = {}
    if "Qwen" in type(processor.image_processor).__name__:  # Qwen resizes by a pixel budget
        kwargs = {"images_kwargs": {"min_pixels": min_pixels, "max_pixels": max_pixels}}
    enc = processor(text=[text], images=[image], return_tensors="pt", **kwargs)
    return enc.to(device)


# ----------------------------------------------------------------------------------------------
# measurement


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def measure_prefill(model, inputs, device: str, repeats: int, label: str) -> RunResult:
    import pact

    times, peak, kind, kv = [], 0, "", 0
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            _sync(device)
            t0 = time.perf_counter()
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            _sync(device)
            times.append(time.perf_counter() - t0)
            peak, kind = torch.cuda.max_memory_allocated(), "CUDA max allocated"
        else:
            with RssSampler() as rss:
                t0 = time.perf_counter()
                out = model(**inputs, use_cache=True, logits_to_keep=1)
                times.append(time.perf_counter() - t0)
            peak, kind = max(peak, rss.growth_bytes), "peak RSS growth"
        kv = kv_cache_bytes(out.past_key_values)
        del out
    from pact.api import engine_of

    st = pact.stats(model) if engine_of(model) is not None else None
    n_visual = int(inputs["mm_token_type_ids"].ne(0).sum()) if "mm_token_type_ids" in inputs else 0
    before = st.visual_before[0] if st and st.visual_before else n_visual
    after = st.visual_after[0] if st and st.visual_after else n_visual
    return RunResult(label, before, after, statistics.median(times),
                     float(st.seconds_reducing) if st else 0.0, peak, kind, kv)


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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(rows: list[RunResult]) -> str:
    head = (f"{'run':<14}{'visual before':>14}{'visual after':>13}{'reduction':>10}{'prefill s':>11}"
            f"{'reduce s':>10}{'peak MiB':>10}{'KV MiB':>9}")
    out = [head, "-" * len(head)]
    for r in rows:
        red = 1 - r.visual_after / r.visual_before if r.visual_before else 0.0
        out.append(f"{r.label:<14}{r.visual_before:>14}{r.visual_after:>13}{red:>10.1%}"
                   f"{r.prefill_seconds:>11.3f}{r.reduce_seconds:>10.3f}{r.peak_bytes / 2**20:>10.1f}"
                   f"{r.kv_cache_bytes / 2**20:>9.1f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    import pact
    from pact import testing

    p = argparse.ArgumentParser(prog="pact demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local checkpoint directory (default: a random-weight Qwen2-VL)")
    p.add_argument("--config", default="pact", help="config name or JSON path (default: pact)")
    p.add_argument("--image", help="image path (default: the bundled photo)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (default: outputs/demo)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--max-pixels", type=int, default=1024 * 28 * 28,
                   help="image resolution cap for Qwen-family processors (default: 1024 visual tokens)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=8)
    args = p.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.model:
        model, processor = load_checkpoint(args.model, dtype, args.device, args.attn)
        what = f"checkpoint {args.model}"
    else:
        model, processor = build_random_qwen2_vl(dtype)
        model.to(args.device)
        if args.attn != "sdpa":
            model.set_attn_implementation(args.attn)
        what = "a RANDOM-WEIGHT Qwen2-VL (0.5B-class language model, tiny vision tower; output text is noise)"
    from PIL import Image

    image = Image.open(args.image).convert("RGB") if args.image else testing.demo_photo()
    pixels = args.max_pixels
    inputs = build_inputs(processor, image, args.device, min_pixels=pixels, max_pixels=pixels)
    cfg = pact.load_config(args.config)
    print(f"pact demo: {what}")
    print(f"device {args.device}, dtype {args.dtype}, attention {args.attn}; config: {cfg.describe()}")

    model(**inputs, use_cache=True, logits_to_keep=1)  # warm-up (lazy init, kernels)
    stock = measure_prefill(model, inputs, args.device, args.repeats, "no reduction")
    pact.apply(model, cfg)
    reduced = measure_prefill(model, inputs, args.device, args.repeats, "PACT")
    gen = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    st = pact.stats(model)
    print()
    print(_table([stock, reduced]))
    if not args.device.startswith("cuda"):
        print("(CPU: peak memory is the sampled growth of the process's resident memory during prefill)")
    speedup = stock.prefill_seconds / reduced.prefill_seconds if reduced.prefill_seconds else float("nan")
    print(f"prefill speed-up: {speedup:.2f}x")
    text = processor.batch_decode(gen[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    print(f"generated ({args.max_new_tokens} tokens): {text!r}")

    out_dir = Path(args.out)
    grid = inputs.get("image_grid_thw")
    record = st.records[-1][0] if st.records else None  # last step, first (only) sample
    if grid is not None and record is not None:
        _, h, w = (int(v) for v in grid[0])
        merge = getattr(getattr(model.config, "vision_config", None), "spatial_merge_size", 2)
        png = out_dir / "pact_demo.png"
        title = (f"PACT: {reduced.visual_before} -> {reduced.visual_after} visual tokens\n"
                 f"dark = pruned, colour = one merged token, red dot = its center")
        draw_overlay(image, (h // merge, w // merge), record.kept, record.labels, png, title)
        print(f"wrote {png}")
    else:
        print("(overlay drawn only for Qwen-family image layouts)")
    pact.remove(model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
