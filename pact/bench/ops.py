"""`pact bench ops`: DBDPC against the matmul floor.

    python -m pact.bench ops                      # N = 1000 .. 16384
    python -m pact.bench ops --sizes 1000,4000 --repeats 1 --json out.json

It times one float32 `x @ x.T` (the N x N matmul every DBDPC implementation must do, the floor),
one blocked pass computing the same dot products 128 rows at a time without storing them (the floor
without an N x N buffer) and `pact.ops.dbdpc` on the same N x D float32 points, for two kinds of
data: "blobs" (many small clusters of different tightness on the unit sphere, like visual-token
keys: clusters, chains and singletons at the default cutoff 0.21) and "random" (isotropic
Gaussian: every point is its own cluster). It also reports the peak extra resident memory of the
DBDPC call (and its analytic part: the N x N matrix, or the blocked form's fixed buffers without
its neighbour lists) and, for N up to --reference-max, the time of a re-implementation of the
reference's algorithm (report §2.6.2: N x N temporaries rebuilt on every round, one host
synchronisation per point in the sequential tail).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from pact.bench import load_average, machine_info
from pact.cli import int_at_least, int_list_at_least, output_file, positive_float
from pact.ops.dbdpc import MATRIX_MAX_POINTS, dbdpc, normalize_rows

# ------------------------------------------------------------------------------------------ data


def make_points(kind: str, n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """(n, dim) float32 benchmark points. kind: "blobs" or "random" (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(n, dim, generator=g)
    if kind != "blobs":
        raise ValueError(f"kind must be 'blobs' or 'random', got {kind!r}")
    k = max(1, n // 8)
    directions = torch.nn.functional.normalize(torch.randn(k, dim, generator=g), dim=1)
    which = torch.randint(0, k, (n,), generator=g)
    # Within a blob of noise scale s the pairwise cosine distance is about dim*s^2 / (1 + dim*s^2):
    # scales spread around the cutoff give tight clusters, loose ones and chains.
    scale = torch.empty(k).uniform_(0.2, 1.2, generator=g) * math.sqrt(0.2 / dim)
    return directions[which] + scale[which, None] * torch.randn(n, dim, generator=g)


# -------------------------------------------------------------------------------- measurements


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rss_kib(field: str) -> int | None:
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def peak_extra_bytes(fn: Callable[[], Any]) -> int | None:
    """Peak resident memory above the starting point while fn() runs (Linux: VmHWM after a reset)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    before = _rss_kib("VmRSS")
    fn()
    peak = _rss_kib("VmHWM")
    return None if before is None or peak is None else (peak - before) * 1024


def reference_style_dbdpc(
    x: torch.Tensor, cutoff: float, dn: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's DBDPC as described in report §2.6.2-2.6.3, in float32, for timing only.

    Every round rebuilds the sub-problem's N x N matrices (distances, rank comparison, inf-filled
    copy); when a round finds fewer than 10 centers the rest is scanned with one host
    synchronisation per candidate.
    """
    xn = normalize_rows(x)
    dist = (1.0 - xn @ xn.T).clamp_(min=0.0)
    dist.fill_diagonal_(0.0)
    rho = torch.exp(-((dist / dn) ** 2)).sum(1)
    rank = rho.argsort(stable=True).argsort()  # 0 = lowest density
    undecided = torch.arange(x.shape[0])
    centers: list[int] = []
    while undecided.numel():
        sub = dist[undecided][:, undecided]
        r = rank[undecided]
        not_denser = r[None, :] <= r[:, None]  # includes the point itself
        delta = sub.masked_fill(not_denser, math.inf).min(1).values
        delta[r == r.max()] = math.inf
        new = delta > cutoff
        if not bool(new.any()):
            break
        centers += undecided[new].tolist()
        near = (sub[new] <= cutoff).any(0)
        if int(new.sum()) < 10:
            cand = undecided[delta <= cutoff]
            cand = cand[torch.argsort(rho[cand], descending=True)]
            if centers:
                cand = cand[(dist[cand][:, centers] > cutoff).all(1)]
            taken = torch.zeros(cand.numel(), dtype=torch.bool)
            for i in range(cand.numel()):
                if bool(taken[i]):  # one host synchronisation per candidate, as in the reference
                    continue
                centers.append(int(cand[i]))
                taken |= dist[cand[i], cand] <= cutoff
            break
        undecided = undecided[~(near | new)]
    center_idx = torch.tensor(sorted(set(centers)), dtype=torch.long)
    labels = center_idx[dist[:, center_idx].argmin(1)]
    return center_idx, labels


def blocked_matmul_pass(x: torch.Tensor, rows: int = 128) -> None:
    """Every pairwise dot product of x's rows, `rows` rows at a time, nothing stored: the floor of
    any DBDPC that does not keep the N x N matrix."""
    out = torch.empty(rows, x.shape[0], dtype=x.dtype)
    xt = x.T
    for a in range(0, x.shape[0] - rows + 1, rows):
        torch.mm(x[a : a + rows], xt, out=out)
    if x.shape[0] % rows:
        x[x.shape[0] - x.shape[0] % rows :] @ xt


def bench_ops(
    sizes: tuple[int, ...] = (1000, 4000, 8000, 16384),
    dim: int = 512,
    repeats: int = 3,
    *,
    cutoff: float = 0.21,
    kinds: tuple[str, ...] = ("blobs", "random"),
    reference_max: int = 4000,
    matrix_max_points: int = MATRIX_MAX_POINTS,
    matmul_max: int = 16384,
    warmup: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Time DBDPC against one float32 x @ x.T and one blocked pass for every size and kind of data.

    Returns one dict per (size, kind): n, dim, data, form ("matrix" if n <= matrix_max_points, else
    "blocked"), clusters, matmul_s (one x @ x.T, only for n <= matmul_max, else None: it needs the
    N x N output), pass_s (`blocked_matmul_pass`), dbdpc_s (medians of `repeats` after one warm-up),
    ratio = dbdpc_s / matmul_s (or None), pass_ratio = dbdpc_s / pass_s, peak_extra_mib (measured,
    None where /proc is unavailable), analytic_mib (the fixed buffers of the chosen form) and reference_s
    (reference-style algorithm, one run, only for n <= reference_max, else None). The peak is
    measured over the timed runs; `warmup=False` skips the untimed first call (large N, where one
    call takes minutes and the warm-up effects are negligible).
    """
    rows = []
    for n in sizes:
        for kind in kinds:
            x = make_points(kind, n, dim)

            clusters: list[int] = []

            def run(x: torch.Tensor = x, clusters: list[int] = clusters) -> None:
                clusters.append(int(dbdpc(x, cutoff, matrix_max_points=matrix_max_points)[0].numel()))

            if warmup:
                run()  # allocator, thread pool
            matmul_s = _median_seconds(lambda x=x: x @ x.T, repeats) if n <= matmul_max else None
            pass_s = _median_seconds(lambda x=x: blocked_matmul_pass(x), repeats)
            timed: list[float] = []
            peak = peak_extra_bytes(lambda run=run, timed=timed: timed.append(_median_seconds(run, repeats)))
            dbdpc_s = timed[0]
            reference_s = None
            if n <= reference_max:
                reference_s = _median_seconds(lambda x=x: reference_style_dbdpc(x, cutoff), 1)
            stored = n <= matrix_max_points
            tile = max(1, -(-n // -(-n // max(1, (1 << 23) // n))))  # rows per distance tile
            # the matrix, or the blocked form's tile of distances and its bool mask (1/4 of a float);
            # its neighbour lists (8 bytes per pair within the cutoff) come on top, data-dependent
            distances = n * n if stored else tile * n * 5 // 4
            row = {
                "n": n,
                "dim": dim,
                "data": kind,
                "form": "matrix" if stored else "blocked",
                "clusters": clusters[-1],
                "matmul_s": matmul_s,
                "pass_s": pass_s,
                "dbdpc_s": dbdpc_s,
                "ratio": None if matmul_s is None else dbdpc_s / matmul_s,
                "pass_ratio": dbdpc_s / pass_s,
                "peak_extra_mib": None if peak is None else peak / 2**20,
                # distances + normalised copy + 1 MiB element-wise scratch
                "analytic_mib": (4 * distances + 4 * n * dim + 2**20) / 2**20,
                "reference_s": reference_s,
            }
            rows.append(row)
            if log:
                log(_format_row(row))
    return rows


def _format_row(r: dict[str, Any]) -> str:
    def opt(v: float | None, fmt: str, width: int) -> str:
        return format(v, fmt) if v is not None else "-".rjust(width)

    return (
        f"{r['n']:6d} {r['data']:>7s} {r['form']:>7s} {r['clusters']:8d} {opt(r['matmul_s'], '9.3f', 9)} "
        f"{r['pass_s']:9.3f} {r['dbdpc_s']:9.3f} {opt(r['ratio'], '6.2f', 6)} {r['pass_ratio']:6.2f} "
        f"{opt(r['peak_extra_mib'], '9.0f', 9)} {r['analytic_mib']:9.0f} {opt(r['reference_s'], '8.3f', 8)}"
    )


HEADER = (
    "     N    data    form clusters  x@x.T s   pass s  dbdpc s  ratio  /pass peak MiB  calc MiB  ref. s\n"
    "------ ------- ------- -------- -------- -------- -------- ------ ------ -------- --------- -------"
)


# ---------------------------------------------------------------------------------------- CLI


DATA_KINDS = ("blobs", "random")


def _data_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in DATA_KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"expected a subset of {','.join(DATA_KINDS)}, got {text!r}")
    return kinds


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `pact bench ops`."""
    p.add_argument(
        "--sizes", type=int_list_at_least(1), default=(1000, 4000, 8000, 16384), help="comma-separated N"
    )
    p.add_argument("--dim", type=int_at_least(1), default=512, help="point dimension D (default 512)")
    p.add_argument("--repeats", type=int_at_least(1), default=3, help="timed repetitions (median; 3)")
    p.add_argument("--cutoff", type=positive_float, default=0.21, help="DBDPC cutoff (default 0.21)")
    p.add_argument("--data", type=_data_kinds, default=("blobs", "random"), help="data kinds: blobs,random")
    p.add_argument(
        "--reference-max",
        type=int_at_least(0),
        default=4000,
        help="also time the reference-style algorithm up to this N (default 4000)",
    )
    p.add_argument(
        "--matrix-max-points",
        type=int_at_least(0),
        default=MATRIX_MAX_POINTS,
        help=f"DBDPC stores the N x N matrix up to this N, blocked above (default {MATRIX_MAX_POINTS})",
    )
    p.add_argument(
        "--matmul-max",
        type=int_at_least(0),
        default=16384,
        help="time the full x @ x.T (N x N output) only up to this N (default 16384)",
    )
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed first DBDPC call (large N)")
    p.add_argument("--threads", type=int_at_least(1), help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=output_file, help="write the rows and machine info to this JSON file")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time every (N, data kind), printing each row as it completes; returns the rows and machine."""
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print(
        f"pact bench ops: {info['cpu']}, {info['cpu_count']} cores, torch {info['torch']} "
        f"({info['torch_threads']} threads), {info['date']}, load {info['load_average']}"
    )
    print(f"D = {args.dim}, float32, cutoff {args.cutoff}, median of {args.repeats}")
    print(HEADER)
    rows = bench_ops(
        args.sizes,
        args.dim,
        args.repeats,
        cutoff=args.cutoff,
        kinds=tuple(args.data),
        reference_max=args.reference_max,
        matrix_max_points=args.matrix_max_points,
        matmul_max=args.matmul_max,
        warmup=not args.no_warmup,
        log=lambda line: print(line, flush=True),
    )
    info["load_average_after"] = load_average()
    return {
        "benchmark": "ops",
        "command": "pact bench ops " + " ".join(getattr(args, "argv", [])),
        "machine": info,
        "rows": rows,
    }


def report(result: dict[str, Any]) -> str:
    """Nothing more: the rows were printed as they completed."""
    return ""
