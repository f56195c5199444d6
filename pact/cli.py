"""The `pact` command line: demo, bench, methods, report, plot, config, calibrate.

Each subcommand lives in its own module and exposes `main(argv) -> int`; this file only dispatches,
so `pact --help` stays fast (heavy imports happen inside the chosen subcommand).
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("pact.demo", "run PACT on the bundled photo (tiny random Qwen2-VL, or --model DIR) and draw it"),
    "bench": ("pact.bench", "benchmarks: ops (DBDPC vs the matmul floor), prefill, methods"),
    "methods": ("pact.methods", "list the reduction methods and the model families they support"),
    "config": ("pact.config", "print the effective configuration of a JSON file plus overrides"),
    "report": ("pact.eval.report", "per-benchmark table of evaluation runs against their no-reduction runs"),
    "plot": ("pact.eval.plot", "metric ratio vs reduction ratio figure from evaluation runs"),
    "calibrate": ("pact.calibrate", "choose the reduction layer L (and DBDPC cutoff); write a config"),
}


def usage() -> str:
    lines = ["usage: pact <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `pact <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"pact: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    result = module.main(rest)
    return int(result or 0)
