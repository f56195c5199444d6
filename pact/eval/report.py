"""``pact report RUN_DIR...``: scores of evaluation runs against their no-reduction runs.

A run is one lmms-eval results file (``<date id>_results.json``) and, next to it, the metrics file
our models write (``<date id>_pact_metrics.json``). Each RUN_DIR is searched recursively, so a
whole sweep folder can be given at once.

Pairing: the reference of a run's task is a run of the same checkpoint (``pretrained``) on the
same task whose configuration has ``reduction: false`` (method label ``no_reduction``): the newest
one with the same batch size, dtype, process count and device if there is one (so throughput and
memory compare like with like), else the newest. Add the baseline's folder to the arguments (or
``--baseline DIR``).

Per benchmark the report gives the score, the reference score and their ratio (reference / score
for lower-is-better metrics; a task with several metrics averages their ratios), the task's
reduction ratio, the throughput ratio (samples/s over the reference's), prefill time, decode
tokens/s and peak memory. Runs with the same checkpoint and the same effective configuration form
one *operating point*; its metric ratio is the mean over its benchmarks (the paper's
"Approach-to-Reference Metric Ratio") and its reduction ratio is token-weighted over its runs.

    pact report runs/ --csv report.csv --markdown report.md
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pact.cli import output_file
from pact.eval.metrics import method_label

_SKIP_METRIC_PARTS = ("_stderr",)


@dataclass
class Run:
    """One lmms-eval results file and its pact metrics (None for runs of other models)."""

    results_path: Path
    results: dict[str, Any]
    metrics: dict[str, Any] | None

    @property
    def date_id(self) -> str:
        return self.results_path.name[: -len("_results.json")]

    @property
    def pretrained(self) -> str:
        if self.metrics:
            return str(self.metrics.get("pretrained", ""))
        args = str(self.results.get("config", {}).get("model_args", ""))
        for part in args.split(","):
            if part.startswith("pretrained="):
                return part.split("=", 1)[1]
        return str(self.results.get("model_name") or self.results.get("config", {}).get("model", ""))

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.metrics.get("config", {})) if self.metrics else {}

    @property
    def label(self) -> str:
        if self.metrics:
            return str(self.metrics.get("label") or method_label(self.config))
        return str(self.results.get("config", {}).get("model", "unknown"))

    @property
    def is_reference(self) -> bool:
        return bool(self.metrics) and not self.config.get("reduction", True)

    @property
    def point_key(self) -> str:
        """Same checkpoint + same effective configuration (+ label) = one operating point."""
        cfg = {k: v for k, v in self.config.items() if k != "log_output_path"}
        return json.dumps([self.pretrained, self.label, cfg], sort_keys=True, default=str)

    def scores(self) -> dict[str, dict[str, tuple[float, bool]]]:
        """task -> metric -> (value, higher_is_better), leaf tasks only, numeric metrics only."""
        out: dict[str, dict[str, tuple[float, bool]]] = {}
        leaves = set(self.results.get("configs", {})) or set(self.results.get("results", {}))
        hib = self.results.get("higher_is_better", {})
        for task, values in self.results.get("results", {}).items():
            if task not in leaves:
                continue
            for key, value in values.items():
                metric = key.split(",")[0]
                if key == "alias" or any(p in metric for p in _SKIP_METRIC_PARTS):
                    continue
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                    continue
                higher = bool(hib.get(task, {}).get(metric, True))
                out.setdefault(task, {})[metric] = (float(value), higher)
        return out

    def task_metrics(self, task: str) -> dict[str, Any]:
        """Reduction numbers of one task (per-task part of the metrics file) + run-level timings."""
        if not self.metrics:
            return {}
        summary = self.metrics.get("summary", {})
        per_task = self.metrics.get("per_task", {}).get(task, {})
        return {**summary, **per_task}


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every ``*_results.json`` under the given files/folders, with its metrics file if present."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file() and p.name.endswith("_results.json"):
            files.append(p)
        elif p.is_dir():
            files.extend(sorted(p.rglob("*_results.json")))
        elif p.is_file():
            raise ValueError(f"{p}: not an lmms-eval results file (expected a folder or a *_results.json)")
        else:
            raise FileNotFoundError(f"no such run directory or results file: {p}")
    runs = []
    for f in dict.fromkeys(files):  # unique, ordered
        results = read_json_object(f)
        if not isinstance(results.get("results"), dict):
            # Not silently skipped: a run without scores would vanish from the table unnoticed.
            raise ValueError(
                f"{f}: not an lmms-eval results file: no 'results' object (an interrupted run? "
                "move it out of the folder)"
            )
        metrics_path = f.with_name(f.name[: -len("_results.json")] + "_pact_metrics.json")
        metrics = read_json_object(metrics_path) if metrics_path.exists() else None
        runs.append(Run(f, results, metrics))
    return runs


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ValueError naming the file for invalid JSON or a non-object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got a JSON {type(data).__name__}")
    return data


@dataclass
class Row:
    """One benchmark of one run, with its reference."""

    model: str
    method: str
    task: str
    metrics: str
    score: float
    reference: float | None
    ratio: float | None
    reduction_ratio: float | None
    equivalent_reduction_ratio: float | None
    throughput_ratio: float | None
    samples_per_second: float | None
    prefill_seconds: float | None
    decode_tokens_per_second: float | None
    peak_memory_gb: float | None
    reference_peak_memory_gb: float | None
    visual_before: int | None = None
    visual_after: int | None = None
    point: str = field(default="", repr=False)
    date_id: str = field(default="", repr=False)


def _metric_ratio(score: float, ref: float, higher: bool) -> float | None:
    if higher:
        return score / ref if ref != 0 else None
    return ref / score if score != 0 else None


def _setup(run: Run) -> tuple:
    """What must match for timings to be comparable: batch size, dtype, processes, device."""
    m = run.metrics or {}
    return (m.get("batch_size"), m.get("dtype"), m.get("world_size"), m.get("device"))


def _references(runs: Sequence[Run]) -> dict[tuple[str, str], list[Run]]:
    """(checkpoint, task) -> no-reduction runs, newest first."""
    refs: dict[tuple[str, str], list[Run]] = {}
    for run in sorted((r for r in runs if r.is_reference), key=lambda r: r.date_id, reverse=True):
        for task in run.scores():
            refs.setdefault((run.pretrained, task), []).append(run)
    return refs


def _pick_reference(run: Run, candidates: Sequence[Run]) -> Run | None:
    """The run itself if it is a reference, else the newest candidate with the same setup (batch
    size, dtype, processes, device), else the newest candidate."""
    if run.is_reference:
        return run
    same = [c for c in candidates if _setup(c) == _setup(run)]
    return (same or list(candidates) or [None])[0]


def build_rows(runs: Sequence[Run]) -> list[Row]:
    """One row per (run, task); references get ratio 1 against themselves."""
    refs = _references(runs)
    rows: list[Row] = []
    for run in sorted(runs, key=lambda r: (r.pretrained, r.label, r.date_id)):
        for task, metrics in sorted(run.scores().items()):
            ref_run = _pick_reference(run, refs.get((run.pretrained, task), []))
            ref_scores = ref_run.scores().get(task, {}) if ref_run else {}
            ratios = [
                _metric_ratio(v, ref_scores[m][0], higher)
                for m, (v, higher) in metrics.items()
                if m in ref_scores
            ]
            ratios = [r for r in ratios if r is not None]
            main_metric = next(iter(metrics))
            tm = run.task_metrics(task)
            ref_tm = ref_run.task_metrics(task) if ref_run else {}
            sps, ref_sps = tm.get("samples_per_second"), ref_tm.get("samples_per_second")
            rows.append(
                Row(
                    model=run.pretrained,
                    method=run.label,
                    task=task,
                    metrics=",".join(metrics),
                    score=metrics[main_metric][0],
                    reference=ref_scores[main_metric][0] if main_metric in ref_scores else None,
                    ratio=sum(ratios) / len(ratios) if ratios else None,
                    reduction_ratio=tm.get("reduction_ratio"),
                    equivalent_reduction_ratio=tm.get("equivalent_reduction_ratio"),
                    throughput_ratio=sps / ref_sps if sps and ref_sps else None,
                    samples_per_second=sps,
                    prefill_seconds=tm.get("prefill_seconds_mean"),
                    decode_tokens_per_second=tm.get("decode_tokens_per_second"),
                    peak_memory_gb=tm.get("peak_memory_gb_max"),
                    reference_peak_memory_gb=ref_tm.get("peak_memory_gb_max"),
                    visual_before=tm.get("visual_tokens_before"),
                    visual_after=tm.get("visual_tokens_after"),
                    point=run.point_key,
                    date_id=run.date_id,
                )
            )
    return rows


@dataclass
class Point:
    """An operating point: one checkpoint, one configuration, all its benchmarks."""

    model: str
    method: str
    benchmarks: int
    metric_ratio: float | None
    reduction_ratio: float | None
    equivalent_reduction_ratio: float | None
    throughput_ratio: float | None
    peak_memory_gb: float | None
    reference_peak_memory_gb: float | None


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def summarize_points(rows: Sequence[Row]) -> list[Point]:
    """Group rows into operating points (see the module docstring)."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.point, []).append(row)
    points = []
    for group in groups.values():
        before = sum(r.visual_before or 0 for r in group)
        after = sum(r.visual_after or 0 for r in group)
        reduction = 1.0 - after / before if before > 0 else _mean(r.reduction_ratio for r in group)
        points.append(
            Point(
                model=group[0].model,
                method=group[0].method,
                benchmarks=sum(1 for r in group if r.ratio is not None),
                metric_ratio=_mean(r.ratio for r in group),
                reduction_ratio=reduction,
                equivalent_reduction_ratio=_mean(r.equivalent_reduction_ratio for r in group),
                throughput_ratio=_mean(r.throughput_ratio for r in group),
                peak_memory_gb=max(
                    (r.peak_memory_gb for r in group if r.peak_memory_gb is not None), default=None
                ),
                reference_peak_memory_gb=max(
                    (r.reference_peak_memory_gb for r in group if r.reference_peak_memory_gb is not None),
                    default=None,
                ),
            )
        )
    return sorted(points, key=lambda p: (p.model, p.method, p.reduction_ratio or 0.0))


# ---------------------------------------------------------------------------------------------------
# Rendering

ROW_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("model", "model", "{}"),
    ("method", "method", "{}"),
    ("task", "task", "{}"),
    ("metric", "metrics", "{}"),
    ("score", "score", "{:.4g}"),
    ("reference", "reference", "{:.4g}"),
    ("ratio", "ratio", "{:.4f}"),
    ("reduction", "reduction_ratio", "{:.4f}"),
    ("throughput x", "throughput_ratio", "{:.2f}"),
    ("samples/s", "samples_per_second", "{:.3g}"),
    ("prefill s", "prefill_seconds", "{:.3g}"),
    ("decode tok/s", "decode_tokens_per_second", "{:.3g}"),
    ("peak GB", "peak_memory_gb", "{:.2f}"),
    ("ref peak GB", "reference_peak_memory_gb", "{:.2f}"),
)

POINT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("model", "model", "{}"),
    ("method", "method", "{}"),
    ("benchmarks", "benchmarks", "{}"),
    ("metric ratio", "metric_ratio", "{:.4f}"),
    ("reduction", "reduction_ratio", "{:.4f}"),
    ("equiv. reduction", "equivalent_reduction_ratio", "{:.4f}"),
    ("throughput x", "throughput_ratio", "{:.2f}"),
    ("peak GB", "peak_memory_gb", "{:.2f}"),
    ("ref peak GB", "reference_peak_memory_gb", "{:.2f}"),
)


def _cells(obj: Any, columns: Sequence[tuple[str, str, str]]) -> list[str]:
    out = []
    for _, attr, fmt in columns:
        value = getattr(obj, attr)
        out.append("-" if value is None else fmt.format(value))
    return out


def format_text(objs: Sequence[Any], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width text table."""
    header = [c[0] for c in columns]
    body = [_cells(o, columns) for o in objs]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt_row = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([fmt_row(header), line, *(fmt_row(r) for r in body)])


def format_markdown(objs: Sequence[Any], columns: Sequence[tuple[str, str, str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    header = [c[0] for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cells(o, columns)) + " |" for o in objs]
    return "\n".join(lines)


def write_csv(path: str | Path, objs: Sequence[Any], columns: Sequence[tuple[str, str, str]]) -> None:
    """Raw values (no rounding) under the column names."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([c[1] for c in columns])
        for o in objs:
            writer.writerow(["" if getattr(o, c[1]) is None else getattr(o, c[1]) for c in columns])


def main(argv: list[str] | None = None) -> int:
    """``pact report RUN_DIR... [--baseline DIR] [--csv FILE] [--points-csv FILE] [--markdown FILE]``."""
    parser = argparse.ArgumentParser(
        prog="pact report",
        description="Per-benchmark scores of lmms-eval runs against their no-reduction runs.",
    )
    parser.add_argument("runs", nargs="+", help="lmms-eval output folders or *_results.json files")
    parser.add_argument("--baseline", action="append", default=[], help="extra folder with no-reduction runs")
    parser.add_argument("--csv", type=output_file, help="write the per-benchmark table as CSV")
    parser.add_argument("--points-csv", type=output_file, help="write the operating-point table as CSV")
    parser.add_argument("--markdown", type=output_file, help="write both tables as Markdown")
    args = parser.parse_args(argv)
    try:
        runs = find_runs([*args.runs, *args.baseline])
    except FileNotFoundError as e:
        parser.error(str(e))
    if not runs:
        print("pact report: no *_results.json found under " + ", ".join(args.runs), file=sys.stderr)
        return 1
    rows = build_rows(runs)
    points = summarize_points(rows)
    if not any(r.reference is not None for r in rows):
        print("note: no no-reduction run (reduction: false) found for these models/tasks; ratios are empty\n")
    print(format_text(rows, ROW_COLUMNS))
    print()
    print(format_text(points, POINT_COLUMNS))
    if args.csv:
        write_csv(args.csv, rows, ROW_COLUMNS)
    if args.points_csv:
        write_csv(args.points_csv, points, POINT_COLUMNS)
    if args.markdown:
        text = "## Benchmarks\n\n" + format_markdown(rows, ROW_COLUMNS)
        text += "\n\n## Operating points\n\n" + format_markdown(points, POINT_COLUMNS) + "\n"
        Path(args.markdown).write_text(text, encoding="utf-8")
    return 0
