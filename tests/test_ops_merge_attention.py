"""Merging, Reduction builders, proportional attention, the 4-D mask, and the PACT composition."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pact.ops import (
    build_attention_mask,
    cluster_means,
    cluster_sizes,
    dbdpc,
    euti_scores,
    keep_topk,
    pact_reduce,
    proportional_bias,
    reduction_from_clusters,
    reduction_from_keep,
    retrieve,
)

# ----------------------------------------------------------------------------------------- merging


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(-1, 4), min_size=1, max_size=30),
    weighted=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_cluster_means_and_sizes_equal_members_mean(labels, weighted, seed):
    g = torch.Generator().manual_seed(seed)
    lab = torch.tensor(labels)
    x = torch.randn(len(labels), 3, generator=g).to(torch.bfloat16)
    w = torch.randint(1, 5, (len(labels),), generator=g).float() if weighted else None
    means, sizes = cluster_means(x, lab, 5, w), cluster_sizes(lab, 5, w)
    assert means.dtype == sizes.dtype == torch.float32
    for c in range(5):
        members = [i for i, v in enumerate(labels) if v == c]
        wc = [float(w[i]) if weighted else 1.0 for i in members]
        assert float(sizes[c]) == sum(wc)
        if members:
            want = sum(wi * x[i].double() for wi, i in zip(wc, members, strict=True)) / sum(wc)
            torch.testing.assert_close(means[c].double(), want, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(means[c], torch.zeros(3))


def test_reduction_from_clusters():
    hidden = torch.arange(12.0).view(6, 2).half()
    # Clusters {0, 2} (center 2) and {3, 5} (center 5); 1 is a singleton; 4 is dropped.
    labels = torch.tensor([2, 1, 2, 5, -1, 5])
    red = reduction_from_clusters(hidden, torch.tensor([5, 1, 2]), labels, scores=torch.ones(6))
    red.validate(6, 2)
    assert red.kept.tolist() == [1, 2, 5]
    assert red.labels.tolist() == [1, 0, 1, 2, -1, 2]
    assert red.sizes.tolist() == [1.0, 2.0, 2.0]
    assert red.hidden.dtype == torch.float32
    assert red.hidden.tolist() == [[2.0, 3.0], [2.0, 3.0], [8.0, 9.0]]
    no_mean = reduction_from_clusters(None, torch.tensor([1, 2, 5]), labels, merge_mean=False)
    assert no_mean.hidden is None and no_mean.sizes.tolist() == [1.0, 2.0, 2.0]
    weighted = reduction_from_clusters(
        hidden, torch.tensor([1, 2, 5]), labels, weights=torch.tensor([1.0, 4.0, 3.0, 1.0, 1.0, 1.0])
    )
    assert weighted.sizes.tolist() == [4.0, 4.0, 2.0]
    torch.testing.assert_close(weighted.hidden[1], (hidden[0].float() + 3 * hidden[2].float()) / 4)
    for bad_labels in ([2, 1, 2, 4, -1, 5], [2, 1, 0, 5, -1, 5]):  # label not a center / center not self
        with pytest.raises(ValueError, match="inconsistent"):
            reduction_from_clusters(hidden, torch.tensor([1, 2, 5]), torch.tensor(bad_labels))
    with pytest.raises(ValueError, match="non-finite"):
        reduction_from_clusters(hidden.float().fill_(float("nan")), torch.tensor([1, 2, 5]), labels)


def test_reduction_from_keep():
    red = reduction_from_keep(torch.tensor([4, 0, 2]), 6)
    red.validate(6)
    assert red.kept.tolist() == [0, 2, 4] and red.labels.tolist() == [0, -1, 1, -1, 2, -1]
    assert red.hidden is None and red.sizes.tolist() == [1.0, 1.0, 1.0]
    empty = reduction_from_keep(torch.zeros(0, dtype=torch.long), 3)
    empty.validate(3)
    assert empty.labels.tolist() == [-1, -1, -1]
    with pytest.raises(ValueError, match="unique"):
        reduction_from_keep(torch.tensor([1, 1]), 3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        reduction_from_keep(torch.tensor([3]), 3)


# --------------------------------------------------------------------------------------- attention


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 1000), min_size=0, max_size=20))
def test_bias_is_log_of_sizes(sizes):
    s = torch.tensor(sizes, dtype=torch.float32)
    bias = proportional_bias(s)
    assert bias.dtype == torch.float32
    torch.testing.assert_close(bias, torch.tensor([math.log(v) for v in sizes], dtype=torch.float32))
    assert torch.equal(proportional_bias(torch.ones(3)), torch.zeros(3))


def test_mask_causal_padding_and_bias():
    inf = float("inf")
    key_bias = torch.tensor([[-inf, -inf, 0.0, math.log(3.0), 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    m = build_attention_mask(key_bias, 5, torch.float32)
    assert m.shape == (2, 1, 5, 5) and m.dtype == torch.float32
    for b in range(2):
        for q in range(5):
            for k in range(5):
                want = float(key_bias[b, k]) if k <= q else -inf
                if b == 0 and q < 2:  # left-padding queries see only padding keys: own slot opened
                    want = 0.0 if k == q else -inf
                assert float(m[b, 0, q, k]) == pytest.approx(want), (b, q, k)
    # Decoding: one query, the last key; no causal masking, bias kept.
    d = build_attention_mask(key_bias, 1, torch.bfloat16)
    assert d.shape == (2, 1, 1, 5) and d.dtype == torch.bfloat16
    assert torch.equal(d[:, 0, 0].float(), key_bias.bfloat16().float())
    # Two queries at the end of five keys: query r sits at key 3 + r.
    two = build_attention_mask(torch.zeros(1, 5), 2, torch.float32)[0, 0]
    assert torch.isinf(two[0, 4]) and not torch.isinf(two[0, :4]).any() and not torch.isinf(two[1]).any()
    with pytest.raises(ValueError, match="q_len"):
        build_attention_mask(key_bias, 6, torch.float32)


def test_proportional_attention_is_exact_for_merged_duplicates():
    """k identical key/value pairs merged into one token of size k: same attention output."""
    g = torch.Generator().manual_seed(0)
    H, d = 2, 8
    q = torch.randn(1, H, 1, d, generator=g)
    base_k = torch.randn(1, H, 6, d, generator=g)
    base_v = torch.randn(1, H, 6, d, generator=g)
    copies = [1, 3, 1, 1, 4, 2]  # token j appears copies[j] times in the unmerged sequence
    rep = torch.tensor(copies)
    k_full = base_k.repeat_interleave(rep, dim=2)
    v_full = base_v.repeat_interleave(rep, dim=2)
    full = F.scaled_dot_product_attention(q, k_full, v_full)
    bias = proportional_bias(rep.float())[None]  # (1, 6)
    for dtype in (torch.float32, torch.float64):
        mask = build_attention_mask(bias, 1, dtype)
        merged = F.scaled_dot_product_attention(
            q.to(dtype), base_k.to(dtype), base_v.to(dtype), attn_mask=mask
        )
        torch.testing.assert_close(merged.float(), full, rtol=1e-5, atol=1e-6)
    no_bias = F.scaled_dot_product_attention(q, base_k, base_v)
    assert not torch.allclose(no_bias, full, atol=1e-3)  # the bias is what makes it exact
    # Prefill (causal) with left padding: real rows equal the unmerged sequence's last rows, no NaN.
    T = sum(copies)
    qs = torch.randn(1, H, T, d, generator=g)
    full_causal = F.scaled_dot_product_attention(qs, k_full, v_full, is_causal=True)
    last = torch.cumsum(rep, 0) - 1  # the merged token sits at its last copy's slot
    pad = 2
    keys = torch.cat([torch.randn(1, H, pad, d, generator=g), base_k], 2)
    vals = torch.cat([torch.randn(1, H, pad, d, generator=g), base_v], 2)
    key_bias = torch.cat([torch.full((1, pad), -math.inf), bias], 1)
    queries = torch.cat([torch.randn(1, H, pad, d, generator=g), qs[:, :, last]], 2)
    out = F.scaled_dot_product_attention(
        queries, keys, vals, attn_mask=build_attention_mask(key_bias, 6 + pad, torch.float32)
    )
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :, pad:], full_causal[:, :, last], rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------------- PACT


def _sample(T=40, visual=range(5, 35), D=16, H=4, H_kv=2, d=8, seed=0, groups=6):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=g)
    q = torch.randn(T, H, d, generator=g)
    k = torch.randn(T, H_kv, d, generator=g)
    dirs = torch.nn.functional.normalize(torch.randn(groups, 12, generator=g), dim=1)
    features = dirs[torch.randint(0, groups, (T,), generator=g)] + 0.08 * torch.randn(T, 12, generator=g)
    mask = torch.zeros(T, dtype=torch.bool)
    mask[list(visual)] = True
    return hidden, q, k, features, mask


@pytest.mark.parametrize("keep_ratio", [0.55, 0.2, 1.0])
@pytest.mark.parametrize("cutoff", [0.05, 0.21])
def test_pact_reduce_equals_manual_composition(keep_ratio, cutoff):
    hidden, q, k, feats, mask = _sample(seed=int(cutoff * 100))
    red = pact_reduce(hidden, q, k, feats, mask, keep_ratio=keep_ratio, cutoff=cutoff)
    n = int(mask.sum())
    red.validate(n, hidden.shape[1])
    # By hand, step by step, from the building blocks.
    scores = euti_scores(hidden, q, k, mask)
    keep = keep_topk(scores, keep_ratio)
    assert keep.numel() == int(n * keep_ratio)
    vf, vh = feats[mask], hidden[mask]
    c_local, l_local = dbdpc(vf[keep], cutoff)
    centers = keep[c_local]
    labels = torch.full((n,), -1)
    labels[keep] = keep[l_local]
    pruned = torch.tensor([i for i in range(n) if i not in set(keep.tolist())], dtype=torch.long)
    if pruned.numel():
        near = retrieve(vf[pruned], vf[centers], 1.5 * cutoff)
        labels[pruned] = torch.where(near >= 0, centers[near.clamp(min=0)], -1)
    assert red.kept.tolist() == centers.sort().values.tolist()
    assert torch.equal(red.scores, scores)
    for r, c in enumerate(red.kept.tolist()):
        members = (labels == c).nonzero().squeeze(1)
        assert float(red.sizes[r]) == members.numel()
        torch.testing.assert_close(red.hidden[r], vh[members].mean(0))
        assert torch.equal(red.labels[members], torch.full((members.numel(),), r))
    assert torch.equal(red.labels == -1, labels == -1)


def test_pact_ablations():
    hidden, q, k, feats, mask = _sample(seed=3)
    n = int(mask.sum())
    euti_only = pact_reduce(hidden, q, k, feats, mask, cluster=False)
    assert euti_only.hidden is None and euti_only.num_kept == int(n * 0.55)
    assert torch.equal(euti_only.kept, keep_topk(euti_scores(hidden, q, k, mask), 0.55))
    dbdpc_only = pact_reduce(hidden, None, None, feats, mask, prune=False, cutoff=0.21)
    centers, _ = dbdpc(feats[mask], 0.21)
    assert torch.equal(dbdpc_only.kept, centers) and dbdpc_only.scores is None
    assert int(dbdpc_only.sizes.sum()) == n  # everybody belongs to a cluster
    no_ret = pact_reduce(hidden, q, k, feats, mask, retrieval=False)
    with_ret = pact_reduce(hidden, q, k, feats, mask)
    assert torch.equal(no_ret.kept, with_ret.kept)
    assert int(no_ret.sizes.sum()) == int(n * 0.55) <= int(with_ret.sizes.sum())
    center_only = pact_reduce(hidden, q, k, feats, mask, merge_mean=False)
    assert center_only.hidden is None and torch.equal(center_only.sizes, with_ret.sizes)
    for red in (euti_only, dbdpc_only, no_ret, with_ret, center_only):
        red.validate(n, hidden.shape[1])


@pytest.mark.parametrize("n_visual", [0, 1, 2, 3])
def test_pact_degenerate_sizes(n_visual):
    hidden, q, k, feats, mask = _sample(T=8, visual=range(2, 2 + n_visual), seed=n_visual)
    for kw in ({}, {"keep_ratio": 1.0}, {"prune": False}, {"cluster": False}):
        red = pact_reduce(hidden, q, k, feats, mask, **kw)
        red.validate(n_visual, hidden.shape[1])
    red = pact_reduce(hidden, q, k, feats, mask, keep_ratio=1.0)
    assert red.num_kept >= min(1, n_visual)


def test_pact_identical_tokens_merge_into_one_and_low_precision_matches():
    hidden, q, k, feats, mask = _sample(seed=5)
    feats[mask] = feats[mask][0]  # every visual token has the same clustering vector
    red = pact_reduce(hidden, q, k, feats, mask, keep_ratio=1.0)
    assert red.num_kept == 1 and float(red.sizes[0]) == int(mask.sum())
    torch.testing.assert_close(red.hidden[0], hidden[mask].mean(0))
    hidden, q, k, feats, mask = _sample(seed=6)
    lo = pact_reduce(hidden.bfloat16(), q.bfloat16(), k.bfloat16(), feats.bfloat16(), mask)
    hi = pact_reduce(
        hidden.bfloat16().float(), q.bfloat16().float(), k.bfloat16().float(), feats.bfloat16().float(), mask
    )
    for a, b in ((lo.kept, hi.kept), (lo.labels, hi.labels), (lo.sizes, hi.sizes), (lo.hidden, hi.hidden)):
        assert torch.equal(a, b)
    feats[mask.nonzero()[0]] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        pact_reduce(hidden, q, k, feats, mask)
