"""Layer schedules of progressive dropping methods (V2Drop, PyramidDrop): where the stages are and how
many visual tokens each keeps, with or without a token budget. Pure Python, no tensors.

Both official codes give absolute layer indices for one model (LLaVA-1.5-7B, 32 decoder layers).
A schedule here is given for a model of ``depth`` layers and scaled to the model it runs on:
layer ``l`` -> ``floor(l * n / depth + 1/2)`` (the identity when n == depth; ``depth = 0``: the
layers are used as given).

Budget: with a target of K visual tokens per sample, a progressive method keeps, averaged over the
decoder layers from its first stage on, K tokens per layer -- the layer-mean cost of a single-step
method keeping K from that layer (the convention ToMe's budget follows with its equivalent layer).
The per-stage keep fractions are replaced by one geometric rate (``lambda`` per stage) found by
bisection: the largest lambda whose layer mean does not exceed K.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

__all__ = [
    "absolute_counts",
    "budget_counts",
    "layer_mean_from",
    "parse_layers",
    "parse_ratios",
    "relative_counts",
    "scale_layers",
]


def parse_layers(text: str) -> list[int]:
    """``"3,17,22"`` -> ``[3, 17, 22]``."""
    return [int(v) for v in text.split(",")]


def parse_ratios(text: str) -> list[float]:
    """``"0.5,0.25"`` -> ``[0.5, 0.25]``."""
    return [float(v) for v in text.split(",")]


def scale_layers(layers: Sequence[int], depth: int, num_layers: int) -> list[int]:
    """The schedule's layers on a model of ``num_layers`` layers (``depth`` 0: as given).

    Raises:
        ValueError: a layer falls outside the model, or two stages land on one layer.
    """
    if depth:
        out = [math.floor(int(v) * num_layers / depth + 0.5) for v in layers]
    else:
        out = [int(v) for v in layers]
    if out != sorted(set(out)):
        raise ValueError(
            f"the stage layers {list(layers)} give {out} on a {num_layers}-layer model: they must be "
            "strictly increasing (give absolute layers with depth 0)"
        )
    if out and out[-1] >= num_layers:
        raise ValueError(
            f"stage layer {out[-1]} (from {list(layers)}) but the model has only {num_layers} decoder layers"
        )
    return out


def relative_counts(n: int, ratios: Sequence[float]) -> list[int]:
    """V2Drop: tokens left after each stage, each keeping ``max(1, int(current * ratio))``."""
    counts, current = [], n
    for r in ratios:
        current = min(current, max(1, int(current * float(r))))
        counts.append(current)
    return counts


def absolute_counts(n: int, ratios: Sequence[float]) -> list[int]:
    """PyramidDrop: tokens left after each stage, ``int(n * ratio)`` of the ORIGINAL count n."""
    counts, current = [], n
    for r in ratios:
        current = min(current, int(n * float(r)))
        counts.append(current)
    return counts


def layer_mean_from(n: int, counts: Sequence[int], layers: Sequence[int], num_layers: int) -> float:
    """Mean visual tokens per decoder layer from ``layers[0]`` to the last layer, stage s keeping
    ``counts[s]`` from ``layers[s]`` on."""
    span = num_layers - layers[0]
    if span <= 0:
        return float(n)
    ends = [*layers[1:], num_layers]
    return sum(c * (e - s) for c, s, e in zip(counts, layers, ends, strict=True)) / span


def budget_counts(
    n: int,
    target: int,
    layers: Sequence[int],
    num_layers: int,
    counts_for: Callable[[float], list[int]],
    iters: int = 40,
) -> list[int]:
    """Per-stage counts whose layer mean (``layer_mean_from``) is the largest not above ``target``.

    ``counts_for(lam)`` gives the counts of the geometric schedule with rate ``lam`` in [0, 1] (its
    layer mean must not decrease with ``lam``). If even ``lam = 0`` exceeds the target (a method that
    always keeps a token), the ``lam = 0`` schedule is returned.
    """
    if layer_mean_from(n, counts_for(1.0), layers, num_layers) <= target:
        return counts_for(1.0)
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if layer_mean_from(n, counts_for(mid), layers, num_layers) <= target:
            lo = mid
        else:
            hi = mid
    return counts_for(lo)
