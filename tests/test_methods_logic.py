"""Method-level logic of the zoo against plain reference computations (no model: synthetic Signals),
plus the schedule formulas (VTW layer, ToMe layer-averaged count) and the budget rules."""

from __future__ import annotations

import math
import types

import pytest
import torch

import pact
from pact.methods.base import Signals, build_method
from pact.methods.budget import select_by_scores, target_count
from pact.methods.custom_method import call_hook, resolve_hook
from pact.ops.tome import tome_clamp, tome_schedule

# ---------------------------------------------------------------------------------------------------
# synthetic signals


def fake_signals(
    cfg,
    *,
    T: int = 40,
    first_visual: int = 5,
    N: int = 24,
    D: int = 16,
    H: int = 4,
    H_kv: int = 2,
    d: int = 8,
    seed: int = 0,
    layer: int = 2,
    num_layers: int = 6,
    sizes: torch.Tensor | None = None,
) -> Signals:
    """Signals of one sample: T tokens, visual tokens at [first_visual, first_visual + N)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=g)
    q, k = torch.randn(T, H, d, generator=g), torch.randn(T, H_kv, d, generator=g)
    qr, kr = torch.randn(T, H, d, generator=g), torch.randn(T, H_kv, d, generator=g)
    mask = torch.zeros(T, dtype=torch.bool)
    mask[first_visual : first_visual + N] = True
    adapter = types.SimpleNamespace(layers=[None] * num_layers, family="llava")

    def qk_fn(j, h, rope, want_q, want_k):
        return q, k, qr, kr

    return Signals(
        layer=layer,
        sample=0,
        hidden=hidden,
        visual_mask=mask,
        sizes=torch.ones(N) if sizes is None else sizes,
        positions=torch.arange(T)[None],
        visual_index=torch.arange(N),
        config=cfg,
        qk_fn=qk_fn,
        cos_sin_fn=lambda: (None, None),
        layer_input_fn=lambda j: hidden,
        adapter=adapter,
    )


def cfg_of(**kw):
    base = {"layer": 2, "pruning": "none", "clustering": "none"}
    base.update(kw)
    return pact.load_config(None, **base)


def naive_means(hidden: torch.Tensor, kept: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain Python loop: mean hidden state of each kept token's members."""
    rows = []
    for r in range(kept.numel()):
        members = [i for i in range(labels.numel()) if int(labels[i]) == r]
        rows.append(torch.stack([hidden[i].float() for i in members]).mean(0))
    return torch.stack(rows)


def check_partition(red, n: int) -> None:
    red.validate(n)
    for r, idx in enumerate(red.kept.tolist()):
        assert int(red.labels[idx]) == r
    counts = torch.bincount(red.labels[red.labels >= 0], minlength=red.kept.numel()).float()
    assert torch.equal(counts, red.sizes)


# ---------------------------------------------------------------------------------------------------
# budgets


def test_target_count_rules():
    assert target_count(cfg_of(), 100) is None
    assert target_count(cfg_of(target_tokens=30), 100) == 30
    assert target_count(cfg_of(target_tokens=300), 100) == 100
    assert target_count(cfg_of(target_ratio=0.3), 10) == 7  # floor(10 * 0.7) despite 0.7 * 10 = 6.999...
    assert target_count(cfg_of(target_ratio=0.75), 576) == 144
    assert target_count(cfg_of(target_ratio=1.0), 50) == 0


def test_selection_ratio_ties_and_iqr():
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 0.0])
    assert select_by_scores(scores, cfg_of(pruning="random", keep_ratio=0.5)).tolist() == [1, 2, 4]
    kept = select_by_scores(scores, cfg_of(pruning="random", keep_ratio=0.34)).tolist()
    assert kept == [1, 2]  # int(6 * 0.34) = 2, ties to the lower index
    iqr = select_by_scores(scores, cfg_of(pruning="random", pruning_selection="iqr", iqr_alpha=0.5)).tolist()
    q1, q3 = torch.quantile(scores, torch.tensor([0.25, 0.75])).tolist()
    assert iqr == [i for i, s in enumerate(scores.tolist()) if s > q1 + 0.5 * (q3 - q1)]


@pytest.mark.parametrize(
    "kw",
    [
        {"pruning": "random"},
        {"pruning": "norm"},
        {"pruning": "fastv"},
        {"pruning": "custom"},
        {"clustering": "kmeans"},
        {"clustering": "agglomerative"},
        {"clustering": "dpc"},
        {"pruning": "norm", "clustering": "kmeans", "keep_ratio": 0.8},
        {"pruning": "euti", "clustering": "agglomerative", "keep_ratio": 0.8},
    ],
    ids=lambda kw: "+".join(str(v) for v in kw.values()),
)
@pytest.mark.parametrize("budget", [{"target_tokens": 7}, {"target_ratio": 0.6}])
def test_budget_methods_meet_the_target_exactly(kw, budget):
    cfg = cfg_of(**kw, **budget)
    red = build_method(cfg).reduce(fake_signals(cfg, N=24))
    check_partition(red, 24)
    assert red.num_kept == target_count(cfg, 24)


@pytest.mark.parametrize("noise", [True, False])
def test_dbscan_eps_search_meets_the_target_closely(noise):
    # The searched eps gives (about) the count closest to the target among a fine grid of eps values.
    cfg = cfg_of(clustering="dbscan", target_tokens=10, dbscan_noise_as_clusters=noise, dbscan_min_samples=2)
    s = fake_signals(cfg, N=24)
    red = build_method(cfg).reduce(s)
    check_partition(red, 24)
    from pact.methods.clustering import _dbscan

    x = s.keys(rope=True).reshape(s.hidden.shape[0], -1)[s.visual_mask]
    counts = {int(_dbscan(x, cfg, e)[0].numel()) for e in torch.linspace(0.0, 2.0, 201).tolist()}
    best = min(abs(c - 10) for c in counts)
    assert abs(red.num_kept - 10) <= best + 1


# ---------------------------------------------------------------------------------------------------
# scoring methods


def test_random_pruning_is_seeded_and_sample_independent():
    cfg = cfg_of(pruning="random", keep_ratio=0.5)
    a = build_method(cfg).reduce(fake_signals(cfg, seed=0))
    b = build_method(cfg).reduce(fake_signals(cfg, seed=1))  # other content, same N and layer
    assert torch.equal(a.kept, b.kept)
    cfg3 = cfg.replace(random_seed=3)
    c = build_method(cfg3).reduce(fake_signals(cfg3, seed=0))
    assert not torch.equal(a.kept, c.kept)
    assert a.num_kept == 12 and a.hidden is None


def test_norm_pruning_against_plain_norms():
    cfg = cfg_of(pruning="norm", keep_ratio=0.25, norm_order=1.0)
    s = fake_signals(cfg)
    red = build_method(cfg).reduce(s)
    norms = [float(h.abs().sum()) for h in s.hidden[s.visual_mask]]
    expected = sorted(sorted(range(24), key=lambda i: -norms[i])[:6])
    assert red.kept.tolist() == expected


def naive_fastv_reference(q, k, mask, causal=True, support="prefix"):
    """Plain per-row loop: mean over the |P| prefix query rows and the heads of the softmax over the
    support's keys (prefix or visual) a row may see; a row that sees no key adds 0 (the reference's
    NaN -> 0)."""
    _, H, d = q.shape
    rep = H // k.shape[1]
    vis = mask.nonzero().flatten().tolist()
    P = vis[-1] + 1
    support_keys = list(range(P)) if support == "prefix" else vis
    total = torch.zeros(P)
    for h in range(H):
        for t in range(P):
            seen = [j for j in support_keys if j <= t or not causal]
            if not seen:
                continue
            logits = torch.stack([q[t, h] @ k[j, h // rep] for j in seen]) / math.sqrt(d)
            total[seen] += torch.softmax(logits, 0)
    return (total / (P * H))[vis]


@pytest.mark.parametrize("causal", [True, False])
def test_fastv_reference_scores_against_naive_attention(causal):
    cfg = cfg_of(pruning="fastv", keep_ratio=0.5, euti_rope=True, fastv_causal=causal, multiply_by_norm=False)
    s = fake_signals(cfg, T=30, first_visual=3, N=16)
    red = build_method(cfg).reduce(s)
    naive = naive_fastv_reference(s.queries(rope=True), s.keys(rope=True), s.visual_mask, causal)
    torch.testing.assert_close(red.scores, naive, rtol=1e-5, atol=1e-7)
    assert red.kept.tolist() == sorted(sorted(range(16), key=lambda i: (-float(naive[i]), i))[:8])


@pytest.mark.parametrize("causal", [True, False])
def test_fastv_visual_support_restricts_the_softmax_to_visual_keys(causal):
    # The reference with use_all_non_text_pruning=false: prefix queries, visual keys only; with the
    # causal mask the 3 rows before the first visual token see no key and add 0 (mean over all |P|).
    cfg = cfg_of(
        pruning="fastv",
        keep_ratio=0.5,
        euti_rope=True,
        fastv_causal=causal,
        multiply_by_norm=False,
        use_all_non_text_pruning=False,
    )
    assert cfg.euti_support == "visual"
    s = fake_signals(cfg, T=30, first_visual=3, N=16)
    red = build_method(cfg).reduce(s)
    q, k = s.queries(rope=True), s.keys(rope=True)
    naive = naive_fastv_reference(q, k, s.visual_mask, causal, support="visual")
    torch.testing.assert_close(red.scores, naive, rtol=1e-5, atol=1e-7)
    assert red.kept.tolist() == sorted(sorted(range(16), key=lambda i: (-float(naive[i]), i))[:8])
    # the prefix support gives other scores: the key is not ignored
    prefix = naive_fastv_reference(q, k, s.visual_mask, causal, support="prefix")
    assert not torch.allclose(red.scores, prefix, rtol=1e-3, atol=0)
    # every row sees a key without the mask: the scores then sum to 1 (one softmax per row and head)
    if not causal:
        assert float(red.scores.sum()) == pytest.approx(1.0, rel=1e-5)
    # chunking does not change the result
    from pact.ops.scoring import fastv_scores

    chunked = fastv_scores(q, k, s.visual_mask, causal=causal, support="visual", chunk_size=4)
    torch.testing.assert_close(chunked, red.scores, rtol=1e-6, atol=1e-8)


def test_fastv_multiplies_by_the_norm_as_the_reference_branch():
    # The reference's pruning branch multiplies FastV's attention scores by ||h||_p when
    # multiply_by_norm is set (its fastv.json sets it false).
    base = cfg_of(pruning="fastv", keep_ratio=0.5, euti_rope=True, multiply_by_norm=False)
    s = fake_signals(base, T=30, first_visual=3, N=16)
    plain = build_method(base).reduce(s).scores
    for p in (2.0, 1.0):
        cfg = base.replace(multiply_by_norm=True, norm_to_use=p)
        s = fake_signals(cfg, T=30, first_visual=3, N=16)
        norms = torch.stack([h.abs().pow(p).sum().pow(1 / p) for h in s.hidden[s.visual_mask]])
        torch.testing.assert_close(build_method(cfg).reduce(s).scores, plain * norms, rtol=1e-5, atol=0)
    assert pact.load_config("fastv").multiply_by_norm is False


def test_fastv_original_refuses_the_visual_support():
    cfg = cfg_of(pruning="fastv", fastv_variant="original", euti_support="visual", layer=2)
    with pytest.raises(ValueError, match="euti_support='visual'"):
        build_method(cfg)
    pair = cfg.replace(clustering="kmeans", cluster_ratio=0.5)
    with pytest.raises(ValueError, match="euti_support='visual'"):
        build_method(pair).reduce(fake_signals(pair))


def test_fastv_original_uses_last_token_of_previous_layer():
    cfg = cfg_of(pruning="fastv", fastv_variant="original", keep_ratio=0.5, layer=2)
    s = fake_signals(cfg, T=30, first_visual=3, N=16)
    method = build_method(cfg)
    assert method.input_layers(6) == [1]
    red = method.reduce(s)
    q, k = s.qk_at(1, rope=True)
    rep = q.shape[1] // k.shape[1]
    probs = torch.stack(
        [torch.softmax(k[:, h // rep] @ q[-1, h] / math.sqrt(q.shape[2]), 0) for h in range(q.shape[1])]
    )
    torch.testing.assert_close(red.scores, probs.mean(0)[s.visual_mask], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# VTW and ToMe schedules


def test_vtw_layer_formula():
    cfg = cfg_of(pruning="withdraw", vtw_equivalent_layer=4, vtw_keep_ratio=0.353)
    method = build_method(cfg)
    assert method.layers(28) == [12]  # the reference's example
    assert method.layers(32) == [round(32 * (1 - 0.647 * 28 / 32))]
    assert build_method(cfg_of(pruning="withdraw", layer=3)).layers(28) == [3]  # L_eq = -1: as given
    # budget: target_ratio r -> p = 1 - r; target_tokens -> per-sample layer, method runs everywhere
    assert build_method(cfg.replace(target_ratio=0.647)).layers(28) == [12]
    per_sample = build_method(cfg.replace(target_tokens=100))
    assert per_sample.layers(28) == list(range(28))
    assert per_sample.withdraw_layer(28, 400) == round(28 * (1 - 0.75 * 24 / 28))


def test_vtw_reduce_withdraws_everything():
    cfg = cfg_of(pruning="withdraw", layer=2)
    red = build_method(cfg).reduce(fake_signals(cfg))
    assert red.num_kept == 0 and bool((red.labels == -1).all())


def simulate_tome(n_layers: int, n_visual: int, p: float, eq: int) -> list[int]:
    """Visual tokens entering each layer under the reference schedule (plain loop)."""
    sched = tome_schedule(n_layers, n_visual, p, eq)
    counts, cur = [], n_visual
    for i in range(n_layers):
        cur -= tome_clamp(sched[i], cur)
        counts.append(cur)
    return counts


@pytest.mark.parametrize(("n", "N", "p"), [(28, 576, 0.353), (28, 2000, 0.5), (32, 729, 0.2)])
def test_tome_schedule_layer_average_matches_single_layer_budget(n, N, p):
    counts = simulate_tome(n, N, p, 4)
    single = (4 * N + (n - 4) * p * N) / n  # layer-averaged tokens of keeping p from layer 4
    assert abs(sum(counts) / n - single) / single < 0.03


def test_tome_method_follows_schedule_and_merges_size_weighted():
    cfg = cfg_of(clustering="tome", layer=0, tome_keep_ratio=0.4, tome_equivalent_layer=2)
    method = build_method(cfg)
    assert method.layers(6) == list(range(6))
    sizes = torch.tensor([1.0, 2.0, 1.0, 3.0] * 6)
    s = fake_signals(cfg, N=24, layer=1, num_layers=6, sizes=sizes)
    red = method.reduce(s)
    n_orig = int(sizes.sum())
    r = tome_clamp(tome_schedule(6, n_orig, 0.4, 2)[1], 24)
    assert red.num_kept == 24 - r
    check_size = torch.zeros(red.num_kept).index_add_(0, red.labels, sizes)
    assert torch.equal(check_size, red.sizes)
    vis = s.hidden[s.visual_mask]
    for row in range(red.num_kept):
        members = (red.labels == row).nonzero().flatten()
        w = sizes[members]
        torch.testing.assert_close(red.hidden[row], (vis[members] * w[:, None]).sum(0) / w.sum())


def test_tome_budget_sets_p():
    cfg = cfg_of(clustering="tome", layer=0, target_tokens=6)
    assert build_method(cfg).keep_ratio(24) == 0.25


# ---------------------------------------------------------------------------------------------------
# clustering baselines: method output against plain reference computations


def _features(s: Signals) -> torch.Tensor:
    return s.keys(rope=True).reshape(s.hidden.shape[0], -1)[s.visual_mask]


def test_kmeans_method_against_ops_and_plain_means():
    from pact.ops.clustering import kmeans

    cfg = cfg_of(clustering="kmeans", cluster_ratio=0.25)
    s = fake_signals(cfg)
    red = build_method(cfg).reduce(s)
    centers, _ = kmeans(_features(s), 6, 100, 0)
    assert red.kept.tolist() == centers.tolist()
    check_partition(red, 24)
    torch.testing.assert_close(red.hidden, naive_means(s.hidden[s.visual_mask], red.kept, red.labels))


@pytest.mark.parametrize("linkage", ["single", "average", "complete"])
def test_agglomerative_method_partition_equals_sklearn(linkage):
    from sklearn.cluster import AgglomerativeClustering

    cfg = cfg_of(clustering="agglomerative", cluster_ratio=0.3, linkage=linkage)
    s = fake_signals(cfg)
    red = build_method(cfg).reduce(s)
    x = torch.nn.functional.normalize(_features(s), dim=1).double()
    dist = (1 - x @ x.T).clamp_min(0).fill_diagonal_(0).numpy()
    ref = AgglomerativeClustering(n_clusters=7, metric="precomputed", linkage=linkage).fit_predict(dist)
    ours = red.labels.tolist()
    assert all((ref[i] == ref[j]) == (ours[i] == ours[j]) for i in range(24) for j in range(24))
    torch.testing.assert_close(red.hidden, naive_means(s.hidden[s.visual_mask], red.kept, red.labels))


def test_dpc_method_against_plain_density_peaks():
    cfg = cfg_of(clustering="dpc", cluster_ratio=0.25)
    s = fake_signals(cfg)
    red = build_method(cfg).reduce(s)
    x = torch.nn.functional.normalize(_features(s), dim=1)
    dist = (1 - x @ x.T).clamp_min(0).fill_diagonal_(0)
    rho = torch.exp(-((dist / 2.0) ** 2)).sum(1)
    order = sorted(range(24), key=lambda i: (-float(rho[i]), i))
    rank = {p: r for r, p in enumerate(order)}
    delta, parent = [], []
    for i in range(24):
        denser = [j for j in range(24) if rank[j] < rank[i]]
        j = min(denser, key=lambda j: (float(dist[i, j]), j)) if denser else i
        delta.append(float(dist[i, j]) if denser else math.inf)
        parent.append(j)
    gamma = [float(rho[i]) * delta[i] for i in range(24)]
    centers = sorted(sorted(range(24), key=lambda i: (-gamma[i], i))[:6])
    label = {}
    for i in order:  # the reference's loop: visit by decreasing density
        label[i] = i if i in centers else label[parent[i]]
    assert red.kept.tolist() == centers
    assert [centers[int(r)] for r in red.labels] == [label[i] for i in range(24)]


@pytest.mark.parametrize("noise", [True, False])
def test_dbscan_method_partition_equals_sklearn(noise):
    from sklearn.cluster import DBSCAN

    cfg = cfg_of(clustering="dbscan", dbscan_eps=1.25, dbscan_min_samples=3, dbscan_noise_as_clusters=noise)
    s = fake_signals(cfg, N=30)
    red = build_method(cfg).reduce(s)
    x = torch.nn.functional.normalize(_features(s), dim=1).double().numpy()
    ref = DBSCAN(eps=1.25, min_samples=3, metric="euclidean").fit_predict(x)
    ours = red.labels.tolist()
    for i in range(30):
        if ref[i] == -1:
            assert (ours[i] == -1) != noise  # noise: dropped, or its own singleton
            if noise:
                assert int(red.sizes[ours[i]]) == 1
            continue
        for j in range(30):
            if ref[j] != -1:
                assert (ref[i] == ref[j]) == (ours[i] == ours[j])


# ---------------------------------------------------------------------------------------------------
# custom hooks


def test_custom_pruning_default_example_and_reference_style_function():
    cfg = cfg_of(pruning="custom", keep_ratio=0.5, euti_rope=True)
    s = fake_signals(cfg)
    red = build_method(cfg).reduce(s)
    q, k = s.queries(rope=True), s.keys(rope=True)
    rep = q.shape[1] // k.shape[1]
    # the reference's example: mean over heads of q_t . k_t (no 1 / sqrt(d))
    self_attn = torch.stack([(q[:, h] * k[:, h // rep]).sum(-1) for h in range(q.shape[1])]).mean(0)
    torch.testing.assert_close(red.scores, self_attn[s.visual_mask])
    # a string hook; a reference-style two-argument function returning (1, P)
    cfg2 = cfg.replace(custom_pruning_fn="zoo_hooks:first_tokens_first")
    red2 = build_method(cfg2).reduce(s)
    assert red2.kept.tolist() == list(range(12))


def test_custom_pruning_visual_support_gives_visual_keys_and_prefix_queries():
    # The reference always passes the prefix's queries; use_all_non_text_pruning=false restricts only
    # the keys (the scored tokens) to the visual ones.
    from pact.methods.custom_method import custom_token_scores

    seen = {}

    def hook(k_image, q_image, *, hidden, visual_mask):
        seen.update(k=k_image, q=q_image, hidden=hidden, visual_mask=visual_mask)
        return k_image[0, 0, :, 0]  # score = first coordinate of head 0's key

    for support, n_keys in (("prefix", 5 + 24), ("visual", 24)):
        cfg = cfg_of(pruning="custom", keep_ratio=0.5, euti_support=support)
        s = fake_signals(cfg)  # 5 text tokens, then 24 visual tokens, then text
        scores = custom_token_scores(s, hook)
        k, q = s.keys(), s.queries()
        assert seen["k"].shape == (1, 4, n_keys, 8) and seen["q"].shape == (1, 4, 29, 8)
        torch.testing.assert_close(seen["q"][0, :, :, :], q[:29].transpose(0, 1))
        rows = torch.arange(29) if support == "prefix" else torch.arange(5, 29)
        torch.testing.assert_close(seen["k"][0, 0], k[rows, 0])
        torch.testing.assert_close(seen["hidden"], s.hidden[rows])
        assert seen["visual_mask"].tolist() == s.visual_mask[rows].tolist()
        torch.testing.assert_close(scores, k[5:29, 0, 0])
    # the shipped example needs as many queries as keys: it refuses the visual support clearly
    cfg = cfg_of(pruning="custom", keep_ratio=0.5, euti_support="visual")
    with pytest.raises(ValueError, match="euti_support='prefix'"):
        build_method(cfg).reduce(fake_signals(cfg))


def test_custom_hook_resolution_errors():
    with pytest.raises(ValueError, match="cannot import module"):
        resolve_hook("no_such_pkg.mod:fn", "pact.custom:custom_pruning")
    with pytest.raises(ValueError, match="has no 'nope'"):
        resolve_hook("pact.custom:nope", "pact.custom:custom_pruning")
    with pytest.raises(ValueError, match="has no"):
        build_method(cfg_of(pruning="custom", custom_pruning_fn="pact.custom:missing"))
    assert call_hook(lambda a, b: a + b, 1, 2, hidden=3) == 3  # extra context dropped


def test_custom_reduction_example_reproduces_the_reference():
    from pact.custom import custom_token_reduction

    # issue 10's reproducer: windows [0, 1] -> 1 and [2, 3] -> 3 (start + w // 2); token 4, which fills
    # no window, is dropped (the reference's mask leaves it out)
    kept, labels = custom_token_reduction(torch.arange(20.0).view(5, 4), torch.zeros(5, 4), cutoff=2)
    assert kept.tolist() == [1, 3] and labels.tolist() == [1, 1, 3, 3, -1]
    # 224 tokens, windows of 3: 224 // 3 = 74 kept, the last 2 tokens dropped
    kept, labels = custom_token_reduction(torch.zeros(224, 2), torch.zeros(224, 2), cutoff=3)
    assert kept.numel() == 74 and kept[:3].tolist() == [1, 4, 7] and int(kept[-1]) == 220
    assert labels[-2:].tolist() == [-1, -1] and labels[219:222].tolist() == [220, 220, 220]
    # fewer tokens than a window: nothing kept; cutoff < 1 means windows of 1
    kept, labels = custom_token_reduction(torch.zeros(2, 2), torch.zeros(2, 2), cutoff=3)
    assert kept.numel() == 0 and labels.tolist() == [-1, -1]
    kept, _ = custom_token_reduction(torch.zeros(3, 2), torch.zeros(3, 2), cutoff=0.5)
    assert kept.tolist() == [0, 1, 2]


def test_custom_reduction_window_example_merges_means():
    cfg = cfg_of(clustering="custom", cutoff=3.0)
    s = fake_signals(cfg, N=10)
    red = build_method(cfg).reduce(s)
    assert red.kept.tolist() == [1, 4, 7]  # start + 3 // 2 of each full window; token 9 dropped
    assert red.sizes.tolist() == [3.0, 3.0, 3.0]  # the reference's weights: the window size
    assert red.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, -1]
    torch.testing.assert_close(red.hidden, naive_means(s.hidden[s.visual_mask], red.kept, red.labels))
    # merge_mean=false keeps each representative's own hidden state: what the reference's example
    # computed (it returned the un-merged features)
    red_own = build_method(cfg.replace(merge_mean=False)).reduce(s)
    assert red_own.kept.tolist() == [1, 4, 7]
    vis = s.hidden[s.visual_mask].float()
    assert red_own.hidden is None or torch.equal(red_own.hidden, vis[[1, 4, 7]])


def test_custom_combined_receives_pruned_tokens_and_can_retrieve_them():
    cfg = cfg_of(
        pruning="custom",
        clustering="custom",
        keep_ratio=0.5,
        retrieval=True,
        custom_reduction_fn="zoo_hooks:merge_all_into_first",
    )
    s = fake_signals(cfg, N=10)
    red = build_method(cfg).reduce(s)
    assert red.num_kept == 1 and red.sizes.tolist() == [10.0]  # 5 candidates + 5 retrieved
    torch.testing.assert_close(red.hidden[0], s.hidden[s.visual_mask].mean(0))
    red_no = build_method(cfg.replace(retrieval=False)).reduce(s)
    assert red_no.sizes.tolist() == [5.0] and int((red_no.labels == -1).sum()) == 5


def test_custom_reduction_bad_return_is_a_clear_error():
    cfg = cfg_of(clustering="custom", custom_reduction_fn="zoo_hooks:bad_labels")
    with pytest.raises(ValueError, match="1-D integer tensor"):
        build_method(cfg).reduce(fake_signals(cfg))
    cfg = cfg_of(clustering="custom", custom_reduction_fn="zoo_hooks:reference_style_reduction")
    with pytest.raises(ValueError, match=r"got a 4-tuple \(a hook written for the reference"):
        build_method(cfg).reduce(fake_signals(cfg))


# ---------------------------------------------------------------------------------------------------
# registry


def test_unsupported_pairs_raise_the_registry_error():
    with pytest.raises(
        ValueError, match="no reduction method for pruning='vispruner' with clustering='kmeans'"
    ):
        build_method(cfg_of(pruning="vispruner", clustering="kmeans"))
    with pytest.raises(ValueError, match="supported"):
        build_method(cfg_of(pruning="hired", clustering="pooling"))
