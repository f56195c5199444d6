"""The `pact` command line: demo, bench, methods, report, plot, config, calibrate.

Each subcommand lives in its own module and exposes `main(argv) -> int`; this file only dispatches,
so `pact --help` stays fast (torch and transformers are imported by the chosen subcommand only).
Adding a subcommand is one row of `SUBCOMMANDS`.

User mistakes (a bad value, a missing file, an unknown config key) are printed by `main` as one line,
`pact <command>: error: ...`, with exit code 2, whatever the subcommand; `--debug` anywhere on the
command line shows the traceback instead. Argument errors found by argparse also exit with 2.

The helpers below are shared by the subcommands: `--config`/`--set` options and `key=value`
overrides, and argparse types that validate numbers and output paths before any expensive work.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# name -> ("module" exposing main(argv) -> int, or "module:function", one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "pact.demo",
        "PACT on the bundled photo (random-weight Qwen2-VL, or --model DIR), timed and drawn",
    ),
    "bench": (
        "pact.bench",
        "benchmarks: ops (DBDPC vs the matmul floor), prefill, methods, clustering, throughput",
    ),
    "methods": ("pact.methods", "list the reduction methods and the model families they support"),
    "config": (
        "pact.cli:config_main",
        "print the effective configuration: a config name/file plus key=value overrides",
    ),
    "report": ("pact.eval.report", "per-benchmark table of evaluation runs against their no-reduction runs"),
    "plot": ("pact.eval.plot", "metric ratio vs reduction ratio figure from evaluation runs"),
    "calibrate": ("pact.calibrate", "choose the reduction layer L (and DBDPC cutoff); write a config"),
}

DEBUG_FLAG = "--debug"


class UsageError(ValueError):
    """A user mistake found by a subcommand: `pact` prints its message as one line, exit code 2."""


# Exceptions that mean "the input was wrong", not "pact has a bug": printed as one line. Anything
# else (a RuntimeError from torch, an AssertionError, ...) keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def usage() -> str:
    lines = ["usage: pact <command> [options]   (add --debug to see tracebacks)", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `pact <command> --help` for the options of one command."]
    return "\n".join(lines)


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (FileNotFoundError etc. keep their file name)."""
    text = str(error)
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    return " ".join(text.split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"pact: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module_name, _, function = SUBCOMMANDS[name][0].partition(":")
        entry = getattr(importlib.import_module(module_name), function or "main")
        return int(entry(rest) or 0)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"pact {name}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"pact {name}: interrupted", file=sys.stderr)
        return 130


# ------------------------------------------------------------------------------------------------
# config options shared by `config`, `demo` and `bench *`


def parse_overrides(items: Iterable[str], what: str = "override") -> dict[str, Any]:
    """``["layer=2", "cutoff=0.1", "pruning=fastv"]`` -> ``{"layer": 2, "cutoff": 0.1, "pruning": "fastv"}``.

    Values are JSON when they parse (``true``, ``0.5``, ``null``, ``"x"``), else the raw string.
    Raises UsageError for an item without ``=``, with an empty key, or a key given twice.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"{what} {item!r} is not of the form key=value (e.g. layer=2)")
        if key in out:
            raise UsageError(f"{what} key {key!r} is given twice")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def add_config_arguments(parser: argparse.ArgumentParser, default: str | None = "pact") -> None:
    """``--config NAME_OR_PATH`` and repeatable ``--set KEY=VALUE``."""
    shown = default or "the PACT defaults"
    parser.add_argument("--config", default=default, help=f"config name or JSON path (default: {shown})")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, repeatable, any accepted key name (e.g. --set layer=2)",
    )


def load_config_arguments(config: Any, overrides: Iterable[str] | dict[str, Any]) -> Any:
    """The validated PactConfig of a ``--config`` value plus ``--set`` overrides (strings or a dict).

    Raises ValueError (one line, names the key) / FileNotFoundError before any model is built.
    """
    from pact.config import load_config

    values = overrides if isinstance(overrides, dict) else parse_overrides(overrides, "--set")
    return load_config(config, **values)


# ------------------------------------------------------------------------------------------------
# argparse types: reject bad numbers and paths when the arguments are parsed


def _number(text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        name = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None


def int_at_least(lo: int):
    """argparse type: an integer >= lo."""

    def parse(text: str) -> int:
        value = _number(text, int)
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {value}")
        return value

    parse.__name__ = f"integer >= {lo}"
    return parse


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _number(text, float)
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = _number(text, float)
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def reduction_ratio(text: str) -> float:
    """argparse type: a reduction ratio in [0, 1) (1 would remove every visual token)."""
    value = _number(text, float)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(
            f"must be a reduction ratio in [0, 1) (fraction of visual tokens removed), got {text}"
        )
    return value


def int_list_at_least(lo: int):
    """argparse type: comma-separated integers, each >= lo, at least one."""
    one = int_at_least(lo)

    def parse(text: str) -> tuple[int, ...]:
        values = tuple(one(v.strip()) for v in text.split(",") if v.strip())
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers >= {lo}, got {text!r}")
        return values

    parse.__name__ = f"list of integers >= {lo}"
    return parse


def ratio_list(text: str) -> tuple[float, ...]:
    """argparse type: comma-separated reduction ratios in [0, 1) (may be empty)."""
    return tuple(reduction_ratio(v.strip()) for v in text.split(",") if v.strip())


def _probe_directory(directory: Path, text: str) -> None:
    """Create ``directory`` (as the writer would at the end) and check a file can be created in it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=directory, prefix=".pact-write-check-").close()  # deleted on close
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {reason} ({directory})") from None


def output_file(text: str) -> str:
    """argparse type: a file path that can be written at the end of a run (checked now, not after it).

    Creates the missing parent directories (the writers would) and probes them with a temporary
    file; the output file itself is neither created nor truncated.
    """
    path = Path(text)
    if not text or path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, expected a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: permission denied")
    _probe_directory(path.absolute().parent, text)
    return text


def output_dir(text: str) -> str:
    """argparse type: a directory that can be written into (created now if missing)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    _probe_directory(path.absolute(), text)
    return text


def device_name(text: str) -> str:
    """argparse type: a torch device string usable on this machine (cpu, cuda, cuda:N, mps)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return text


def existing_file(text: str) -> str:
    """argparse type: a file that exists (images, checkpoints' files)."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


def existing_dir(text: str) -> str:
    """argparse type: a directory that exists (a local checkpoint)."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {text!r}")
    return text


# ------------------------------------------------------------------------------------------------
# `pact config`


def config_main(argv: list[str] | None = None) -> int:
    """`pact config [NAME_OR_PATH] [key=value ...]`: print the effective configuration as JSON."""
    from pact.config import config_names

    parser = argparse.ArgumentParser(
        prog="pact config",
        description="Print the effective configuration (our key names) of a config name or JSON file "
        'plus key=value overrides. Values are parsed as JSON when possible (true, 0.5, null, "x"), '
        "else taken as strings. Without a config, the PACT defaults.",
        epilog="examples: pact config pact layer=2   pact config keep_ratio=0.3   pact config --list",
    )
    parser.add_argument(
        "config", nargs="?", default=None, help="config name or JSON path (default: defaults)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, any accepted key name")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="same as key=value")
    parser.add_argument("--list", action="store_true", help="list the bundled config names and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(config_names()))
        return 0
    items = list(args.overrides) + list(args.set)
    config = args.config
    if config is not None and "=" in config and not Path(config).exists():
        items.insert(0, config)  # `pact config keep_ratio=0.3`: an override of the defaults
        config = None
    print(load_config_arguments(config, parse_overrides(items)).to_json())
    return 0
