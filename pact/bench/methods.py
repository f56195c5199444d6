"""`pact bench methods`: every bundled method config at the same budget, on one input.

Each config in ``configs/*.json`` (except ``no_reduction``) is applied with ``target_ratio`` set to
the common budget (default 0.7: remove 70% of the visual tokens) to one random-weight Qwen2-VL --
the 0.5B-class widths (hidden 896, 14 query / 2 KV heads, MLP 4864) but only 8 decoder layers, a
1-layer vision tower, the bundled photo at about 1024 visual tokens -- and timed: the reduction's
own time (``pact.stats(model).seconds_reducing``, median of ``--repeats``), the language-model
prefill and the whole call, and the reduction ratio actually reached.

A method that does not take a budget is timed at fixed settings found beforehand when the
benchmark knows its knob (``pact bench prefill``'s calibration: DBDPC's cutoff, a pruning keep
ratio) and listed with its error otherwise; a method that does not run on Qwen2-VL is listed with
the reason. Threshold methods that take the budget (DBSCAN's eps, DBDPC's cutoff) search their
threshold per image, and that search is part of their reduction time; the table then also shows
PACT/DBDPC at the calibrated fixed cutoff, the cost a deployment with a tuned cutoff pays.

    pact bench methods --json outputs/bench/methods.json
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from pact.bench import load_average, machine_info
from pact.bench import prefill as bp
from pact.cli import device_name, int_at_least, output_file, parse_overrides, reduction_ratio

FAMILY = "qwen2_vl"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `pact bench methods` (also used by pact.bench's subparser)."""
    p.add_argument(
        "--configs", default="", help="comma-separated config names or paths (default: every bundled one)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override applied to every config, repeatable (e.g. --set layer=2)",
    )
    p.add_argument(
        "--target-ratio",
        type=reduction_ratio,
        default=0.7,
        help="common budget: reduction ratio, [0, 1) (0.7)",
    )
    p.add_argument(
        "--layers", type=int_at_least(1), default=8, help="decoder layers of the random model (default 8)"
    )
    p.add_argument(
        "--visual-tokens", type=int_at_least(1), default=1024, help="visual tokens of the input (about)"
    )
    p.add_argument("--tiny", action="store_true", help="tiny random model (tests; seconds)")
    p.add_argument("--repeats", type=int_at_least(1), default=3, help="timed prefills per method (median)")
    p.add_argument("--warmup", type=int_at_least(0), default=1, help="untimed prefills per method")
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--threads", type=int_at_least(1), help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=output_file, help="write the table to this JSON file")


def _families(cfg: Any) -> tuple[str, ...] | None:
    """Families the config's method supports, or None when no method implements the pair."""
    from pact.methods import REGISTRY
    from pact.methods.listing import families_of

    factory = REGISTRY.get((cfg.pruning, cfg.clustering))
    return None if factory is None else families_of(factory)


def _timed(
    model: Any, inputs: Any, cfg: Any, args: argparse.Namespace, device: torch.device, label: str
) -> bp.RunResult:
    import pact.api

    pact.api.apply(model, cfg)
    try:
        return bp.measure(
            model,
            inputs,
            label=label,
            repeats=args.repeats,
            warmup=args.warmup,
            decode_tokens=0,
            device=device,
        )
    finally:
        pact.api.remove(model)


def _row(name: str, cfg: Any, res: bp.RunResult, budget: str, base_llm: float) -> dict[str, Any]:
    s = res.summary()
    return {
        "config": name,
        "method": f"{cfg.pruning}+{cfg.clustering}",
        "layer": res.reduction_layers[0] if res.reduction_layers else cfg.layer,
        "reduction_layers": len(res.reduction_layers),
        "status": "ok",
        "budget": budget,
        "visual_before": res.visual_before,
        "visual_after": res.visual_after,
        "reduction_ratio": res.reduction_ratio,
        "reduction_seconds": s["reduction_seconds"],
        "reduction_seconds_all": res.reduction_s,
        "llm_prefill_seconds": s["llm_prefill_seconds"],
        "whole_call_seconds": s["whole_call_seconds"],
        "speedup": base_llm / s["llm_prefill_seconds"] if s["llm_prefill_seconds"] else None,
        "config_values": res.config,
    }


def bench_config(
    name: str,
    model: Any,
    inputs: Any,
    args: argparse.Namespace,
    device: torch.device,
    base_llm: float,
    log: Any,
) -> list[dict[str, Any]]:
    """Rows for one config: the method at the common budget (and, for DBDPC methods, also at the
    calibrated fixed cutoff), or one row saying why it could not run."""
    from pact.config import load_config

    cfg = load_config(name, **parse_overrides(getattr(args, "set", []), "--set"))
    method = f"{cfg.pruning}+{cfg.clustering}"
    fams = _families(cfg)
    if fams is None:
        return [
            {
                "config": name,
                "method": method,
                "status": "not registered",
                "reason": "no method implements this (pruning, clustering) pair",
            }
        ]
    if FAMILY not in fams:
        return [
            {
                "config": name,
                "method": method,
                "status": "unsupported",
                "reason": f"runs on {', '.join(fams)}, not {FAMILY}",
            }
        ]
    rows: list[dict[str, Any]] = []
    error = None
    try:
        budget_cfg = cfg.replace(target_ratio=args.target_ratio)
        res = _timed(model, inputs, budget_cfg, args, device, name)
        res.config = budget_cfg.to_dict()
        rows.append(_row(name, cfg, res, f"target_ratio={args.target_ratio:g}", base_llm))
    except Exception as e:  # a method that cannot take a budget or cannot run here: report, go on
        error = f"{type(e).__name__}: {e}".splitlines()[0]
        log(f"  {name}: with target_ratio: {error}")
    if cfg.clustering == "dbdpc" or (error is not None and cfg.clustering == "none"):
        try:
            fixed, info = bp.calibrate(model, inputs, cfg, args.target_ratio)
            res = _timed(model, inputs, fixed, args, device, name + " (fixed)")
            res.config = fixed.to_dict()
            how = f"calibrated fixed {info['knob']}={info['value']:.4g}"
            rows.append(_row(name, cfg, res, how, base_llm))
        except Exception as e:  # same: report and go on
            msg = f"{type(e).__name__}: {e}".splitlines()[0]
            log(f"  {name}: calibrated: {msg}")
            error = msg if error is None else f"{error}; calibrated: {msg}"
    if not rows:
        rows.append({"config": name, "method": method, "status": "error", "reason": error})
    elif error is not None:
        rows[0]["note"] = f"target_ratio not accepted ({error})"
    return rows


def format_table(result: dict[str, Any]) -> str:
    head = (
        f"{'config':<20}{'method':<22}{'L':>3}{'vis in':>8}{'vis out':>8}{'reduced':>9}{'reduce ms':>11}"
        f"{'LLM s':>8}{'speedup':>9}  budget"
    )
    lines = [head, "-" * len(head)]
    b = result["baseline"]
    lines.append(
        f"{'no reduction':<20}{'-':<22}{'-':>3}{b['visual_tokens']:>8}{b['visual_tokens']:>8}"
        f"{0:>9.1%}{0:>11.2f}{b['llm_prefill_seconds']:>8.3f}{1:>9.2f}  -"
    )
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['config']:<20}{r['method']:<22}  {r['status']}: {r['reason']}")
            continue
        lines.append(
            f"{r['config']:<20}{r['method']:<22}{r['layer']:>3}{r['visual_before']:>8}{r['visual_after']:>8}"
            f"{r['reduction_ratio']:>9.1%}{r['reduction_seconds'] * 1e3:>11.2f}"
            f"{r['llm_prefill_seconds']:>8.3f}"
            f"{r['speedup']:>9.2f}  {r['budget']}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pact import testing
    from pact.config import config_names, load_config

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # Every config and override is checked before the model is built (a typo fails in a second).
    names = [n.strip() for n in args.configs.split(",") if n.strip()] or [
        n for n in config_names() if n != "no_reduction"
    ]
    overrides = parse_overrides(getattr(args, "set", []), "--set")
    for name in names:
        load_config(name, **overrides)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_before = load_average()
    t0 = time.perf_counter()
    model, processor, what = bp.build_random_model(
        tiny=args.tiny, layers=args.layers, dtype=getattr(torch, args.dtype), attn="sdpa"
    )
    model.to(device)
    inputs = bp.build_inputs(processor, testing.demo_photo(), args.visual_tokens).to(device)
    n_visual = bp.count_visual(model, inputs)
    log(
        f"pact bench methods: {what} (built in {time.perf_counter() - t0:.1f} s); "
        f"{inputs['input_ids'].shape[1]} tokens, {n_visual} visual; load {load_before}"
    )
    base = bp.measure(
        model,
        inputs,
        label="no reduction",
        repeats=args.repeats,
        warmup=args.warmup,
        decode_tokens=0,
        device=device,
    ).summary()
    rows = []
    for name in names:
        t1 = time.perf_counter()
        rows.extend(bench_config(name, model, inputs, args, device, base["llm_prefill_seconds"], log))
        log(f"{name}: {rows[-1]['status']} ({time.perf_counter() - t1:.1f} s)")
    return {
        "benchmark": "methods",
        "command": "pact bench methods " + " ".join(getattr(args, "argv", []) or []),
        "machine": {**machine_info(device), "load_before": load_before, "load_after": load_average()},
        "model": {
            "description": what,
            "layers": model.config.get_text_config().num_hidden_layers,
            "dtype": args.dtype,
        },
        "input": {"tokens": int(inputs["input_ids"].shape[1]), "visual_tokens": n_visual},
        "target_ratio": args.target_ratio,
        "repeats": args.repeats,
        "baseline": {
            "visual_tokens": n_visual,
            "llm_prefill_seconds": base["llm_prefill_seconds"],
            "whole_call_seconds": base["whole_call_seconds"],
        },
        "rows": rows,
    }


report = format_table
