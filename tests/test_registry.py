"""The method registry: names declared once, pairs resolved at build time, lists derived from it."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

import pact
from pact.methods import REGISTRY, base
from pact.methods.base import CLUSTERING, PRUNING, Signals, build_method, declare
from pact.methods.clustering import PruneThenCluster, PruneThenDbdpc
from pact.methods.custom_method import CustomReduction
from pact.methods.pact import Pact

# Every pair runnable before the registry (the import-time cross products), by class name.
PAIRS_BEFORE = {
    **{
        (p, c): "PruneThenCluster"
        for p in ("none", "euti", "fastv", "norm", "random", "custom")
        for c in ("kmeans", "dpc", "agglomerative", "dbscan")
    },
    **{(p, "custom"): "CustomReduction" for p in ("none", "euti", "fastv", "norm", "random", "custom")},
    ("none", "none"): "Identity",
    ("euti", "none"): "Pact",
    ("none", "dbdpc"): "Pact",
    ("euti", "dbdpc"): "Pact",
    ("fastv", "none"): "FastV",
    ("norm", "none"): "NormPruning",
    ("random", "none"): "RandomPruning",
    ("custom", "none"): "CustomPruning",
    ("withdraw", "none"): "VisualTokenWithdrawal",
    ("vispruner", "none"): "VisPruner",
    ("hired", "none"): "HiRED",
    ("none", "prumerge"): "PruMerge",
    ("none", "pooling"): "SpatialPooling",
    ("none", "tome"): "ToMe",
    # issue 14 (the 2025-26 method pack), each registered by its own method file
    ("divprune", "none"): "DivPrune",
    ("dart", "none"): "DART",
    ("v2drop", "none"): "V2Drop",
    ("pdrop", "none"): "PyramidDrop",
    # added with issue 14 (the 2025-26 method pack)
    ("evs", "none"): "EVS",
    ("none", "holitom"): "HoliTom",
}
# Whole methods added since (issue 14's method pack), each pinned by its tests/test_method_<name>.py.
PAIRS_BEFORE.update(
    {("visionzip", "none"): "VisionZip", ("cdpruner", "none"): "CDPruner", ("sparsevlm", "none"): "SparseVLM"}
)


def test_every_pair_resolves_to_the_same_class_as_before_and_dbdpc_now_composes():
    now = {pair: factory.__name__ for pair, factory in REGISTRY.items()}
    new = {(p, "dbdpc"): "PruneThenDbdpc" for p in ("fastv", "norm", "random", "custom")}
    assert now == {**PAIRS_BEFORE, **new}


def test_config_lists_are_derived_from_the_registry():
    from pact.config import CLUSTERING_METHODS, PRUNING_METHODS, SCORE_PRUNING_METHODS

    assert set(PRUNING_METHODS) == {"none"} | {p for p, _ in PAIRS_BEFORE}
    assert set(CLUSTERING_METHODS) == {"none"} | {c for _, c in PAIRS_BEFORE}
    assert SCORE_PRUNING_METHODS == ("euti", "fastv", "norm", "random", "custom")


def test_importing_the_config_does_not_import_torch():
    code = "import sys, pact.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_declare_refuses_bad_surfaces():
    with pytest.raises(ValueError, match="kind='scorer'; allowed: 'score pruner', 'clusterer'"):
        declare(PRUNING, "x", "scorer", "x")
    with pytest.raises(ValueError, match="a score pruner is a pruning with a score_fn"):
        declare(PRUNING, "x", "score pruner", "x")
    with pytest.raises(ValueError, match="a clusterer is a clustering with a composer"):
        declare(CLUSTERING, "x", "clusterer", "x")
    with pytest.raises(ValueError, match="axis='prune'"):
        declare("prune", "x", "whole method", "x")
    with pytest.raises(ValueError, match="pruning 'norm' declared twice with different surfaces"):
        declare(PRUNING, "norm", "whole method", "another norm")
    assert ("pruning", "x") not in base.SPECS


def test_a_whole_method_does_not_compose():
    # The config refuses these pairs already; build_method must too (it also serves raw objects).
    for pruning, clustering in [("withdraw", "kmeans"), ("vispruner", "dbdpc"), ("none", "nope")]:
        cfg = types.SimpleNamespace(pruning=pruning, clustering=clustering)
        with pytest.raises(ValueError, match=f"no reduction method for pruning='{pruning}' with clustering="):
            build_method(cfg)


def _signals(cfg, seed: int = 0, t: int = 40, n: int = 24, first: int = 5) -> Signals:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, 16, generator=g)
    q, k = torch.randn(t, 4, 8, generator=g), torch.randn(t, 2, 8, generator=g)
    qr, kr = torch.randn(t, 4, 8, generator=g), torch.randn(t, 2, 8, generator=g)
    mask = torch.zeros(t, dtype=torch.bool)
    mask[first : first + n] = True
    return Signals(
        layer=2,
        sample=0,
        hidden=hidden,
        visual_mask=mask,
        sizes=torch.ones(n),
        positions=torch.arange(t)[None],
        visual_index=torch.arange(n),
        config=cfg,
        qk_fn=lambda j, h, rope, want_q, want_k: (q, k, qr, kr),
        cos_sin_fn=lambda: (None, None),
        layer_input_fn=lambda j: None,
    )


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"retrieval": False},
        {"cutoff": 0.6},
        {"target_tokens": 6},
        {"keep_ratio": 0.3, "merge_mean": False},
    ],
)
def test_dbdpc_composer_with_euti_scores_is_pact(changes):
    """The composer any score pruner gets for DBDPC, fed EUTI's scores, reproduces PACT itself."""
    cfg = pact.load_config("pact", layer=2, **changes)
    for seed in range(3):
        s = _signals(cfg, seed)
        want = Pact(cfg).reduce(s)
        got = PruneThenDbdpc(cfg).reduce(_signals(cfg, seed))
        assert got.kept.tolist() == want.kept.tolist()
        assert got.labels.tolist() == want.labels.tolist()
        torch.testing.assert_close(got.sizes, want.sizes)
        torch.testing.assert_close(got.hidden, want.hidden)


def test_composed_pairs_pick_the_declared_functions():
    cfg = pact.load_config("fastv", clustering="kmeans")
    method = build_method(cfg)
    assert type(method) is PruneThenCluster
    assert method.pruner is base.spec(PRUNING, "fastv")
    assert method.cluster_fn is base.spec(CLUSTERING, "kmeans").cluster_fn
    assert method.input_layers(6) == []
    assert build_method(cfg.replace(fastv_variant="original")).input_layers(6) == [3]
    assert type(build_method(cfg.replace(clustering="custom"))) is CustomReduction
