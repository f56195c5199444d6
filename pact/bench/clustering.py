"""`pact bench clustering`: DBDPC and the clustering baselines against the matmul floor, time vs N.

Every algorithm clusters the same N x D float32 points (``pact.bench.make_points``: "blobs" on the
unit sphere, like visual-token keys; D = 512, the concatenated KV heads of a 7B model) and is timed
against one float32 ``x @ x.T`` -- the N x N product any of them must at least do (the floor):

* ours (``pact.ops``): DBDPC (cutoff 0.21), DPC, k-means (Lloyd, float32 torch), agglomerative
  (scikit-learn on our float32 cosine-distance matrix), DBSCAN (vectorised, cosine);
* scikit-learn's own: ``KMeans`` (Lloyd, random init, one run), ``AgglomerativeClustering``
  (``metric="cosine"``), ``DBSCAN`` (``metric="cosine"``).

Settings: the count-based methods keep ``--keep`` x N clusters (default 0.3, i.e. a 70% reduction);
DBDPC's cutoff and DBSCAN's eps are 0.21; DBSCAN's min_samples 5; k-means runs at most
``--kmeans-iters`` updates (default 20; the method's default is 100 -- the time grows linearly);
agglomerative uses the config default linkage. An algorithm whose time, extrapolated from the
previous size as N^2 (N^3 for agglomerative), would exceed ``--max-seconds`` is skipped at the
larger sizes and listed as such, so the benchmark stays within minutes on two CPU cores.

    pact bench clustering --json docs/figures/clustering.json --plot docs/figures/clustering_time_vs_n.png
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pact.bench import load_average, machine_info
from pact.cli import int_at_least, int_list_at_least, nonnegative_float, output_file, positive_float

# name -> (implementation, how its time grows with N for the skip rule)
ALGORITHMS: dict[str, tuple[str, int]] = {
    "x @ x.T (floor)": ("floor", 2),
    "DBDPC": ("ours", 2),
    "DPC": ("ours", 2),
    "k-means": ("ours", 2),
    "agglomerative": ("ours", 3),
    "DBSCAN": ("ours", 2),
    "k-means (scikit-learn)": ("scikit-learn", 2),
    "agglomerative (scikit-learn)": ("scikit-learn", 3),
    "DBSCAN (scikit-learn)": ("scikit-learn", 2),
}


def runners(x: torch.Tensor, args: argparse.Namespace) -> dict[str, Callable[[], int]]:
    """name -> a call that clusters ``x`` and returns the number of clusters (points kept)."""
    from pact.config import load_config
    from pact.ops import clustering as C
    from pact.ops.dbdpc import dbdpc

    n = x.shape[0]
    k = max(1, round(args.keep * n))
    linkage = load_config().linkage

    def sk_kmeans() -> int:
        from sklearn.cluster import KMeans

        KMeans(
            n_clusters=k, init="random", n_init=1, max_iter=args.kmeans_iters, tol=0.0, random_state=0
        ).fit(x.numpy())
        return k

    def sk_agglomerative() -> int:
        from sklearn.cluster import AgglomerativeClustering

        AgglomerativeClustering(n_clusters=k, metric="cosine", linkage=linkage).fit(x.numpy())
        return k

    def sk_dbscan() -> int:
        from sklearn.cluster import DBSCAN

        labels = DBSCAN(eps=args.cutoff, min_samples=5, metric="cosine").fit(x.numpy()).labels_
        return len(set(labels.tolist()) - {-1})

    return {
        "x @ x.T (floor)": lambda: int((x @ x.T).shape[0]),
        "DBDPC": lambda: int(dbdpc(x, args.cutoff)[0].numel()),
        "DPC": lambda: int(C.dpc(x, k)[0].numel()),
        "k-means": lambda: int(C.kmeans(x, k, iters=args.kmeans_iters)[0].numel()),
        "agglomerative": lambda: int(C.agglomerative(x, k, linkage=linkage)[0].numel()),
        "DBSCAN": lambda: int(C.dbscan(x, args.cutoff, 5)[0].numel()),
        "k-means (scikit-learn)": sk_kmeans,
        "agglomerative (scikit-learn)": sk_agglomerative,
        "DBSCAN (scikit-learn)": sk_dbscan,
    }


def _time(fn: Callable[[], int], repeats: int) -> tuple[float, int]:
    """Median seconds of ``fn`` (one run if it takes over a second) and its cluster count."""
    t0 = time.perf_counter()
    clusters = fn()
    times = [time.perf_counter() - t0]
    while len(times) < repeats and times[0] < 1.0:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), clusters


def bench_clustering(args: argparse.Namespace, log: Callable[[str], None]) -> list[dict[str, Any]]:
    from pact.bench.ops import make_points

    names = algorithm_names(args.algorithms)
    rows: list[dict[str, Any]] = []
    last: dict[str, tuple[int, float]] = {}
    for n in args.sizes:
        x = make_points("blobs", n, args.dim).contiguous()
        run = runners(x, args)
        run["x @ x.T (floor)"]()  # warm-up: allocator and thread pool
        floor = None
        for name in names:
            impl, power = ALGORITHMS[name]
            row: dict[str, Any] = {"algorithm": name, "implementation": impl, "n": n, "dim": args.dim}
            if name in last:
                prev_n, prev_s = last[name]
                predicted = prev_s * (n / prev_n) ** power
                if predicted > args.max_seconds:
                    row.update(skipped=f"predicted {predicted:.0f} s > --max-seconds {args.max_seconds:g}")
                    rows.append(row)
                    log(f"{n:6d} {name:<30} skipped ({row['skipped']})")
                    last[name] = (n, predicted)
                    continue
            if name not in last:
                run[name]()  # warm-up at the first size: lazy imports, allocator, thread pool
            seconds, clusters = _time(run[name], args.repeats)
            last[name] = (n, seconds)
            if name == "x @ x.T (floor)":
                floor = seconds
            row.update(seconds=seconds, clusters=clusters, ratio_to_floor=seconds / floor if floor else None)
            rows.append(row)
            log(
                f"{n:6d} {name:<30} {seconds:9.3f} s  clusters {clusters:6d}"
                + (f"  x{row['ratio_to_floor']:.1f} floor" if floor and name != "x @ x.T (floor)" else "")
            )
    return rows


def plot_time_vs_n(result: dict[str, Any], path: str | Path) -> Path:
    """Log-log time vs N of every algorithm, with the matmul floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pact.eval.plot import save_figure

    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    styles = {
        "floor": dict(color="black", ls="--", lw=2),
        "ours": dict(ls="-", marker="o"),
        "scikit-learn": dict(ls=":", marker="s"),
    }
    colors: dict[str, str] = {}
    for name in ALGORITHMS:
        pts = [(r["n"], r["seconds"]) for r in result["rows"] if r["algorithm"] == name and "seconds" in r]
        if not pts:
            continue
        impl = ALGORITHMS[name][0]
        base = name.replace(" (scikit-learn)", "")
        style = dict(styles[impl])
        if impl != "floor":
            style.setdefault("color", colors.setdefault(base, f"C{len(colors)}"))
        label = name + (" (ours)" if impl == "ours" else "")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
    m = result["machine"]
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"N points (D = {result['dim']}, float32)")
    ax.set_ylabel("seconds")
    ax.set_title(
        f"clustering time vs N -- CPU {m['cpu']} ({m['torch_threads']} threads), {m['date'][:10]}", fontsize=9
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path, dpi=120)


def keep_fraction(text: str) -> float:
    """argparse type of --keep: a fraction in (0, 1]."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text}")
    return value


def algorithm_names(text: str) -> list[str]:
    """The --algorithms selection (default: all); ValueError naming the unknown ones."""
    names = [a.strip() for a in text.split(",") if a.strip()] or list(ALGORITHMS)
    unknown = [a for a in names if a not in ALGORITHMS]
    if unknown:
        raise ValueError(f"--algorithms: unknown algorithm(s) {unknown}; choose from {list(ALGORITHMS)}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `pact bench clustering` (also used by pact.bench's subparser)."""
    p.add_argument(
        "--sizes",
        type=int_list_at_least(2),
        default=(1000, 2000, 4000, 8000, 16384),
        help="comma-separated N >= 2",
    )
    p.add_argument("--dim", type=int_at_least(1), default=512, help="point dimension D (default 512)")
    p.add_argument("--algorithms", default="", help=f"subset, comma-separated, of: {', '.join(ALGORITHMS)}")
    p.add_argument(
        "--keep",
        type=keep_fraction,
        default=0.3,
        help="clusters / N of the count-based methods, (0, 1] (0.3)",
    )
    p.add_argument("--cutoff", type=positive_float, default=0.21, help="DBDPC cutoff and DBSCAN eps (0.21)")
    p.add_argument(
        "--kmeans-iters", type=int_at_least(1), default=20, help="k-means updates at most (default 20)"
    )
    p.add_argument(
        "--repeats", type=int_at_least(1), default=3, help="median of this many runs under 1 s (default 3)"
    )
    p.add_argument(
        "--max-seconds",
        type=nonnegative_float,
        default=60.0,
        help="skip an algorithm at sizes it is predicted to exceed this time (default 60)",
    )
    p.add_argument("--threads", type=int_at_least(1), help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=output_file, help="write the rows and machine info to this JSON file")
    p.add_argument("--plot", type=output_file, help="write the time vs N PNG here")


def run(args: argparse.Namespace) -> dict[str, Any]:

    algorithm_names(args.algorithms)  # before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = load_average()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    log(
        f"pact bench clustering: D={args.dim}, sizes {list(args.sizes)}, {torch.get_num_threads()} threads, "
        f"load {load_before}"
    )
    rows = bench_clustering(args, log)
    return {
        "benchmark": "clustering",
        "command": "pact bench clustering " + " ".join(getattr(args, "argv", []) or []),
        "machine": {**machine_info("cpu"), "load_before": load_before, "load_after": load_average()},
        "dim": args.dim,
        "keep": args.keep,
        "cutoff": args.cutoff,
        "kmeans_iters": args.kmeans_iters,
        "rows": rows,
    }


def format_table(result: dict[str, Any]) -> str:
    sizes = sorted({r["n"] for r in result["rows"]})
    head = f"{'algorithm':<30}" + "".join(f"{n:>10}" for n in sizes)
    lines = [f"seconds (D = {result['dim']}, float32; '-' = skipped, see JSON)", head, "-" * len(head)]
    for name in ALGORITHMS:
        cells = {r["n"]: r for r in result["rows"] if r["algorithm"] == name}
        if not cells:
            continue
        vals = "".join(
            f"{cells[n]['seconds']:>10.3f}" if "seconds" in cells.get(n, {}) else f"{'-':>10}" for n in sizes
        )
        lines.append(f"{name:<30}{vals}")
    return "\n".join(lines)


report = format_table
plot = plot_time_vs_n
