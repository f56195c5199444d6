"""ToMe in the LLM (pact.ops.tome): bipartite matching, merging, schedules, against plain references."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pact.ops.tome import bipartite_merge, merge_reduction, tome_clamp, tome_reduce, tome_schedule, vtw_layer

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


def ref_bipartite(x: torch.Tensor, r: int, sizes: list[float]) -> tuple[list[int], list[int], list[float]]:
    """Plain-loop ToMe step: A even, B odd, best B per A, r best A merged (ties -> lower index)."""
    n = x.shape[0]
    xn = torch.nn.functional.normalize(x.float(), dim=1, eps=1e-12)
    a_idx, b_idx = list(range(0, n, 2)), list(range(1, n, 2))
    r = max(0, min(r, len(a_idx) if b_idx else 0))
    best = []
    for i in a_idx:
        sims = [float(xn[i] @ xn[j]) for j in b_idx]
        j = max(range(len(b_idx)), key=lambda t: (sims[t], -t)) if b_idx else None
        best.append((sims[j] if b_idx else -math.inf, i, b_idx[j] if b_idx else None))
    chosen = sorted(best, key=lambda e: (-e[0], e[1]))[:r]
    target = list(range(n))
    for _, i, j in chosen:
        target[i] = j
    kept = [i for i in range(n) if target[i] == i]
    slot = {k: s for s, k in enumerate(kept)}
    labels = [slot[target[i]] for i in range(n)]
    new_sizes = [0.0] * len(kept)
    for i in range(n):
        new_sizes[labels[i]] += sizes[i]
    return kept, labels, new_sizes


@SETTINGS
@given(n=st.integers(0, 25), r=st.integers(-2, 20), seed=st.integers(0, 1000))
def test_bipartite_merge_matches_reference(n, r, seed):
    g = torch.Generator().manual_seed(seed)
    # Axis-aligned rows (+-e_k scaled, or zero): cosines are exactly 0 or +-1, so similarity ties are
    # common and exact, and must break towards lower indices.
    axis = torch.randint(0, 4, (n,), generator=g)
    scale = torch.tensor([-2.0, -1.0, 0.0, 1.0, 4.0])[torch.randint(0, 5, (n,), generator=g)]
    x = torch.zeros(n, 4)
    x[torch.arange(n), axis] = scale
    sizes = torch.randint(1, 5, (n,), generator=g).float()
    kept, labels, new_sizes = bipartite_merge(x, r, sizes)
    rk, rl, rs = ref_bipartite(x, r, sizes.tolist())
    assert kept.tolist() == rk
    assert labels.tolist() == rl
    assert new_sizes.tolist() == rs
    assert float(new_sizes.sum()) == float(sizes.sum())


def test_bipartite_merge_stars_and_feasibility():
    # Every A token is most similar to B token 1: all merged A tokens join it (a star).
    x = torch.tensor([[1.0, 0.0], [1.0, 0.01], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, -1.0]])
    kept, labels, sizes = bipartite_merge(x, 3)
    assert kept.tolist() == [1, 3, 5]
    assert labels.tolist() == [0, 0, 0, 1, 0, 2]
    assert sizes.tolist() == [4.0, 1.0, 1.0]
    assert bipartite_merge(x, 100)[0].numel() == 3  # r clamped to |A|
    assert bipartite_merge(x[:1], 5)[0].tolist() == [0]  # no B token: nothing to merge into
    assert bipartite_merge(x[:0], 5)[0].numel() == 0


def test_bipartite_merge_bf16_and_determinism():
    x = torch.randn(30, 8).to(torch.bfloat16)
    a = bipartite_merge(x, 7)
    b = bipartite_merge(x.float(), 7)
    c = bipartite_merge(x, 7)
    for u, v, w in zip(a, b, c, strict=True):
        assert torch.equal(u, v) and torch.equal(u, w)


def test_merge_reduction_size_weighted_mean():
    h = torch.randn(6, 4)
    kept = torch.tensor([1, 3, 4])
    labels = torch.tensor([0, 0, -1, 1, 2, 1])
    sizes = torch.tensor([2.0, 1.0, 7.0, 3.0, 1.0, 5.0])
    red = merge_reduction(h.to(torch.bfloat16), kept, labels, sizes)
    red.validate(6, 4)
    hb = h.to(torch.bfloat16).float()
    assert red.hidden.dtype == torch.float32 and red.sizes.tolist() == [3.0, 8.0, 1.0]
    for r in range(3):
        members = [i for i in range(6) if labels[i] == r]
        want = sum(sizes[i] * hb[i] for i in members) / sum(sizes[i] for i in members)
        assert torch.allclose(red.hidden[r], want, atol=1e-6)


def test_tome_reduce_applies_reference_clamp():
    h, k = torch.randn(10, 4), torch.randn(10, 3)
    red = tome_reduce(h, k, 100)
    red.validate(10, 4)
    assert red.num_kept == 10 - tome_clamp(100, 10) == 7
    assert float(red.sizes.sum()) == 10.0
    # progressive use: sizes carried to the next layer
    red2 = tome_reduce(red.hidden, k[red.kept], 1, red.sizes)
    assert float(red2.sizes.sum()) == 10.0 and red2.num_kept == 6
    assert tome_reduce(h[:3], k[:3], 5).num_kept == 3  # floor(3/2) - 2 < 0 -> r = 0


def test_tome_clamp():
    assert tome_clamp(10, 100) == 10
    assert tome_clamp(60, 100) == 48
    assert tome_clamp(5, 4) == 0
    assert tome_clamp(-3, 100) == 0


def test_vtw_layer_reference_example():
    assert vtw_layer(28, 0.353, 4) == 12
    assert vtw_layer(28, 1.0, 4) == 28  # keep everything: withdraw after the last layer
    assert vtw_layer(28, 0.0, 0) == 0


def test_tome_schedule_formula_and_budget():
    n, N, p, L = 28, 729, 0.353, 4
    r = tome_schedule(n, N, p, L)
    p_eff = 1 - (1 - p) * (n - L) / n
    r0 = 6 * n * (1 - p_eff) * N / ((n + 1) * (2 * n + 1))
    assert r == [math.floor(r0 * (n - i) / n) + 1 for i in range(n)]
    assert len(r) == n and all(a >= b for a, b in itertools.pairwise(r))
    # Layer-averaged visual tokens match the single-layer method (up to the floors and the +1).
    removed = sum(ri * (n - i) for i, ri in enumerate(r))
    assert abs(removed - n * N * (1 - p_eff)) <= n * (n + 1) / 2
    with pytest.raises(ValueError):
        tome_schedule(0, 10, 0.5, 0)
    with pytest.raises(ValueError):
        tome_schedule(10, 10, 1.5, 4)
