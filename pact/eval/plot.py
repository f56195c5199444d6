"""``pact plot RUN_DIR...``: "Approach-to-Reference Metric Ratio vs Reduction Ratio".

One line per method (operating points sorted by reduction ratio), one panel per checkpoint, in the
style of the paper's figures: x = visual-token reduction ratio, y = mean over benchmarks of
score / no-reduction score (see ``pact.eval.report`` for the pairing and the averages). Methods with
an "equivalent layer" (VTW, ToMe) are placed at their equivalent reduction ratio by default
(``--x equivalent``), which equals the plain reduction ratio for every one-step method.

    pact plot runs/ --out figure.png
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pact.cli import output_file
from pact.eval.report import Point, build_rows, find_runs, summarize_points


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Lay out ``fig``, write it to ``path`` (parent folders created), close it; returns the path.
    Every figure pact draws (``pact plot``, benchmarks, calibration, the demo) is saved here."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


# Fixed colours/markers for the paper's methods so figures are comparable across runs.
_STYLE: dict[str, tuple[str, str]] = {
    "pact": ("tab:red", "o"),
    "dbdpc": ("tab:orange", "s"),
    "euti": ("tab:green", "^"),
    "fastv": ("tab:blue", "v"),
    "tome": ("tab:purple", "D"),
    "vtw": ("tab:brown", "P"),
    "kmeans": ("tab:pink", "X"),
    "dpc": ("tab:olive", "<"),
    "agglomerative_single": ("tab:cyan", ">"),
    "dbscan": ("tab:gray", "*"),
}

_NAMES = {
    "pact": "PACT",
    "dbdpc": "DBDPC",
    "euti": "EUTI",
    "fastv": "FastV",
    "tome": "ToMe",
    "vtw": "VTW",
    "kmeans": "K-means",
    "dpc": "DPC",
    "agglomerative_single": "Agglomerative (single)",
    "agglomerative_average": "Agglomerative (average)",
    "agglomerative_complete": "Agglomerative (complete)",
    "dbscan": "DBSCAN",
    "no_reduction": "No reduction",
    # the ablation scripts' labels (paper Fig. 9, 10)
    "euti_global_query": "EUTI (global query only)",
    "euti_norm": "EUTI (norm only)",
    "pact_no_retrieval": "PACT (no retrieval)",
}


def display_name(method: str) -> str:
    """Legend name of a run label (``pact_layer8`` -> "PACT at layer 8")."""
    layer = re.fullmatch(r"pact_layer(\d+)", method)
    return f"PACT at layer {layer.group(1)}" if layer else _NAMES.get(method, method)


X_FIELDS = {
    "equivalent": ("equivalent_reduction_ratio", "Reduction Ratio"),
    "reduction": ("reduction_ratio", "Reduction Ratio (after the reduction layer)"),
}


def _x(point: Point, field: str) -> float | None:
    value = getattr(point, field)
    return value if value is not None else point.reduction_ratio


def plot_points(
    points: Sequence[Point],
    out: str | Path,
    *,
    x: str = "equivalent",
    title: str | None = None,
    include_reference: bool = False,
) -> Path:
    """Draw the figure to ``out`` (PNG or anything matplotlib infers from the suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    field, xlabel = X_FIELDS[x]
    usable = [
        p
        for p in points
        if p.metric_ratio is not None
        and _x(p, field) is not None
        and (include_reference or p.method != "no_reduction")
    ]
    if not usable:
        raise ValueError(
            "nothing to plot: no operating point has both a metric ratio (a matching no-reduction run) "
            "and a reduction ratio"
        )
    models = sorted({p.model for p in usable})
    fig, axes = plt.subplots(1, len(models), figsize=(6.4 * len(models), 4.8), squeeze=False)
    extra_colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
    for ax, model in zip(axes[0], models, strict=True):
        methods = sorted({p.method for p in usable if p.model == model})
        for method in methods:
            pts = sorted(
                (p for p in usable if p.model == model and p.method == method), key=lambda p: _x(p, field)
            )
            color, marker = _STYLE.get(method, (next(extra_colors), "o"))
            ax.plot(
                [_x(p, field) for p in pts],
                [p.metric_ratio for p in pts],
                marker=marker,
                color=color,
                linewidth=2 if method == "pact" else 1.5,
                markersize=6,
                label=display_name(method),
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("Approach-to-Reference Metric Ratio")
        ax.set_title(title or Path(model.rstrip("/")).name or model)
        ax.grid(True, linestyle="--", alpha=0.5)
        ax.legend(loc="lower left")
    fig.suptitle("Approach-to-Reference Metric Ratio vs Reduction Ratio")
    return save_figure(fig, out, dpi=150)


def main(argv: list[str] | None = None) -> int:
    """``pact plot RUN_DIR... [--out FILE] [--x equivalent|reduction] [--methods a,b] [--title T]``."""
    parser = argparse.ArgumentParser(
        prog="pact plot",
        description="Approach-to-Reference Metric Ratio vs Reduction Ratio, one line per method.",
    )
    parser.add_argument("runs", nargs="+", help="lmms-eval output folders or *_results.json files")
    parser.add_argument("--baseline", action="append", default=[], help="extra folder with no-reduction runs")
    parser.add_argument(
        "--out", type=output_file, default="metric_ratio_vs_reduction_ratio.png", help="output image"
    )
    parser.add_argument("--x", choices=sorted(X_FIELDS), default="equivalent", help="x axis (see module doc)")
    parser.add_argument("--methods", help="comma-separated method labels to draw (default: all)")
    parser.add_argument("--title", help="panel title (default: the checkpoint name)")
    args = parser.parse_args(argv)
    try:
        runs = find_runs([*args.runs, *args.baseline])
    except FileNotFoundError as e:
        parser.error(str(e))
    if not runs:
        print("pact plot: no *_results.json found under " + ", ".join(args.runs), file=sys.stderr)
        return 1
    points = summarize_points(build_rows(runs))
    if args.methods:
        wanted = {m.strip() for m in args.methods.split(",") if m.strip()}
        points = [p for p in points if p.method in wanted]
    try:
        out = plot_points(points, args.out, x=args.x, title=args.title)
    except ValueError as e:
        print(f"pact plot: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
