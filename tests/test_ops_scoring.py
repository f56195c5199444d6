"""Scores (EUTI, FastV-style, norm, random) and exact top-k, against plain float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pact.ops import (
    euti_scores,
    fastv_scores,
    keep_count,
    keep_topk,
    norm_scores,
    random_scores,
    topk_indices,
)


def _inputs(T, D, H, H_kv, d, visual, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=g) * 3
    queries = torch.randn(T, H, d, generator=g) * 2
    keys = torch.randn(T, H_kv, d, generator=g) * 2
    mask = torch.zeros(T, dtype=torch.bool)
    mask[list(visual)] = True
    return hidden.to(dtype), queries.to(dtype), keys.to(dtype), mask


def _naive_euti(hidden, queries, keys, mask, support="prefix", query_from="prefix", by_norm=True, p=2.0):
    """The paper/reference formula, one head at a time, in float64 with Python-level loops."""
    T, H, d = queries.shape
    H_kv = keys.shape[1]
    vis = [t for t in range(T) if mask[t]]
    prefix = list(range(vis[-1] + 1))
    q_set = prefix if query_from == "prefix" else vis
    k_set = prefix if support == "prefix" else vis
    per_head = []
    for h in range(H):
        kv = h // (H // H_kv)  # repeat_kv: query head h reads key head h // n_rep
        qbar = sum(queries[t, h].double() for t in q_set) / len(q_set)
        logits = torch.stack([qbar @ keys[j, kv].double() / math.sqrt(d) for j in k_set])
        attn = torch.softmax(logits, 0)
        per_head.append({j: float(a) for j, a in zip(k_set, attn, strict=True)})
    out = []
    for i in vis:
        a = sum(ph[i] for ph in per_head) / H
        if by_norm:
            a *= float(hidden[i].double().abs().pow(p).sum() ** (1 / p))
        out.append(a)
    return torch.tensor(out, dtype=torch.float64)


VISUAL_LAYOUTS = [
    (20, [3, 4, 5, 9, 10, 14]),  # non-contiguous visual tokens, text after the last one (prefix < T)
    (12, list(range(12))),  # everything visual
    (15, [0, 1, 2]),  # prefix of 3 tokens, 12 text tokens after it
    (9, [8]),  # a single visual token at the end
]


@pytest.mark.parametrize(("T", "visual"), VISUAL_LAYOUTS)
@pytest.mark.parametrize(("H", "H_kv"), [(4, 4), (4, 2), (6, 1)])
def test_euti_matches_naive_per_head_loop(T, visual, H, H_kv):
    hidden, q, k, mask = _inputs(T, 8, H, H_kv, 5, visual, seed=T + H + H_kv)
    got = euti_scores(hidden, q, k, mask)
    assert got.dtype == torch.float32 and got.shape == (len(visual),)
    torch.testing.assert_close(got.double(), _naive_euti(hidden, q, k, mask), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("support", ["prefix", "visual"])
@pytest.mark.parametrize("query_from", ["prefix", "visual"])
@pytest.mark.parametrize(("by_norm", "p"), [(True, 2.0), (True, 1.0), (True, 3.5), (False, 2.0)])
def test_euti_options_match_naive(support, query_from, by_norm, p):
    T, visual = VISUAL_LAYOUTS[0]
    hidden, q, k, mask = _inputs(T, 8, 4, 2, 5, visual, seed=7)
    got = euti_scores(
        hidden, q, k, mask, support=support, query_from=query_from, multiply_by_norm=by_norm, norm_order=p
    )
    want = _naive_euti(hidden, q, k, mask, support, query_from, by_norm, p)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def test_euti_ignores_text_after_the_last_visual_token():
    hidden, q, k, mask = _inputs(20, 8, 4, 2, 5, [3, 4, 5, 9, 10, 14], seed=3)
    base = euti_scores(hidden, q, k, mask)
    q2, k2, h2 = q.clone(), k.clone(), hidden.clone()
    q2[15:] = 100.0
    k2[15:] = -50.0
    h2[15:] = 1e4
    torch.testing.assert_close(euti_scores(h2, q2, k2, mask), base, rtol=0, atol=0)
    # ...while a change inside the prefix (a text token before the last visual token) matters.
    k2[6] = 10.0
    assert not torch.allclose(euti_scores(h2, q2, k2, mask), base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_euti_low_precision_equals_float32_cast(dtype):
    hidden, q, k, mask = _inputs(20, 8, 4, 2, 5, [3, 4, 5, 9, 10, 14], seed=5, dtype=dtype)
    got = euti_scores(hidden, q, k, mask)
    assert got.dtype == torch.float32
    want = euti_scores(hidden.float(), q.float(), k.float(), mask)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_euti_no_visual_tokens_gives_empty_scores():
    hidden, q, k, mask = _inputs(6, 8, 4, 2, 5, [], seed=0)
    out = euti_scores(hidden, q, k, mask)
    assert out.shape == (0,) and out.dtype == torch.float32


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["hidden", "queries", "keys"])
def test_euti_rejects_non_finite_input(bad, where):
    hidden, q, k, mask = _inputs(10, 8, 4, 2, 5, [2, 3], seed=0)
    tensors = {"hidden": hidden, "queries": q, "keys": k}
    tensors[where].view(-1)[7] = bad
    with pytest.raises(ValueError, match=f"{where} contains non-finite"):
        euti_scores(hidden, q, k, mask)


def test_euti_shape_errors():
    hidden, q, k, mask = _inputs(10, 8, 4, 3, 5, [2, 3], seed=0)
    with pytest.raises(ValueError, match="multiple"):
        euti_scores(hidden, q, k, mask)
    hidden, q, k, mask = _inputs(10, 8, 4, 2, 5, [2, 3], seed=0)
    with pytest.raises(ValueError, match="bool"):
        euti_scores(hidden, q, k, mask.long())
    with pytest.raises(ValueError, match="support"):
        euti_scores(hidden, q, k, mask, support="all")


def _naive_fastv(q, k, mask, variant, causal=True):
    T, H, d = q.shape
    n_rep = H // k.shape[1]
    vis = [t for t in range(T) if mask[t]]
    P = vis[-1] + 1 if variant == "reference" else T
    rows = range(P) if variant == "reference" else [T - 1]
    total = torch.zeros(P, dtype=torch.float64)
    for t in rows:
        for h in range(H):
            width = t + 1 if causal or variant == "original" else P
            logits = torch.tensor(
                [float(q[t, h].double() @ k[j, h // n_rep].double()) / math.sqrt(d) for j in range(width)]
            )
            total[:width] += torch.softmax(logits, 0)
    return (total / (len(rows) * H))[vis]


@pytest.mark.parametrize("chunk", [None, 1, 3, 7])
@pytest.mark.parametrize("causal", [True, False])
def test_fastv_reference_variant_matches_naive(chunk, causal):
    q, k, mask = _inputs(20, 8, 4, 2, 6, [3, 4, 5, 9, 10, 14], seed=11)[1:]
    got = fastv_scores(q, k, mask, causal=causal, chunk_size=chunk)
    torch.testing.assert_close(
        got.double(), _naive_fastv(q, k, mask, "reference", causal), rtol=1e-5, atol=1e-8
    )


def test_fastv_original_variant_matches_naive():
    q, k, mask = _inputs(20, 8, 4, 2, 6, [3, 4, 5, 9, 10, 14], seed=12)[1:]
    got = fastv_scores(q, k, mask, variant="original")
    torch.testing.assert_close(got.double(), _naive_fastv(q, k, mask, "original"), rtol=1e-5, atol=1e-8)


def test_fastv_low_precision_and_errors():
    q, k, mask = _inputs(20, 8, 4, 2, 6, [3, 4, 5, 9, 10, 14], seed=13, dtype=torch.bfloat16)[1:]
    torch.testing.assert_close(
        fastv_scores(q, k, mask), fastv_scores(q.float(), k.float(), mask), rtol=0, atol=0
    )
    q = q.float()
    q[2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="queries contains non-finite"):
        fastv_scores(q, k, mask)
    with pytest.raises(ValueError, match="variant"):
        fastv_scores(q, k, mask, variant="fast")


def test_norm_and_random_scores():
    hidden, _, _, mask = _inputs(10, 8, 4, 2, 5, [1, 4, 6], seed=1, dtype=torch.float16)
    torch.testing.assert_close(norm_scores(hidden, mask), hidden[[1, 4, 6]].float().norm(dim=1))
    torch.testing.assert_close(
        norm_scores(hidden, mask, norm_order=1.0), hidden[[1, 4, 6]].float().abs().sum(1), rtol=1e-6, atol=0
    )
    a = random_scores(50, generator=torch.Generator().manual_seed(3))
    b = random_scores(50, generator=torch.Generator().manual_seed(3))
    assert a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.equal(a, random_scores(50, generator=torch.Generator().manual_seed(4)))


def _reference_topk(scores: list[float], k: int) -> list[int]:
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(-3, 3), min_size=0, max_size=40),  # few distinct values: many ties
    st.floats(0.0, 1.0),
)
def test_keep_topk_exact_count_and_tie_rule(values, keep_ratio):
    scores = torch.tensor(values, dtype=torch.float32)
    kept = keep_topk(scores, keep_ratio)
    k = int(len(values) * keep_ratio)
    assert kept.numel() == k == keep_count(len(values), keep_ratio)
    assert kept.tolist() == _reference_topk([float(v) for v in values], k)


def test_topk_on_low_precision_and_errors():
    s = torch.tensor([0.5, 2.0, 2.0, -1.0, 2.0], dtype=torch.bfloat16)
    assert topk_indices(s, 2).tolist() == [1, 2]  # ties: lower index first
    assert keep_topk(s, 0.55).tolist() == [1, 2]  # int(5 * 0.55) = 2
    assert keep_topk(s, 0.0).numel() == 0  # floor: nothing kept (the reference kept everything here)
    assert keep_topk(s, 1.0).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="keep_ratio"):
        keep_topk(s, 1.5)
    with pytest.raises(ValueError, match="non-finite"):
        keep_topk(torch.tensor([1.0, float("nan")]), 0.5)
