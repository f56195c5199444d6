"""Audit of the reference's configuration keys (orailix/PACT ``load_config``).

Every reference key that ``pact.load_config`` accepts either changes the computation it names -- a
test below, decorated ``@covers(key, ...)``, changes it and compares the result with a hand-worked
or independently computed answer (plain loops, scikit-learn, the formula worked by hand) -- or is
listed in docs/CONFIGDOC.md's "Reference keys accepted with no effect here" table with its reason
(and warned about where accepting it silently would mislead). ``test_every_reference_key_is_audited``
fails when a key is in neither place: a key accepted and then ignored is the fault this file guards.

Configs are given in the reference's form (its key names, its defaults for what is omitted).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import inputs_for, model_for, one_image
from test_methods_logic import fake_signals, naive_fastv_reference

import pact
import pact.api
from pact import testing
from pact.config import REFERENCE_KEYS
from pact.methods.base import build_method

COVERED: set[str] = set()


def covers(*keys: str):
    """Record that the decorated test audits these reference keys."""
    unknown = set(keys) - REFERENCE_KEYS
    assert not unknown, f"not reference keys: {unknown}"
    COVERED.update(keys)
    return lambda fn: fn


def ref(**keys):
    """A reference-form config (its names, its defaults for omitted keys), reduction on at layer 2."""
    return pact.load_config({"visual_token_reduction": True, "layer_for_reduction": 2, **keys})


def reduce(cfg, **signal_kw):
    s = fake_signals(cfg, **signal_kw)
    return build_method(cfg).reduce(s), s


def top(scores: torch.Tensor, k: int) -> list[int]:
    """Ascending indices of the k largest scores, ties to the lower index (plain sort)."""
    return sorted(sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))[:k])


# ---------------------------------------------------------------------------------------------------
# independent answers


def naive_euti(s, *, rope=False, support="prefix", norm=None):
    """Reference EUTI by loops: mean prefix query per head, softmax over the support's keys, mean over
    heads, read at the visual tokens, times ||h||_norm (None: no norm)."""
    q, k = s.queries(rope=rope), s.keys(rope=rope)
    _, H, d = q.shape
    rep = H // k.shape[1]
    vis = s.visual_mask.nonzero().flatten().tolist()
    P = vis[-1] + 1
    keys = list(range(P)) if support == "prefix" else vis
    att = torch.zeros(len(keys))
    for h in range(H):
        qbar = q[:P, h].mean(0)
        att += torch.softmax(torch.stack([qbar @ k[j, h // rep] for j in keys]) / math.sqrt(d), 0)
    att /= H
    out = torch.stack([att[keys.index(i)] for i in vis])
    if norm is not None:
        out = out * torch.stack([s.hidden[i].abs().pow(norm).sum().pow(1 / norm) for i in vis])
    return out


def cosine_distances(x: torch.Tensor) -> torch.Tensor:
    x = torch.nn.functional.normalize(x.double(), dim=1)
    return (1 - x @ x.T).clamp(min=0).fill_diagonal_(0)


def naive_dbdpc(x: torch.Tensor, cutoff: float, dn: float = 2.0) -> tuple[list[int], list[int]]:
    """Sequential DBDPC: visit points by decreasing Gaussian density; a point is a center iff it is
    farther than ``cutoff`` from every earlier center; each point joins its nearest center."""
    dist = cosine_distances(x)
    rho = torch.exp(-((dist / dn) ** 2)).sum(1)
    centers: list[int] = []
    for i in sorted(range(x.shape[0]), key=lambda i: (-float(rho[i]), i)):
        if all(float(dist[i, c]) > cutoff for c in centers):
            centers.append(i)
    labels = [centers[int(torch.argmin(dist[i, centers]))] for i in range(x.shape[0])]
    return sorted(centers), labels


def features_of(s, name: str) -> torch.Tensor:
    """The reference's clustering vectors of the visual tokens: layer-L q/k, heads concatenated."""
    rope = name.endswith("_cosine")
    x = s.keys(rope=rope) if name.startswith("current_k") else s.queries(rope=rope)
    return x.reshape(x.shape[0], -1)[s.visual_mask]


# ---------------------------------------------------------------------------------------------------
# the audit itself


def no_effect_keys() -> set[str]:
    """The keys of CONFIGDOC's "Reference keys accepted with no effect here" table."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "CONFIGDOC.md").read_text(encoding="utf-8")
    section = doc.split("### Reference keys accepted with no effect here", 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"^\| `(\w+)`", section, flags=re.M))


def test_every_reference_key_is_audited():
    # COVERED is complete here: the @covers decorators ran when the module was imported
    ignored = no_effect_keys()
    assert ignored <= REFERENCE_KEYS
    assert not (ignored & COVERED), f"listed as no effect but tested for an effect: {ignored & COVERED}"
    missing = REFERENCE_KEYS - COVERED - ignored
    assert not missing, f"reference keys neither tested for their effect nor documented: {sorted(missing)}"


# ---------------------------------------------------------------------------------------------------
# engine-level keys (tiny LLaVA-1.5)


def run(cfg, family="llava"):
    """(last-position logits, stats) of one image prompt; cfg None = stock model."""
    model, _ = model_for(family)
    x = inputs_for(family, [one_image(family)])
    pact.api.remove(model)
    if cfg is not None:
        pact.api.apply(model, cfg)
    with torch.no_grad():
        logits = model(**x).logits[0, -1].float()
    st = pact.api.stats(model) if cfg is not None else None
    pact.api.remove(model)
    return logits, st


@covers("visual_token_reduction")
def test_visual_token_reduction_is_the_master_switch():
    stock, _ = run(None)
    on, st_on = run(ref(token_pruning=True, pruning_tokeep_percentage_value=0.5))
    off, st_off = run(
        ref(token_pruning=True, pruning_tokeep_percentage_value=0.5, visual_token_reduction=False)
    )
    assert torch.equal(off, stock) and st_off.layers == []
    assert st_on.layers == [2] and st_on.visual_after[0] == st_on.visual_before[0] // 2
    assert not torch.allclose(on, stock)


@covers("layer_for_reduction", "progessive_reduction")
def test_reduction_layer_and_progressive():
    cfg = ref(token_pruning=True, pruning_tokeep_percentage_value=0.5)
    _, st2 = run(cfg)
    _, st1 = run(cfg.replace(layer_for_reduction=1))
    _, stp = run(cfg.replace(progessive_reduction=True))
    assert st2.layers == [2] and st1.layers == [1] and stp.layers == [2, 3]  # 4 decoder layers
    n = st2.visual_before[0]
    assert st2.visual_after[0] == n // 2 and stp.visual_after[0] == (n // 2) // 2  # pruned again at 3


@covers("no_proportional_attention")
def test_no_proportional_attention_drops_the_size_bias():
    cfg = ref(use_custom_merging=True, cutoff=3.0)  # windows of 3: every kept token has size 3
    with_bias, st = run(cfg)
    without, st_no = run(cfg.replace(no_proportional_attention=True))
    assert st.visual_after == st_no.visual_after and st.visual_after[0] == st.visual_before[0] // 3
    assert not torch.allclose(with_bias, without)


@covers("get_mean_position_id")
def test_mean_position_id_moves_merged_tokens():
    cfg = ref(use_DBDPC=True, cutoff=0.9, vector_to_use_in_distance_clustering="current_k")
    center, st = run(cfg)
    assert st.visual_after[0] < st.visual_before[0] // 2  # clusters of several tokens
    mean, _ = run(cfg.replace(get_mean_position_id=True))
    assert not torch.allclose(center, mean)


@covers("change_position_ids")
def test_change_position_ids_renumbers():
    cfg = ref(use_custom_merging=True, cutoff=3.0)
    assert cfg.replace(change_position_ids=True).position_mode == "renumber"
    center, _ = run(cfg)
    renumbered, _ = run(cfg.replace(change_position_ids=True))
    assert not torch.allclose(center, renumbered)  # exact renumbered positions: tests/test_renumber.py


@covers("log_output_path")
def test_log_output_path_receives_the_metrics(tmp_path):
    from pact.eval.models import PactQwen2VL

    path = testing.save_tiny("qwen2_vl", tmp_path / "qwen2_vl")
    lm = PactQwen2VL(
        pretrained=str(path), device="cpu", dtype="float32", layer=2, log_output_path=str(tmp_path / "logs")
    )
    assert lm.config.log_output_path == str(tmp_path / "logs")
    doc = lm.finalize_metrics()
    written = [Path(p) for p in doc["written_to"]]
    assert len(written) == 1 and written[0].parent == tmp_path / "logs"
    assert json.loads(written[0].read_text())["config"]["log_output_path"] == str(tmp_path / "logs")


# ---------------------------------------------------------------------------------------------------
# pruning keys (method level, synthetic signals: 5 text tokens, 24 visual, then text)


@covers("token_pruning", "pruning_tokeep_percentage_value")
def test_token_pruning_is_euti_keeping_lambda():
    for lam in (0.25, 0.5):
        red, s = reduce(ref(token_pruning=True, pruning_tokeep_percentage_value=lam))
        naive = naive_euti(s)  # reference defaults: pre-RoPE, prefix support, no norm
        torch.testing.assert_close(red.scores, naive, rtol=1e-5, atol=1e-8)
        assert red.kept.tolist() == top(naive, int(24 * lam))


@covers("multiply_by_norm", "norm_to_use")
def test_multiply_by_norm_and_its_order():
    for p in (2, 1):
        red, s = reduce(
            ref(token_pruning=True, pruning_tokeep_percentage_value=0.5, multiply_by_norm=True, norm_to_use=p)
        )
        torch.testing.assert_close(red.scores, naive_euti(s, norm=p), rtol=1e-5, atol=1e-8)
    # FastV too: the reference multiplies in the same branch
    red, s = reduce(
        ref(
            token_pruning=True,
            use_attention_in_token_pruning=True,
            pruning_tokeep_percentage_value=0.5,
            multiply_by_norm=True,
        )
    )
    att = naive_fastv_reference(s.queries(), s.keys(), s.visual_mask, causal=False)
    norms = s.hidden[s.visual_mask].norm(dim=-1)
    torch.testing.assert_close(red.scores, att * norms, rtol=1e-5, atol=1e-8)


@covers("use_cosine_in_token_pruning")
def test_use_cosine_in_token_pruning_scores_post_rope():
    plain, s = reduce(ref(token_pruning=True, pruning_tokeep_percentage_value=0.5))
    red, s = reduce(
        ref(token_pruning=True, pruning_tokeep_percentage_value=0.5, use_cosine_in_token_pruning=True)
    )
    torch.testing.assert_close(red.scores, naive_euti(s, rope=True), rtol=1e-5, atol=1e-8)
    assert not torch.allclose(red.scores, plain.scores)
    # FastV and the custom score read the same choice
    fv = ref(token_pruning=True, use_attention_in_token_pruning=True, pruning_tokeep_percentage_value=0.5)
    for rope in (False, True):
        red, s = reduce(fv.replace(use_cosine_in_token_pruning=rope))
        att = naive_fastv_reference(s.queries(rope=rope), s.keys(rope=rope), s.visual_mask, causal=False)
        torch.testing.assert_close(red.scores, att, rtol=1e-5, atol=1e-8)


@covers("use_all_non_text_pruning")
def test_use_all_non_text_pruning_false_restricts_the_softmax_to_visual_keys():
    base = ref(token_pruning=True, pruning_tokeep_percentage_value=0.5)
    for flag, support in ((True, "prefix"), (False, "visual")):
        red, s = reduce(base.replace(use_all_non_text_pruning=flag))
        torch.testing.assert_close(red.scores, naive_euti(s, support=support), rtol=1e-5, atol=1e-8)
    # FastV (issue 10 item 5): the same key restricts its softmax as well
    fv = base.replace(use_attention_in_token_pruning=True, use_mask_in_use_attention_in_token_pruning=True)
    for flag, support in ((True, "prefix"), (False, "visual")):
        red, s = reduce(fv.replace(use_all_non_text_pruning=flag))
        naive = naive_fastv_reference(s.queries(), s.keys(), s.visual_mask, True, support=support)
        torch.testing.assert_close(red.scores, naive, rtol=1e-5, atol=1e-8)
    # and the custom hook receives the visual keys only (tests/test_methods_logic.py checks the shapes)
    cu = base.replace(use_custom_pruning=True, use_all_non_text_pruning=False)
    with pytest.raises(ValueError, match="euti_support='prefix'"):
        reduce(cu)  # the shipped example needs queries and keys of the same tokens, as the reference


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_fastv_visual_support_on_the_models_own_attention(family):
    # The model's eager attention of layer L renormalised over the visual keys a row sees is the
    # softmax restricted to the visual keys; rows before the first visual token add 0.
    model, _ = model_for(family, "eager")
    x = inputs_for(family, [one_image(family)])
    layer = 2
    with torch.no_grad():
        attn = model(**x, output_attentions=True).attentions[layer][0].double()  # (H, T, T)
    cfg = pact.load_config("fastv", layer=layer, use_all_non_text_pruning=False)
    pact.api.apply(model, cfg)
    with torch.no_grad():
        model(**x)
    scores = pact.api.stats(model).records[0][0].scores
    vis = torch.nonzero(testing.patch_token_mask(model, x)[0]).flatten()
    rows = attn[:, : int(vis[-1]) + 1][:, :, vis]  # (H, P, N): causal zeros above the diagonal
    total = rows.sum(-1, keepdim=True)
    naive = torch.where(total > 0, rows / total.clamp(min=1e-300), 0.0).mean(dim=(0, 1))
    torch.testing.assert_close(scores.double(), naive, rtol=1e-4, atol=1e-7)
    pact.api.remove(model)
    pact.api.apply(model, cfg.replace(use_all_non_text_pruning=True))
    with torch.no_grad():
        model(**x)
    prefix = pact.api.stats(model).records[0][0].scores
    assert not torch.allclose(prefix, scores, rtol=1e-3, atol=0)


@covers("use_attention_in_token_pruning", "use_mask_in_use_attention_in_token_pruning")
def test_fastv_flags():
    for causal in (True, False):
        cfg = ref(
            token_pruning=True,
            use_attention_in_token_pruning=True,
            use_mask_in_use_attention_in_token_pruning=causal,
            pruning_tokeep_percentage_value=0.5,
        )
        assert cfg.pruning == "fastv"
        red, s = reduce(cfg)
        naive = naive_fastv_reference(s.queries(), s.keys(), s.visual_mask, causal)
        torch.testing.assert_close(red.scores, naive, rtol=1e-5, atol=1e-8)
        assert red.kept.tolist() == top(naive, 12)


@covers("use_IQR_in_token_pruning", "pruning_filter_wth_percentage", "alpha_IQR")
def test_iqr_selection_and_alpha():
    base = ref(token_pruning=True, use_attention_in_token_pruning=True, pruning_tokeep_percentage_value=0.5)
    counts = []
    for alpha in (-0.5, 0.5, 1.5):
        cfg = base.replace(
            pruning_filter_wth_percentage=False, use_IQR_in_token_pruning=True, alpha_IQR=alpha
        )
        red, _ = reduce(cfg)
        q1, q3 = torch.quantile(red.scores, 0.25), torch.quantile(red.scores, 0.75)
        expected = (red.scores > q1 + alpha * (q3 - q1)).nonzero().flatten().tolist()
        assert red.kept.tolist() == expected
        counts.append(len(expected))
    assert counts[0] > counts[1] > counts[2]
    red, _ = reduce(base)  # pruning_filter_wth_percentage: exactly int(N * lambda)
    assert red.num_kept == 12


@covers("use_custom_pruning")
def test_use_custom_pruning_selects_the_hook():
    cfg = ref(token_pruning=True, use_custom_pruning=True, pruning_tokeep_percentage_value=0.5)
    red, s = reduce(cfg)
    q, k = s.queries(), s.keys()
    rep = q.shape[1] // k.shape[1]
    self_score = torch.stack([(q[:, h] * k[:, h // rep]).sum(-1) for h in range(q.shape[1])]).mean(0)
    torch.testing.assert_close(red.scores, self_score[s.visual_mask])
    assert red.kept.tolist() == top(self_score[s.visual_mask], 12)


@covers("prune_with_norm")
def test_prune_with_norm_keeps_the_largest_norms():
    red, s = reduce(ref(prune_with_norm=True, pruning_tokeep_percentage_value=0.25))
    norms = torch.stack([h.pow(2).sum().sqrt() for h in s.hidden[s.visual_mask]])
    assert red.kept.tolist() == top(norms, 6)


@covers("withdraw_visual_tokens", "VTW_equivalant_layer_for_reduction", "equivalent_reduc_percentage_vtw")
def test_vtw_withdraws_everything_at_the_formula_layer():
    cfg = ref(withdraw_visual_tokens=True)
    red, _ = reduce(cfg)
    assert red.num_kept == 0
    assert build_method(cfg).layers(28) == [2]  # L_eq = -1: the layer as given
    # round(n * (1 - (1 - p) * (n - L_eq) / n)) worked by hand for n = 28
    for eq, p, layer in ((4, 0.353, 12), (4, 0.5, 16), (0, 0.5, 14), (8, 0.5, 18)):
        c = cfg.replace(VTW_equivalant_layer_for_reduction=eq, equivalent_reduc_percentage_vtw=p)
        assert build_method(c).layers(28) == [layer]


# ---------------------------------------------------------------------------------------------------
# clustering keys


@covers("use_DBDPC", "cutoff", "vector_to_use_in_distance_clustering")
def test_dbdpc_cutoff_and_features_against_sequential_dbdpc():
    partitions = {}
    for name in ("current_k_cosine", "current_k", "current_q", "current_q_cosine"):
        for cutoff in (0.8, 0.95):
            cfg = ref(use_DBDPC=True, cutoff=cutoff, vector_to_use_in_distance_clustering=name)
            red, s = reduce(cfg)
            centers, labels = naive_dbdpc(features_of(s, name), cutoff)
            assert red.kept.tolist() == centers
            assert [centers[int(r)] for r in red.labels] == labels
            partitions[name, cutoff] = centers
    assert len({tuple(c) for c in partitions.values()}) == len(partitions)  # each key matters
    assert all(len(partitions[n, 0.95]) < len(partitions[n, 0.8]) for n, _ in partitions)


@covers("include_pruned_in_mean", "coef_pruned", "take_mean")
def test_retrieval_radius_and_mean():
    base = ref(token_pruning=True, use_DBDPC=True, pruning_tokeep_percentage_value=0.5, cutoff=0.8)
    red0, s = reduce(base.replace(include_pruned_in_mean=False))
    feats = features_of(s, "current_k_cosine")
    kept = top(naive_euti(s), 12)
    centers, _ = naive_dbdpc(feats[kept], 0.8)
    centers = [kept[c] for c in centers]
    assert red0.kept.tolist() == centers and float(red0.sizes.sum()) == 12  # no pruned token joins
    dist = cosine_distances(feats)
    pruned = [i for i in range(24) if i not in kept]
    retrieved_counts = []
    for alpha in (1.0, 1.3):
        red, _ = reduce(base.replace(coef_pruned=alpha))
        assert red.kept.tolist() == centers
        expected = {}
        for i in pruned:  # nearest center, kept only within alpha * cutoff
            j = min(centers, key=lambda c: float(dist[i, c]))
            if float(dist[i, j]) <= alpha * 0.8:
                expected[i] = centers.index(j)
        got = {i: int(red.labels[i]) for i in pruned if int(red.labels[i]) >= 0}
        assert got == expected
        retrieved_counts.append(len(expected))
        # take_mean (default true): each center holds the plain mean of its members
        members = [[i for i in range(24) if int(red.labels[i]) == r] for r in range(len(centers))]
        means = torch.stack([s.hidden[s.visual_mask][m].float().mean(0) for m in members])
        torch.testing.assert_close(red.hidden, means)
    assert retrieved_counts[0] < retrieved_counts[1]
    own, _ = reduce(base.replace(take_mean=False))
    vis = s.hidden[s.visual_mask].float()
    assert own.hidden is None or torch.equal(own.hidden, vis[centers])


@covers("use_custom_merging")
def test_use_custom_merging_runs_the_example_hook_with_cutoff_windows():
    for cutoff, kept in ((3.0, list(range(1, 24, 3))), (2.0, list(range(1, 24, 2))), (5.0, [2, 7, 12, 17])):
        red, _ = reduce(ref(use_custom_merging=True, cutoff=cutoff))
        assert red.kept.tolist() == kept
        assert red.sizes.tolist() == [int(cutoff)] * len(kept)


@covers("use_tome", "perc_tokeep_tome_total", "tome_equivalant_layer_for_reduction")
def test_tome_schedule_worked_by_hand():
    # n = 6 layers, N = 24: r_0 = floor(6n (1 - p_eff) N / ((n + 1)(2n + 1))) + 1 at layer 0, with
    # p_eff = 1 - (1 - p)(n - L_eq) / n: p=0.5, L_eq=4 -> 144/91 -> 2; p=0, L_eq=4 -> 288/91 -> 4;
    # p=0.5, L_eq=0 -> 432/91 -> 5
    for p, eq, merged in ((0.5, 4, 2), (0.0, 4, 4), (0.5, 0, 5)):
        cfg = pact.load_config(
            {"visual_token_reduction": True, "use_tome": True, "perc_tokeep_tome_total": p},
            tome_equivalant_layer_for_reduction=eq,
        )
        assert cfg.layer == 0 and cfg.progressive and build_method(cfg).layers(6) == list(range(6))
        red, _ = reduce(cfg, layer=0)
        assert red.num_kept == 24 - merged


@covers("use_kmeans", "perc_tokeep_kmeans", "use_dpc", "percentage_to_keep_dpc")
def test_kmeans_and_dpc_cluster_counts():
    for flag, key in (("use_kmeans", "perc_tokeep_kmeans"), ("use_dpc", "percentage_to_keep_dpc")):
        for p, k in ((0.5, 12), (0.25, 6)):
            red, _ = reduce(ref(**{flag: True, key: p}))
            assert red.num_kept == k and int((red.labels >= 0).sum()) == 24


@covers("use_agglomerative", "percentage_to_keep_agglomerative", "linkage")
def test_agglomerative_against_scikit_learn():
    from sklearn.cluster import AgglomerativeClustering

    partitions = []
    for linkage in ("single", "complete"):
        for p in (0.5, 0.25):
            red, s = reduce(ref(use_agglomerative=True, percentage_to_keep_agglomerative=p, linkage=linkage))
            dist = cosine_distances(features_of(s, "current_k_cosine")).numpy()
            sk = AgglomerativeClustering(n_clusters=int(24 * p), metric="precomputed", linkage=linkage)
            sk_labels = sk.fit_predict(dist).tolist()
            ours = red.labels.tolist()
            same = {(a, b) for a, b in zip(ours, sk_labels, strict=True)}
            assert red.num_kept == int(24 * p) and len(same) == int(24 * p)  # same partition
            partitions.append(tuple(ours))
    assert len(set(partitions)) == 4


@covers("use_dbscan", "eps_dbscan", "noise_as_clusters_dbscan")
def test_dbscan_against_scikit_learn():
    from sklearn.cluster import DBSCAN

    counts = set()
    for eps in (1.0, 1.15):  # 19 and 12 noise points, one cluster
        for noise in (False, True):
            cfg = ref(use_dbscan=True, eps_dbscan=eps, noise_as_clusters_dbscan=noise)
            red, s = reduce(cfg)
            x = torch.nn.functional.normalize(features_of(s, "current_k_cosine").double(), dim=1).numpy()
            sk = DBSCAN(eps=eps, min_samples=5, metric="euclidean").fit_predict(x).tolist()
            n_noise = sk.count(-1)
            expected = len(set(sk) - {-1}) + (n_noise if noise else 0)
            assert red.num_kept == expected
            assert int((red.labels < 0).sum()) == (0 if noise else n_noise)
            counts.add((eps, noise, red.num_kept))
    assert len({c for _, _, c in counts}) >= 3


# ---------------------------------------------------------------------------------------------------
# keys accepted with no effect


def test_no_effect_keys_leave_the_config_unchanged_and_warn_where_it_would_mislead():
    base = ref(token_pruning=True)
    warn = {
        "avoid_numerical_instability_DBDPC": False,
        "avoid_numerical_instability_prune": False,
        "do_not_upcast_to_full_precision_for_pruning": True,
    }
    for key in sorted(no_effect_keys()):
        for value in (True, False):
            if key == "do_not_consider_non_image_tokens_as_pruned" and value is False:
                with pytest.raises(ValueError, match="not implemented"):
                    ref(token_pruning=True, **{key: value})
                continue
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                assert ref(token_pruning=True, **{key: value}) == base
            expected = warn.get(key) is value
            assert [str(w.message) for w in caught if key in str(w.message)] != [] if expected else not caught


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_bundled_custom_configs_reproduce_the_reference_example(family):
    # custom_clustering.json: windows of 3 over the N visual tokens, merged at start + 1, the N mod 3
    # trailing tokens dropped; custom_combined.json: the top int(0.7 N) by the example score, then
    # windows of 2 over those candidates merged at start + 1 (pruned tokens dropped).
    _, st = run(pact.load_config("custom_clustering", layer=2), family)
    n = st.visual_before[0]
    rec = st.records[0][0]
    assert rec.kept.tolist() == list(range(1, 3 * (n // 3), 3))
    assert rec.sizes.tolist() == [3.0] * (n // 3) and int((rec.labels < 0).sum()) == n % 3
    _, st = run(pact.load_config("custom_combined", layer=2), family)
    rec = st.records[0][0]
    m = int(n * 0.7)
    candidates = top(rec.scores, m)
    assert rec.kept.tolist() == candidates[1 : 2 * (m // 2) : 2]
    assert rec.sizes.tolist() == [2.0] * (m // 2)
