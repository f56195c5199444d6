"""Vision-side selection (pact.ops.vision) and spatial pooling (pact.ops.pooling) against plain references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pact.ops.pooling import grid_pool
from pact.ops.tome import merge_reduction
from pact.ops.vision import (
    cls_attention,
    hired_budgets,
    hired_crop_scores,
    hired_image_rows,
    hired_select,
    iqr_outliers,
    mean_received_attention,
    prumerge,
    vispruner_crops,
    vispruner_select,
)

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


def attn_vector(n: int, seed: int = 0, sharp: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(n, generator=g), 0)


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1, eps=1e-12)


# ------------------------------------------------------------------------------------------------
# attention signals


def test_cls_attention_matches_loop():
    h, n, d = 3, 7, 4
    q, k, kc = torch.randn(h, d), torch.randn(n, h, d), torch.randn(h, d)
    for with_cls in (False, True):
        got = cls_attention(q, k, kc if with_cls else None)
        want = torch.zeros(n)
        for hh in range(h):
            logits = [float(q[hh] @ k[j, hh]) / math.sqrt(d) for j in range(n)]
            if with_cls:
                logits = [float(q[hh] @ kc[hh]) / math.sqrt(d), *logits]
            p = torch.softmax(torch.tensor(logits), 0)
            want += (p[1:] if with_cls else p) / h
        assert torch.allclose(got, want, atol=1e-6)
    assert abs(float(cls_attention(q, k).sum()) - 1) < 1e-5
    assert torch.equal(
        cls_attention(q.bfloat16(), k.bfloat16()), cls_attention(q.bfloat16().float(), k.bfloat16().float())
    )


def test_mean_received_attention_is_column_mean_and_chunk_invariant():
    n, h, d = 23, 2, 5
    q, k = torch.randn(n, h, d), torch.randn(n, h, d)
    full = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d), -1)  # (H, N, N)
    want = full.mean(dim=(0, 1))
    for chunk in (1, 7, 1000, None):
        assert torch.allclose(mean_received_attention(q, k, chunk=chunk), want, atol=1e-6)
    assert abs(float(want.sum()) - 1) < 1e-5
    assert mean_received_attention(q[:0], k[:0]).numel() == 0


# ------------------------------------------------------------------------------------------------
# VisPruner


def ref_vispruner(a: list[float], f: torch.Tensor, t: int, ratio: float, step: int = 8) -> list[int]:
    """Plain-list port of the official selection loop."""
    n = len(a)
    if t >= n:
        return list(range(n))
    n_imp = int(t * ratio)
    n_div = t - n_imp
    order = sorted(range(n), key=lambda i: (-a[i], i))
    important, res = order[:n_imp], order[n_imp:]
    fn = unit(f)
    while len(res) - n_div > 0:
        A, B = res[0::2], res[1::2]
        r = min(step, len(res) - n_div, len(A))
        score = [max(float(fn[i] @ fn[j]) for j in B) if B else math.inf for i in A]
        by_score = sorted(range(len(A)), key=lambda s: (-score[s], s))
        res = [A[s] for s in by_score[r:]] + B
    return sorted(important + res)


@pytest.mark.parametrize(
    "n,t,ratio,step",
    [
        (60, 16, 0.75, 8),
        (45, 20, 0.5, 3),
        (30, 5, 0.0, 8),
        (30, 12, 1.0, 8),
        (17, 16, 0.25, 8),
        (9, 0, 0.5, 8),
    ],
)
def test_vispruner_matches_reference(n, t, ratio, step):
    a, f = attn_vector(n, seed=n), torch.randn(n, 6, generator=torch.Generator().manual_seed(t))
    got = vispruner_select(a, f, t, ratio, step)
    assert got.tolist() == ref_vispruner(a.tolist(), f, t, ratio, step)
    assert got.numel() == t
    top = torch.sort(a, descending=True, stable=True).indices[: int(t * ratio)]
    assert bool(torch.isin(top, got).all())


def test_vispruner_removes_the_most_redundant_a_token():
    # Residual order (by attention) is [1, 2, 3, 4]; A = [1, 3], B = [2, 4]. Token 1 duplicates
    # token 2, token 3 is orthogonal to B: one pass removes token 1.
    f = torch.tensor([[0.0, 0, 1], [1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, -1]])
    a = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    assert vispruner_select(a, f, 4, 0.25).tolist() == [0, 2, 3, 4]


def test_vispruner_degenerate_and_bf16():
    assert vispruner_select(torch.zeros(0), torch.zeros(0, 3), 4, 0.5).numel() == 0
    assert vispruner_select(torch.ones(1), torch.ones(1, 3), 4, 0.5).tolist() == [0]
    same = vispruner_select(torch.ones(5), torch.ones(5, 3), 2, 0.5)  # identical tokens: all ties
    assert same.tolist() == ref_vispruner([1.0] * 5, torch.ones(5, 3), 2, 0.5) == [0, 4]
    a, f = attn_vector(40).bfloat16(), torch.randn(40, 5).bfloat16()
    assert torch.equal(vispruner_select(a, f, 10, 0.5), vispruner_select(a.float(), f.float(), 10, 0.5))
    with pytest.raises(ValueError):
        vispruner_select(torch.ones(3), torch.ones(4, 2), 2, 0.5)


# ------------------------------------------------------------------------------------------------
# PruMerge


def ref_prumerge_merge(a, keys, h, kept, k=32, normalize=False):
    """Per-kept-token loop, as in the original; returns (merged rows, labels, sizes)."""
    n = len(a)
    kn = unit(keys)
    merged, absorbed_by = [], {}
    for slot, i in enumerate(kept):
        sims = [(float(kn[i] @ kn[j]), j) for j in range(n) if j != i]
        nb = [j for _, j in sorted(sims, key=lambda e: (-e[0], e[1]))[: min(k, n - 1)]]
        acc = sum((a[j] * h[j] for j in nb), torch.zeros(h.shape[1]))
        if normalize:
            merged.append((a[i] * h[i] + acc) / (a[i] + sum(a[j] for j in nb)))
        else:
            merged.append(h[i] + acc)
        for j in nb:
            if j not in kept:
                absorbed_by.setdefault(j, []).append((float(kn[i] @ kn[j]), slot))
    labels = [-1] * n
    for j, cands in absorbed_by.items():
        labels[j] = sorted(cands, key=lambda e: (-e[0], e[1]))[0][1]
    for slot, i in enumerate(kept):
        labels[i] = slot
    sizes = [sum(1 for v in labels if v == s) for s in range(len(kept))]
    return torch.stack(merged) if merged else torch.zeros(0, h.shape[1]), labels, sizes


@pytest.mark.parametrize("normalize", [False, True])
def test_prumerge_adaptive_matches_reference(normalize):
    n = 144
    a, keys, h = attn_vector(n, seed=1, sharp=3.0), torch.randn(n, 8), torch.randn(n, 5)
    red = prumerge(a, keys, h, normalize=normalize)
    red.validate(n, 5)
    q1, q3 = np.percentile(a.numpy(), [25, 75])
    want_kept = np.nonzero(a.numpy() > q3 + 1.5 * (q3 - q1))[0].tolist()
    assert red.kept.tolist() == want_kept and len(want_kept) > 2
    merged, labels, sizes = ref_prumerge_merge(a.tolist(), keys, h, want_kept, normalize=normalize)
    assert torch.allclose(red.hidden, merged, atol=1e-5)
    assert red.labels.tolist() == labels
    assert red.sizes.tolist() == sizes
    assert torch.equal(red.scores, a)


def test_prumerge_plus_adds_uniform_samples():
    n = 144
    a, keys, h = attn_vector(n, seed=2, sharp=3.0), torch.randn(n, 8), torch.randn(n, 5)
    outliers = iqr_outliers(a).nonzero().squeeze(1)
    m = outliers.numel()
    stride = max(1, (n // m) // 3)
    red = prumerge(a, keys, h, plus=True)
    red.validate(n, 5)
    want = sorted(set(outliers.tolist()) | set(range(0, n - 1, stride)))
    assert red.kept.tolist() == want
    merged, labels, _ = ref_prumerge_merge(a.tolist(), keys, h, want)
    assert torch.allclose(red.hidden, merged, atol=1e-5) and red.labels.tolist() == labels
    red2 = prumerge(a, keys, h, plus=True, grid_shape=(12, 12))
    s2 = math.sqrt(stride)
    lattice = [math.floor(i * s2) for i in range(math.ceil(12 / s2))]
    want2 = sorted(set(outliers.tolist()) | {r * 12 + c for r in lattice for c in lattice})
    assert red2.kept.tolist() == want2


@SETTINGS
@given(n=st.integers(1, 60), budget=st.integers(0, 70), plus=st.booleans(), seed=st.integers(0, 100))
def test_prumerge_budget_mode(n, budget, plus, seed):
    a, keys, h = attn_vector(n, seed=seed), torch.randn(n, 4), torch.randn(n, 3)
    red = prumerge(a, keys, h, plus=plus, n_keep=budget)
    red.validate(n, 3)
    assert red.num_kept == min(budget, n)
    n_att = min(budget, n) if not plus else min(min(budget, n), max(1, round(0.25 * min(budget, n))))
    top = torch.sort(a, descending=True, stable=True).indices[:n_att]
    assert bool(torch.isin(top, red.kept).all())
    assert float(red.sizes.sum()) == float((red.labels >= 0).sum())


def test_prumerge_degenerate_and_bf16():
    red = prumerge(torch.zeros(0), torch.zeros(0, 3), torch.zeros(0, 2))
    red.validate(0, 2)
    red = prumerge(torch.ones(1), torch.ones(1, 3), torch.ones(1, 2))
    assert red.kept.tolist() == [0] and torch.equal(red.hidden, torch.ones(1, 2))
    red = prumerge(torch.full((6,), 1 / 6), torch.randn(6, 3), torch.randn(6, 2))  # no outlier
    assert red.kept.tolist() == [0]
    a, k, h = attn_vector(50).bfloat16(), torch.randn(50, 4).bfloat16(), torch.randn(50, 3).bfloat16()
    r1, r2 = prumerge(a, k, h), prumerge(a.float(), k.float(), h.float())
    assert (
        torch.equal(r1.kept, r2.kept)
        and torch.equal(r1.hidden, r2.hidden)
        and torch.equal(r1.labels, r2.labels)
    )
    with pytest.raises(ValueError):
        prumerge(torch.tensor([0.5, float("nan")]), torch.ones(2, 2), torch.ones(2, 2))


# ------------------------------------------------------------------------------------------------
# HiRED


def test_hired_crop_scores():
    a = attn_vector(36, seed=4)
    alpha = 0.5
    marked = set(torch.sort(a, descending=True, stable=True).indices[: int(36 * (1 - alpha))].tolist())
    got = hired_crop_scores(a, (6, 6), (2, 3), alpha)
    want = [0.0] * 6
    for t in marked:
        y, x = divmod(t, 6)
        want[(y * 2 // 6) * 3 + x * 3 // 6] += 1
    assert got.tolist() == want
    raster = hired_crop_scores(a, (6, 6), (2, 3), alpha, layout="raster")
    assert raster.tolist() == [float(sum(1 for t in marked if t // 6 == c)) for c in range(6)]
    with pytest.raises(ValueError):
        hired_crop_scores(a, (5, 6), (2, 2), alpha)


def test_hired_budgets_reference_formula():
    scores = torch.tensor([73.0, 70.0, 75.0, 70.0])
    v, rate, alpha = 576, 0.2, 0.5
    total = int(5 * v * rate)
    got = hired_budgets(scores, total, alpha, v)
    base = min(int(total * alpha), v)
    rest = min(total - base, 4 * v)
    want = [base] + [min(int(s) * rest // int(scores.sum()), v) for s in scores]  # exact integer shares
    assert got.tolist() == want
    exact = hired_budgets(scores, total, alpha, v, exact=True)
    assert int(exact.sum()) == total and exact[0] == base
    assert bool((exact[1:] >= got[1:]).all()) and bool((exact[1:] - got[1:] <= 1).all())


def test_hired_budgets_caps_and_edge_cases():
    # One crop holds all the attention but can only take 10 tokens.
    got = hired_budgets(torch.tensor([0.0, 5.0, 0.0]), 40, 0.25, 10, exact=True)
    assert got.tolist()[0] == 10 and got[2] == 10 and int(got.sum()) == 40
    assert hired_budgets(torch.tensor([0.0, 5.0, 0.0]), 40, 0.25, 10).tolist() == [10, 0, 10, 0]
    assert hired_budgets(torch.zeros(4), 40, 0.0, 10).tolist() == [0, 10, 10, 10, 10]  # no signal: uniform
    assert hired_budgets(torch.zeros(0), 40, 0.5, 16).tolist() == [16]
    assert int(hired_budgets(torch.ones(3), 1000, 0.5, 10, exact=True).sum()) == 40  # capacity
    with pytest.raises(ValueError):
        hired_budgets(torch.tensor([-1.0]), 4, 0.5, 4)


def test_hired_select():
    attn = [attn_vector(9, seed=s) for s in range(3)]
    budgets = torch.tensor([2, 0, 4])
    got = hired_select(attn, budgets)
    for a, b, k in zip(attn, budgets.tolist(), got, strict=True):
        assert k.tolist() == sorted(sorted(range(9), key=lambda i: (-float(a[i]), i))[:b])
    flat = hired_select(attn, budgets, flat=True)
    assert flat.tolist() == got[0].tolist() + (got[2] + 18).tolist()
    with pytest.raises(ValueError):
        hired_select(attn, [1, 2])


# ------------------------------------------------------------------------------------------------
# pooling


@pytest.mark.parametrize(
    "rows,cols,stride,placement",
    [
        (5, 5, 2, "first"),
        (5, 7, 3, "center"),
        (4, 4, 2, "center"),
        (3, 8, (1, 4), "first"),
        (6, 6, 1, "center"),
        (2, 3, 5, "center"),
        (0, 4, 2, "first"),
    ],
)
def test_grid_pool_matches_loop(rows, cols, stride, placement):
    sr, sc = (stride, stride) if isinstance(stride, int) else stride
    kept, labels = grid_pool(rows, cols, stride, placement)
    windows = {}
    for y in range(rows):
        for x in range(cols):
            windows.setdefault((y // sr, x // sc), []).append((y, x))
    want_kept = []
    for key in sorted(windows):
        cells = windows[key]
        ys, xs = sorted({c[0] for c in cells}), sorted({c[1] for c in cells})
        if placement == "first":
            y, x = ys[0], xs[0]
        else:
            y, x = ys[(len(ys) - 1) // 2], xs[(len(xs) - 1) // 2]
        want_kept.append(y * cols + x)
    assert kept.tolist() == want_kept
    slot = {key: s for s, key in enumerate(sorted(windows))}
    assert labels.tolist() == [slot[(y // sr, x // sc)] for y in range(rows) for x in range(cols)]
    h = torch.randn(rows * cols, 3)
    red = merge_reduction(h, kept, labels)
    red.validate(rows * cols, 3)
    for key, cells in windows.items():
        mean = torch.stack([h[y * cols + x] for y, x in cells]).mean(0)
        assert torch.allclose(red.hidden[slot[key]], mean, atol=1e-6)
        assert red.sizes[slot[key]] == len(cells)


def test_grid_pool_errors():
    with pytest.raises(ValueError):
        grid_pool(4, 4, 0)
    with pytest.raises(ValueError):
        grid_pool(4, 4, 2, "middle")


# ------------------------------------------------------------------------------------------------
# the official rules, on hand-worked cases (each answer derived from the official code, see comments)


def test_cls_attention_sums_heads_and_computes_in_the_given_dtype():
    h, n, d = 3, 5, 4
    q, k, kc = torch.randn(h, d), torch.randn(n, h, d), torch.randn(h, d)
    mean = cls_attention(q, k, kc)
    assert torch.allclose(cls_attention(q, k, kc, heads="sum"), h * mean, atol=1e-6)  # HiRED: sum(dim=1)
    # fp16 (the official runs' dtype): the result is the fp16 computation, not the float32 one
    half = cls_attention(q.half(), k.half(), kc.half(), dtype=torch.float16)
    q16 = q.half() * d**-0.5  # CLIP scales the query before the product
    logits = torch.cat(
        [(q16 * kc.half()).sum(-1, keepdim=True), torch.einsum("hd,nhd->hn", q16, k.half())], 1
    )
    assert torch.equal(half, torch.softmax(logits, -1)[:, 1:].mean(0).float())
    with pytest.raises(ValueError, match="heads"):
        cls_attention(q, k, heads="max")


def test_prumerge_official_order_and_extra_token():
    # a: IQR (numpy linear quartiles) of the sorted [.01,.01,.01,.01,.02,.02,.3,.5] is Q1 = .01,
    # Q3 = .02 + .25 * .28 = .09, bound .09 + 1.5 * .08 = .21: outliers 4 (.5) and 2 (.3); the
    # official topk(cls_attn, 2) emits them most-attended first: [4, 2].
    a = torch.tensor([0.01, 0.02, 0.3, 0.01, 0.5, 0.01, 0.02, 0.01])
    h = torch.eye(8)  # one-hot features: a merged row shows exactly which tokens were added
    keys = torch.eye(8)
    keys[6, 2] = keys[0, 4] = 0.5  # token 6 is token 2's only similar key, token 0 is token 4's
    red = prumerge(a, keys, h, k_neighbors=1)
    red.validate(8, 8)
    assert red.kept.tolist() == [2, 4]
    assert red.kept[red.order].tolist() == [4, 2]  # official order
    # the extra token: sum over the 6 pruned tokens of a_j * h_j (kept columns stay 0)
    want_extra = a.clone()
    want_extra[[2, 4]] = 0
    assert torch.allclose(red.extra, want_extra[None])
    # each keeper absorbs its most key-similar other token (original features, weight a_j)
    assert torch.allclose(red.hidden[0], h[2] + a[6] * h[6])
    assert torch.allclose(red.hidden[1], h[4] + a[0] * h[0])
    assert prumerge(a, keys, h, extra_token=False).extra is None


def test_prumerge_plus_official_arange_samples_and_order():
    # m = 2 outliers of N = 8: ratio = 2/8, int(1 / ratio) = 4, int(4 / 3) = 1 -> arange(0, 7, 1);
    # the official list is idx = [4, 2] followed by the samples not in idx, ascending: [0,1,3,5,6].
    # Token 7 (= N - 1, the official arange(0, 575) bound) is never sampled.
    a = torch.tensor([0.01, 0.02, 0.3, 0.01, 0.5, 0.01, 0.02, 0.01])
    h = torch.eye(8)
    red = prumerge(a, torch.randn(8, 4), h, plus=True)
    red.validate(8, 8)
    assert red.kept.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert red.kept[red.order].tolist() == [4, 2, 0, 1, 3, 5, 6]
    assert torch.allclose(red.extra, a[7] * h[7][None])  # the one pruned token
    # N = 576, 4 outliers: int(1 / (4/576)) = 144, int(144 / 3) = 48: samples 0, 48, ..., 528
    a = torch.full((576,), 1e-3)
    a[[5, 100, 300, 575]] = torch.tensor([0.2, 0.3, 0.1, 0.25])
    red = prumerge(a, torch.randn(576, 4), torch.randn(576, 2), plus=True)
    samples = list(range(0, 575, 48))
    assert red.kept[red.order].tolist() == [100, 575, 5, 300, *samples]


def test_hired_image_rows_official_rule():
    # P = 3 crops (base + 2 sub-images) of V = 4 tokens, rate 0.5, alpha 0.5:
    # total = int(3 * 4 * 0.5) = 6; base = min(int(6 * 0.5), 4) = 3; rest = min(6 - 3, 2 * 4) = 3.
    # marked = top int(4 * 0.5) = 2 base tokens by layer-0 attention: tokens 0 and 1 (top row).
    # raster chunks of 4 / 2 = 2 tokens: chunk 0 = {0, 1} -> 2 marks, chunk 1 = {2, 3} -> 0:
    # budgets floor(1.0 * 3) = 3 and 0.
    early = torch.tensor([0.4, 0.3, 0.1, 0.2])
    late = torch.tensor([[0.4, 0.1, 0.3, 0.2], [0.1, 0.2, 0.6, 0.1], [0.3, 0.1, 0.1, 0.5]])
    got = hired_image_rows(late, early, 0.5, 0.5)
    assert got.tolist() == [
        [True, False, True, True],  # base: top 3 of the late attention
        [True, True, True, False],  # 3 tokens: .6, .2, then the tie .1/.1 -> lower index
        [False, False, False, False],
    ]
    # spatial layout: token 0 (row 0, col 0) counts for crop 0, token 1 (col 1) for crop 1: 1 and 1
    spatial = hired_image_rows(late, early, 0.5, 0.5, layout="spatial", base_grid=(2, 2), crop_grid=(1, 2))
    assert spatial.sum(1).tolist() == [3, 1, 1]
    # LLaVA-1.5 (one crop): top int(V * rate)
    assert hired_image_rows(late[:1], early, 0.5, 0.5).tolist() == [[True, False, True, False]]


def test_hired_raster_chunks_when_crops_do_not_divide_the_base():
    # V = 5 over 2 crops: chunks [0, 3) and [3, 5) (ceil(c V / n)); marks: top int(5 * .6) = 3
    a = torch.tensor([0.5, 0.1, 0.4, 0.3, 0.05])
    assert hired_crop_scores(a, (1, 5), (1, 2), 0.4, layout="raster").tolist() == [2.0, 1.0]


def test_hired_budgets_official_float32_floor():
    # the official (counts / counts.sum()).float32 * rest, then .int(): counts 9 and 13 of rest 22
    # give 13 * (13/22 in float32) = 12.999999 -> 12 (the exact share is 13)
    got = hired_budgets(torch.tensor([9.0, 13.0]), 22, 0.0, 576)
    assert got.tolist() == [0, 9, 12]
    assert hired_budgets(torch.tensor([9.0, 13.0]), 22, 0.0, 576, exact=True).tolist() == [0, 9, 13]


def test_vispruner_crops_budget_per_encoder_image():
    # two crops of 4 tokens; crop 0 is far more attended. keep_ratio 0.5 -> T = 2 per crop, all of
    # them important (ratio 1): the top 2 of each crop (per sample it would be tokens 0-3).
    attn = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.1, 0.3, 0.2, 0.05])
    crop = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    got = vispruner_crops(attn, torch.randn(8, 3), crop, 0.5, 1.0)
    assert got.nonzero().squeeze(1).tolist() == [0, 1, 5, 6]
    # LLaVA-NeXT "32 x 5 = 160": five 576-token crops at keep_ratio 32/576
    crop = torch.arange(5).repeat_interleave(576)
    got = vispruner_crops(torch.rand(2880), torch.randn(2880, 4), crop, 32 / 576, 0.5)
    assert int(got.sum()) == 160 and torch.bincount(crop[got]).tolist() == [32] * 5


def test_vispruner_similarity_in_the_model_dtype():
    # no important token (ratio 0), keep 3 of 4: one pass, A = tokens 0 and 2 (attention order),
    # B = 1 and 3; the A token with the highest max-similarity to B goes. In float32 token 2's
    # (cos .0141 to token 3) beats token 0's (cos .0142 to token 1): token 2 goes. In bf16/fp16,
    # the official dtype, both cosines round to 1: a tie, and the lower index (token 0) goes.
    f = torch.tensor(
        [[1.0, 0.0], [math.cos(0.0142), math.sin(0.0142)], [0.0, 1.0], [math.sin(0.0141), math.cos(0.0141)]]
    )
    a = torch.tensor([0.4, 0.3, 0.2, 0.1])
    assert vispruner_select(a, f, 3, 0.0).tolist() == [0, 1, 3]
    for dtype in (torch.bfloat16, torch.float16):
        assert vispruner_select(a, f.to(dtype), 3, 0.0, dtype=dtype).tolist() == [1, 2, 3]


def test_prumerge_empty_image_has_no_extra_token():
    red = prumerge(torch.zeros(0), torch.zeros(0, 3), torch.zeros(0, 2))
    assert red.num_kept == 0 and red.extra is None and red.order.numel() == 0
