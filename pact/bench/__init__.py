"""`pact bench`: benchmarks (timings live here, never in tests).

    python -m pact.bench ops                      # DBDPC against the matmul floor, N = 1000 .. 16384
    python -m pact.bench ops --sizes 1000,4000 --repeats 1 --json out.json
    python -m pact.bench prefill ...              # see `pact bench prefill --help`
    python -m pact.bench methods ...              # see `pact bench methods --help`
    python -m pact.bench clustering ...           # see `pact bench clustering --help`
    python -m pact.bench throughput ...           # see `pact bench throughput --help`

One module per benchmark in this package (`ops`, `prefill`, `methods`, `clustering`, `throughput`),
each with the same three functions: `add_arguments(parser)` (its options), `run(args) -> result`
(a JSON-able dict; progress goes to stdout) and `report(result) -> str` (the table printed at the
end), plus `plot(result, path)` if it draws a figure (`--plot`). This module is the command: it
imports only the benchmark asked for, runs it, prints the report and writes `--json` / `--plot`.
The measuring helpers they share are here too (machine description, load average, strict JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any

BENCHMARKS: dict[str, str] = {
    "ops": "DBDPC against one float32 x @ x.T (the matmul floor)",
    "prefill": "prefill speed-up on a random VLM",
    "methods": "every method at one budget",
    "clustering": "clustering baselines (ours, scikit-learn) vs N",
    "throughput": "generation throughput, TTFT, peak memory: stock vs PACT",
}
"""name -> one-line help; the benchmark is the module ``pact.bench.<name>``."""


# ------------------------------------------------------------------------------------ shared helpers


def load_average() -> list[float] | None:
    """The machine's 1/5/15-minute load averages (a shared machine's noise), None if unknown."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: Any = None) -> dict[str, Any]:
    """CPU model, cores, Python/torch (and transformers) versions, torch threads, date, load average;
    with a ``device``, its name (and the GPU's)."""
    import torch

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": load_average(),
    }
    if device is not None:
        import transformers

        device = torch.device(device)
        info["transformers"] = transformers.__version__
        info["device"] = str(device)
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
    return info


def json_safe(x: Any) -> Any:
    """``x`` with NaN/inf floats replaced by None (strict JSON) and tuples by lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def write_json(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a benchmark result as strict JSON (non-finite floats become null); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return out


# ------------------------------------------------------------------------------------------- command


def _module(name: str) -> Any:
    return importlib.import_module(f"pact.bench.{name}")


def finish(module: Any, args: argparse.Namespace, result: dict[str, Any]) -> int:
    """Print the benchmark's report and write the JSON / plot the arguments ask for."""
    text = module.report(result)
    if text:
        print(text)
    if getattr(args, "json", None):
        print(f"wrote {write_json(result, args.json)}")
    if getattr(args, "plot", None):
        print(f"wrote {module.plot(result, args.plot)}")
    return 0


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The `pact bench` parser; only the benchmark named first in ``argv`` is imported (its options)."""
    parser = argparse.ArgumentParser(
        prog="pact bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(BENCHMARKS) + "}")
    for name, help_ in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_)
        if argv[:1] == [name]:
            module = _module(name)
            p.description = module.__doc__
            p.formatter_class = argparse.RawDescriptionHelpFormatter
            module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`pact bench <name> [options]`: run one benchmark; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    args.argv = argv[1:]
    module = _module(args.command)
    return finish(module, args, module.run(args))
