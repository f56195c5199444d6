"""Tests of pact.config: defaults, JSON round trips, reference aliases and configs, errors."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pact
import pact.config as config_module
from pact.config import (
    CLUSTERING_METHODS,
    CONFIGS_DIR,
    PRUNING_METHODS,
    REFERENCE_KEYS,
    SCORE_PRUNING_METHODS,
    PactConfig,
    config_names,
    load_config,
)

REPO = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------------------------
# Expected values, written out by hand so that a changed default fails here.
# ------------------------------------------------------------------------------------------------

# PACT's own fields at the LLaVA-OneVision-7B point: the run-wide fields, EUTI's and DBDPC's. Every
# other method's defaults are pinned by its row in docs/CONFIGDOC.md
# (test_configdoc_states_every_default), so adding a method field does not touch this test.
PACT_DEFAULTS: dict[str, Any] = {
    "reduction": True,
    "layer": 4,
    "pruning": "euti",
    "clustering": "dbdpc",
    "progressive": False,
    "target_tokens": None,
    "target_ratio": None,
    "keep_ratio": 0.55,
    "pruning_selection": "ratio",
    "iqr_alpha": 0.5,
    "multiply_by_norm": True,
    "norm_order": 2.0,
    "euti_rope": False,
    "euti_support": "prefix",
    "euti_query": "prefix",
    "cutoff": 0.21,
    "density_bandwidth": 2.0,
    "density_kernel": "gaussian",
    "dbdpc_matrix_max_points": 8192,
    "retrieval": True,
    "retrieval_coef": 1.5,
    "merge_mean": True,
    "cluster_features": "keys_rope",
    "proportional_attention": True,
    "position_mode": "center",
    "sdpa_fast_path": True,
    "log_output_path": None,
}
# Every field's default, read before any test runs (the environment tests compare against it).
ALL_DEFAULTS: dict[str, Any] = PactConfig().to_dict()

# The reference loader's 52 keys and defaults (report section 3.2).
REFERENCE_DEFAULTS: dict[str, Any] = {
    "visual_token_reduction": False,
    "layer_for_reduction": 4,
    "progessive_reduction": False,
    "use_DBDPC": False,
    "cutoff": 0.0,
    "vector_to_use_in_distance_clustering": "current_k_cosine",
    "take_mean": True,
    "include_pruned_in_mean": True,
    "do_not_consider_non_image_tokens_as_pruned": True,
    "coef_pruned": 1.5,
    "avoid_numerical_instability_DBDPC": True,
    "withdraw_visual_tokens": False,
    "VTW_equivalant_layer_for_reduction": -1,
    "equivalent_reduc_percentage_vtw": 0.0,
    "use_tome": False,
    "perc_tokeep_tome_total": 1.0,
    "tome_equivalant_layer_for_reduction": 4,
    "use_kmeans": False,
    "perc_tokeep_kmeans": 1.0,
    "use_dpc": False,
    "percentage_to_keep_dpc": 1.0,
    "use_agglomerative": False,
    "percentage_to_keep_agglomerative": 1.0,
    "linkage": "single",
    "use_dbscan": False,
    "eps_dbscan": 0.1,
    "noise_as_clusters_dbscan": False,
    "token_pruning": False,
    "use_all_non_text_pruning": True,
    "prune_with_norm": False,
    "use_cosine_in_token_pruning": False,
    "use_attention_in_token_pruning": False,
    "use_mask_in_use_attention_in_token_pruning": False,
    "use_IQR_in_token_pruning": False,
    "alpha_IQR": 0.5,
    "pruning_filter_wth_percentage": True,
    "pruning_tokeep_percentage_value": 1.0,
    "multiply_by_norm": False,
    "norm_to_use": 2,
    "avoid_numerical_instability_prune": True,
    "no_proportional_attention": False,
    "change_position_ids": False,
    "get_mean_position_id": False,
    "synchro": False,
    "need_kq": True,
    "do_not_upcast_to_full_precision_for_pruning": False,
    "keep_casual": True,
    "get_performance_metrics": False,
    "get_reduction_ratio": False,
    "use_custom_merging": False,
    "use_custom_pruning": False,
    "log_output_path": "aggregated_metrics",
}

# What a reference-form config means where it is silent: the reference defaults, in our names.
REF_BASE: dict[str, Any] = {
    "reduction": False,
    "pruning": "none",
    "clustering": "none",
    "keep_ratio": 1.0,
    "multiply_by_norm": False,
    "fastv_causal": False,
    "cutoff": 0.0,
    "log_output_path": "aggregated_metrics",
}


def ref_expected(**changes: Any) -> PactConfig:
    return PactConfig(**{**REF_BASE, **changes})


# ------------------------------------------------------------------------------------------------
# Defaults and basic behaviour
# ------------------------------------------------------------------------------------------------


def test_defaults_are_the_pact_llava_onevision_point() -> None:
    defaults = PactConfig().to_dict()
    assert {key: defaults[key] for key in PACT_DEFAULTS} == PACT_DEFAULTS
    # declaration order is the JSON order (PACT's fields among them in this order)
    assert list(defaults) == [f.name for f in dataclasses.fields(PactConfig)]
    assert [key for key in defaults if key in PACT_DEFAULTS] == list(PACT_DEFAULTS)
    assert load_config() == PactConfig()
    assert load_config(None) == PactConfig()


def test_package_exports() -> None:
    assert pact.PactConfig is PactConfig
    assert pact.load_config is load_config


def test_values_are_normalised_and_typed() -> None:
    cfg = PactConfig(keep_ratio=1, cutoff=1, norm_order=3)
    assert type(cfg.keep_ratio) is float and cfg.keep_ratio == 1.0
    assert type(cfg.cutoff) is float and type(cfg.norm_order) is float
    for f in dataclasses.fields(PactConfig):
        value = getattr(PactConfig(), f.name)
        assert value is None or type(value) in (bool, int, float, str), f.name


def test_config_is_immutable_and_hashable() -> None:
    cfg = PactConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.layer = 2  # type: ignore[misc]
    assert hash(cfg) == hash(PactConfig())
    assert {cfg, PactConfig(), PactConfig(layer=2)} == {PactConfig(), PactConfig(layer=2)}


def test_replace_returns_validated_copy_and_accepts_aliases() -> None:
    cfg = PactConfig()
    new = cfg.replace(layer_for_reduction=2, cutoff=0.1)
    assert (new.layer, new.cutoff) == (2, 0.1)
    assert cfg.layer == 4  # original untouched
    assert cfg.replace(keep_ratio=0.8).keep_ratio == 0.8
    with pytest.raises(ValueError, match="keep_ratio"):
        cfg.replace(keep_ratio=2.0)


def test_describe_lists_non_default_values() -> None:
    assert "other values default" in PactConfig().describe()
    text = PactConfig(layer=2, keep_ratio=0.8, cutoff=0.1).describe()
    assert "layer=2" in text and "keep_ratio=0.8" in text and "cutoff=0.1" in text
    assert "retrieval" not in text and "density_bandwidth" not in text
    assert str(PactConfig(layer=2)) == PactConfig(layer=2).describe()
    assert "reduction off" in PactConfig(reduction=False).describe()


# ------------------------------------------------------------------------------------------------
# JSON round trips
# ------------------------------------------------------------------------------------------------

NON_DEFAULT = PactConfig(
    layer=7,
    pruning="fastv",
    clustering="kmeans",
    keep_ratio=0.3,
    target_ratio=0.7,
    euti_rope=True,
    fastv_variant="original",
    cluster_ratio=0.25,
    custom_reduction_fn=None,
    log_output_path="logs/x",
    density_kernel="exponential",
    iqr_alpha=-0.25,
)


@pytest.mark.parametrize("cfg", [PactConfig(), NON_DEFAULT, PactConfig(reduction=False)])
def test_dict_and_json_round_trip(cfg: PactConfig, tmp_path: Path) -> None:
    assert PactConfig.from_dict(cfg.to_dict()) == cfg
    text = cfg.to_json()
    assert json.loads(text) == cfg.to_dict()
    assert PactConfig.from_dict(json.loads(text)) == cfg
    path = tmp_path / "sub" / "cfg.json"
    assert cfg.to_json(path) == text
    assert path.read_text() == text
    assert load_config(path) == cfg
    assert load_config(str(path)) == cfg
    assert load_config(cfg) is cfg


@st.composite
def configs(draw: st.DrawFn) -> PactConfig:
    """Arbitrary valid configs (combinations repaired so that every draw is valid)."""
    unit = st.floats(0.0, 1.0)
    pos = st.floats(1e-6, 1e6, allow_nan=False, allow_infinity=False)
    pruning = draw(st.sampled_from(PRUNING_METHODS))
    clustering = "none" if pruning == "withdraw" else draw(st.sampled_from(CLUSTERING_METHODS))
    if clustering == "tome":
        pruning = "none"
    budget = draw(st.sampled_from(["none", "tokens", "ratio"]))
    selection = draw(st.sampled_from(["ratio", "iqr"])) if pruning in SCORE_PRUNING_METHODS else "ratio"
    if selection == "iqr":
        budget = "none"
    hook = st.none() | st.sampled_from(["my_pkg.mod:score", "m:f", "a.b.c:Cls.method"])
    layer = draw(st.integers(1, 80))
    # HoliTom's inner merge must come after its outer merge at `layer`.
    inner = draw(st.none() | st.integers(layer + 1, 120)) if clustering == "holitom" else 18
    return PactConfig(
        reduction=draw(st.booleans()),
        layer=layer,
        pruning=pruning,
        clustering=clustering,
        progressive=draw(st.booleans()),
        target_tokens=draw(st.integers(0, 10_000)) if budget == "tokens" else None,
        target_ratio=draw(unit) if budget == "ratio" else None,
        keep_ratio=draw(unit),
        pruning_selection=selection,
        iqr_alpha=draw(st.floats(-10, 10)),
        multiply_by_norm=draw(st.booleans()),
        norm_order=draw(pos),
        euti_support=draw(st.sampled_from(["prefix", "visual"])),
        fastv_variant=draw(st.sampled_from(["reference", "original"])),
        random_seed=draw(st.integers(0, 2**32)),
        vtw_equivalent_layer=draw(st.integers(-1, 80)),
        vtw_keep_ratio=draw(unit),
        cutoff=draw(pos),
        density_bandwidth=draw(pos),
        density_kernel=draw(st.sampled_from(["gaussian", "exponential"])),
        retrieval_coef=draw(pos),
        cluster_features=draw(st.sampled_from(["keys_rope", "keys", "queries", "queries_rope", "hidden"])),
        position_mode=draw(st.sampled_from(["center", "mean", "renumber"])),
        cluster_ratio=draw(st.floats(1e-9, 1.0)),
        linkage=draw(st.sampled_from(["single", "average", "complete"])),
        dbscan_eps=draw(pos),
        tome_keep_ratio=draw(unit),
        custom_pruning_fn=draw(hook) if pruning == "custom" else None,
        custom_reduction_fn=draw(hook) if clustering == "custom" else None,
        log_output_path=draw(st.none() | st.text(min_size=1, max_size=20)),
        holitom_inner_layer=inner,
    )


@settings(max_examples=150, deadline=None)
@given(configs())
def test_round_trip_property(cfg: PactConfig) -> None:
    assert PactConfig.from_dict(cfg.to_dict()) == cfg
    assert PactConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert load_config(cfg.to_dict()) == cfg
    assert cfg.replace() == cfg


# ------------------------------------------------------------------------------------------------
# Bundled configs and name resolution
# ------------------------------------------------------------------------------------------------


def test_bundled_pact_json_is_the_default() -> None:
    assert load_config("configs/pact.json") == PactConfig()
    assert load_config(REPO / "configs" / "pact.json") == PactConfig()
    assert load_config("pact") == PactConfig()
    assert load_config("pact.json") == PactConfig()


def test_bundled_no_reduction() -> None:
    cfg = load_config("no_reduction")
    assert cfg == PactConfig(reduction=False)
    assert json.loads((REPO / "configs" / "no_reduction.json").read_text()) == {"reduction": False}


def test_names_resolve_from_any_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert CONFIGS_DIR.resolve() == (REPO / "configs").resolve()
    assert load_config("pact") == PactConfig()
    assert load_config("configs/pact.json") == PactConfig()
    assert {"pact", "no_reduction"} <= set(config_names())
    # A file in the working directory wins over the repo's.
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "pact.json").write_text('{"layer": 9}')
    assert load_config("configs/pact.json").layer == 9


def test_missing_config_file_names_what_was_tried(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no_such_method") as info:
        load_config("no_such_method")
    assert "pact" in str(info.value)  # lists the bundled names
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "absent.json")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.json")), ids=lambda p: p.name)
def test_every_bundled_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert load_config(path.stem) == cfg
    assert PactConfig.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------------------------------------
# Reference aliases
# ------------------------------------------------------------------------------------------------

# (reference key, reference value, our field, our value); each applied on top of the PACT defaults.
SIMPLE_ALIASES = [
    ("visual_token_reduction", False, "reduction", False),
    ("layer_for_reduction", 2, "layer", 2),
    ("progessive_reduction", True, "progressive", True),
    ("pruning_tokeep_percentage_value", 0.8, "keep_ratio", 0.8),
    ("alpha_IQR", 0.75, "iqr_alpha", 0.75),
    ("norm_to_use", 1, "norm_order", 1.0),
    ("use_cosine_in_token_pruning", True, "euti_rope", True),
    ("use_mask_in_use_attention_in_token_pruning", False, "fastv_causal", False),
    ("VTW_equivalant_layer_for_reduction", 4, "vtw_equivalent_layer", 4),
    ("equivalent_reduc_percentage_vtw", 0.353, "vtw_keep_ratio", 0.353),
    ("include_pruned_in_mean", False, "retrieval", False),
    ("coef_pruned", 2.0, "retrieval_coef", 2.0),
    ("take_mean", False, "merge_mean", False),
    ("eps_dbscan", 0.7, "dbscan_eps", 0.7),
    ("noise_as_clusters_dbscan", True, "dbscan_noise_as_clusters", True),
    ("perc_tokeep_tome_total", 0.353, "tome_keep_ratio", 0.353),
    ("tome_equivalant_layer_for_reduction", 6, "tome_equivalent_layer", 6),
    ("cutoff", 0.1, "cutoff", 0.1),
    ("multiply_by_norm", False, "multiply_by_norm", False),
    ("linkage", "average", "linkage", "average"),
    ("log_output_path", "logs/run", "log_output_path", "logs/run"),
    # inverted
    ("no_proportional_attention", True, "proportional_attention", False),
    ("no_proportional_attention", False, "proportional_attention", True),
    # value mappings
    ("use_all_non_text_pruning", True, "euti_support", "prefix"),
    ("use_all_non_text_pruning", False, "euti_support", "visual"),
    ("vector_to_use_in_distance_clustering", "current_k_cosine", "cluster_features", "keys_rope"),
    ("vector_to_use_in_distance_clustering", "current_k", "cluster_features", "keys"),
    ("vector_to_use_in_distance_clustering", "current_q", "cluster_features", "queries"),
    ("vector_to_use_in_distance_clustering", "current_q_cosine", "cluster_features", "queries_rope"),
    # flag groups
    ("use_IQR_in_token_pruning", True, "pruning_selection", "iqr"),
    ("pruning_filter_wth_percentage", True, "pruning_selection", "ratio"),
    ("get_mean_position_id", True, "position_mode", "mean"),
    ("get_mean_position_id", False, "position_mode", "center"),
    ("change_position_ids", True, "position_mode", "renumber"),
    ("change_position_ids", False, "position_mode", "center"),
    # one cluster_ratio for three per-method reference fractions
    ("perc_tokeep_kmeans", 0.4, "cluster_ratio", 0.4),
    ("percentage_to_keep_dpc", 0.4, "cluster_ratio", 0.4),
    ("percentage_to_keep_agglomerative", 0.4, "cluster_ratio", 0.4),
]
# (reference flag set true, pruning, clustering); applied on top of a reference-form base.
METHOD_FLAGS = [
    ({"token_pruning": True}, "euti", "none"),
    ({"token_pruning": True, "use_attention_in_token_pruning": True}, "fastv", "none"),
    ({"token_pruning": True, "use_custom_pruning": True}, "custom", "none"),
    (
        {"token_pruning": True, "use_custom_pruning": True, "use_attention_in_token_pruning": True},
        "custom",
        "none",
    ),
    ({"prune_with_norm": True}, "norm", "none"),
    ({"withdraw_visual_tokens": True}, "withdraw", "none"),
    ({"use_custom_pruning": True}, "none", "none"),  # the reference needs token_pruning as well
    ({"use_attention_in_token_pruning": True}, "none", "none"),
    ({"use_DBDPC": True}, "none", "dbdpc"),
    ({"use_custom_merging": True}, "none", "custom"),
    ({"use_tome": True}, "none", "tome"),
    ({"use_kmeans": True}, "none", "kmeans"),
    ({"use_dpc": True}, "none", "dpc"),
    ({"use_dbscan": True}, "none", "dbscan"),
    ({"use_agglomerative": True}, "none", "agglomerative"),
    ({"token_pruning": True, "use_DBDPC": True}, "euti", "dbdpc"),
]
IGNORED = [
    "synchro",
    "get_performance_metrics",
    "get_reduction_ratio",
    "keep_casual",
    "avoid_numerical_instability_DBDPC",
    "avoid_numerical_instability_prune",
    "need_kq",
    "do_not_upcast_to_full_precision_for_pruning",
    "do_not_consider_non_image_tokens_as_pruned",
]


def test_every_reference_key_is_accepted_and_tested() -> None:
    assert set(REFERENCE_DEFAULTS) == REFERENCE_KEYS
    assert len(REFERENCE_KEYS) == 52
    covered = (
        {a[0] for a in SIMPLE_ALIASES} | {k for flags, _, _ in METHOD_FLAGS for k in flags} | set(IGNORED)
    )
    assert covered == REFERENCE_KEYS


@pytest.mark.parametrize(("ref_key", "ref_value", "field", "value"), SIMPLE_ALIASES)
def test_alias_as_override(ref_key: str, ref_value: Any, field: str, value: Any) -> None:
    cfg = load_config(**{ref_key: ref_value})
    assert getattr(cfg, field) == value
    assert type(getattr(cfg, field)) is type(value)
    # Equivalent to giving our name; and the same value under both names is not a conflict.
    assert cfg == load_config(**{field: value})
    if ref_key != field:
        assert load_config(**{field: value, ref_key: ref_value}) == cfg


@pytest.mark.parametrize(("ref_key", "ref_value", "field", "value"), SIMPLE_ALIASES)
def test_alias_in_reference_form_dict(ref_key: str, ref_value: Any, field: str, value: Any) -> None:
    data = {"visual_token_reduction": True, ref_key: ref_value}
    if field == "reduction":
        data = {ref_key: ref_value}
    if field == "pruning_selection":
        data["token_pruning"] = True  # IQR needs a score-based pruning
    assert getattr(load_config(data), field) == value


@pytest.mark.parametrize(("flags", "pruning", "clustering"), METHOD_FLAGS)
def test_method_flags(flags: dict[str, bool], pruning: str, clustering: str) -> None:
    data = {"visual_token_reduction": True, "cutoff": 0.2, **flags}
    cfg = load_config(data)
    assert (cfg.pruning, cfg.clustering) == (pruning, clustering)
    if clustering == "tome":  # the reference loader's derived rule
        assert cfg.progressive is True and cfg.layer == 0
    else:
        assert cfg.progressive is False and cfg.layer == 4


# Values that ask for a computation we do not reproduce: accepted with a warning naming the key.
WARNED = {
    ("avoid_numerical_instability_DBDPC", False),
    ("avoid_numerical_instability_prune", False),
    ("do_not_upcast_to_full_precision_for_pruning", True),
}


def _load_checking_warning(key: str, value: bool, *args: Any, **kwargs: Any) -> Any:
    if (key, value) not in WARNED:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return load_config(*args, **kwargs)
    with pytest.warns(UserWarning, match=f"'{key}'={str(value).lower()} has no effect"):
        return load_config(*args, **kwargs)


@pytest.mark.parametrize("key", IGNORED)
def test_ignored_reference_keys_have_no_effect(key: str) -> None:
    base = load_config({"visual_token_reduction": True})
    assert _load_checking_warning(key, True, {"visual_token_reduction": True, key: True}) == base
    if key != "do_not_consider_non_image_tokens_as_pruned":
        assert _load_checking_warning(key, False, {"visual_token_reduction": True, key: False}) == base
    assert _load_checking_warning(key, True, **{key: True}) == PactConfig()
    with pytest.raises(ValueError, match=key):
        load_config(**{key: "yes"})


def test_reference_default_dict_is_reference_defaults_in_our_names() -> None:
    assert load_config(REFERENCE_DEFAULTS) == ref_expected()
    # Any reference-only key makes the omitted ones take the reference defaults.
    assert load_config({"synchro": False}) == ref_expected()
    # Our-name dicts take our defaults (shared names such as cutoff do not switch the form).
    assert load_config({"cutoff": 0.3}) == PactConfig(cutoff=0.3)


def test_full_reference_dump_with_several_cluster_fractions_uses_the_active_one() -> None:
    data = {
        **REFERENCE_DEFAULTS,
        "visual_token_reduction": True,
        "use_kmeans": True,
        "perc_tokeep_kmeans": 0.5,
    }
    cfg = load_config(data)
    assert (cfg.clustering, cfg.cluster_ratio) == ("kmeans", 0.5)
    data = {"visual_token_reduction": True, "perc_tokeep_kmeans": 0.5, "percentage_to_keep_dpc": 0.4}
    with pytest.raises(ValueError, match=r"perc_tokeep_kmeans.*percentage_to_keep_dpc"):
        load_config(data)  # no active method among them: ambiguous


# ------------------------------------------------------------------------------------------------
# The reference's own configs (report section 3.1), rebuilt with the reference key names
# ------------------------------------------------------------------------------------------------

COMMON = {
    "visual_token_reduction": True,
    "keep_casual": True,
    "get_performance_metrics": False,
    "get_reduction_ratio": True,
}
REF_PACT = {
    **COMMON,
    "layer_for_reduction": 4,
    "use_DBDPC": True,
    "cutoff": 0.21,
    "vector_to_use_in_distance_clustering": "current_k_cosine",
    "take_mean": True,
    "include_pruned_in_mean": True,
    "coef_pruned": 1.5,
    "token_pruning": True,
    "use_cosine_in_token_pruning": False,
    "use_attention_in_token_pruning": False,
    "use_mask_in_use_attention_in_token_pruning": False,
    "pruning_filter_wth_percentage": True,
    "pruning_tokeep_percentage_value": 0.55,
    "multiply_by_norm": True,
    "norm_to_use": 2,
    "synchro": False,
    "log_output_path": "agg_pact_logs",
}
REFERENCE_CONFIGS: dict[str, tuple[dict[str, Any], PactConfig]] = {
    "pact.json": (REF_PACT, PactConfig(fastv_causal=False, log_output_path="agg_pact_logs")),
    "dbdpc.json": (
        {
            **COMMON,
            "layer_for_reduction": 4,
            "use_DBDPC": True,
            "cutoff": 0.21,
            "vector_to_use_in_distance_clustering": "current_k_cosine",
            "take_mean": True,
            "include_pruned_in_mean": False,
        },
        ref_expected(reduction=True, clustering="dbdpc", cutoff=0.21, retrieval=False),
    ),
    "euti.json": (
        {
            **COMMON,
            "layer_for_reduction": 4,
            "token_pruning": True,
            "use_cosine_in_token_pruning": False,
            "use_attention_in_token_pruning": False,
            "pruning_filter_wth_percentage": True,
            "pruning_tokeep_percentage_value": 0.5,
            "multiply_by_norm": True,
            "norm_to_use": 2,
        },
        ref_expected(reduction=True, pruning="euti", keep_ratio=0.5, multiply_by_norm=True),
    ),
    "fastv.json": (
        {
            **COMMON,
            "layer_for_reduction": 4,
            "token_pruning": True,
            "use_cosine_in_token_pruning": True,
            "use_attention_in_token_pruning": True,
            "use_mask_in_use_attention_in_token_pruning": True,
            "pruning_filter_wth_percentage": True,
            "pruning_tokeep_percentage_value": 0.5,
            "multiply_by_norm": False,
        },
        ref_expected(reduction=True, pruning="fastv", euti_rope=True, fastv_causal=True, keep_ratio=0.5),
    ),
    "vtw.json": (
        {
            **COMMON,
            "need_kq": False,
            "layer_for_reduction": 0,
            "VTW_equivalant_layer_for_reduction": 4,
            "withdraw_visual_tokens": True,
            "equivalent_reduc_percentage_vtw": 0.5,
        },
        ref_expected(reduction=True, pruning="withdraw", layer=0, vtw_equivalent_layer=4, vtw_keep_ratio=0.5),
    ),
    "tome.json": (
        {
            **COMMON,
            "layer_for_reduction": 0,
            "tome_equivalant_layer_for_reduction": 4,
            "use_tome": True,
            "perc_tokeep_tome_total": 0.0,
            "synchro": True,
        },
        ref_expected(
            reduction=True,
            clustering="tome",
            progressive=True,
            layer=0,
            tome_equivalent_layer=4,
            tome_keep_ratio=0.0,
        ),
    ),
    "kmeans.json": (
        {**COMMON, "layer_for_reduction": 4, "use_kmeans": True, "perc_tokeep_kmeans": 0.5, "synchro": True},
        ref_expected(reduction=True, clustering="kmeans", cluster_ratio=0.5),
    ),
    "dbscan.json": (
        {
            **COMMON,
            "layer_for_reduction": 4,
            "use_dbscan": True,
            "noise_as_clusters_dbscan": True,
            "eps_dbscan": 0.1,
            "synchro": True,
        },
        ref_expected(reduction=True, clustering="dbscan", dbscan_noise_as_clusters=True, dbscan_eps=0.1),
    ),
    "custom_clustering.json": (
        {**COMMON, "layer_for_reduction": 4, "cutoff": 0.21, "use_custom_merging": True},
        ref_expected(reduction=True, clustering="custom", cutoff=0.21),
    ),
    "custom_pruning.json": (
        {
            **COMMON,
            "layer_for_reduction": 4,
            "token_pruning": True,
            "use_cosine_in_token_pruning": True,
            "use_custom_pruning": True,
            "pruning_tokeep_percentage_value": 0.5,
            "multiply_by_norm": True,
        },
        ref_expected(reduction=True, pruning="custom", euti_rope=True, keep_ratio=0.5, multiply_by_norm=True),
    ),
    "custom_combined.json": (
        {
            **COMMON,
            "layer_for_reduction": 4,
            "token_pruning": True,
            "use_custom_pruning": True,
            "pruning_tokeep_percentage_value": 0.5,
            "use_custom_merging": True,
            "cutoff": 0.21,
        },
        ref_expected(reduction=True, pruning="custom", clustering="custom", keep_ratio=0.5, cutoff=0.21),
    ),
    "no_reduction.json": ({"visual_token_reduction": False}, ref_expected()),
}
# DPC and agglomerative ship a 0.0 placeholder that the scripts replace through the environment.
PLACEHOLDER_CONFIGS: dict[str, tuple[dict[str, Any], str, str]] = {
    "dpc.json": (
        {**COMMON, "layer_for_reduction": 4, "use_dpc": True, "percentage_to_keep_dpc": 0.0},
        "percentage_to_keep_dpc",
        "dpc",
    ),
    "agglomerative.json": (
        {
            **COMMON,
            "layer_for_reduction": 4,
            "use_agglomerative": True,
            "percentage_to_keep_agglomerative": 0.0,
            "linkage": "single",
        },
        "percentage_to_keep_agglomerative",
        "agglomerative",
    ),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_CONFIGS))
def test_reference_config_loads(name: str, tmp_path: Path) -> None:
    data, expected = REFERENCE_CONFIGS[name]
    assert load_config(data) == expected
    # The same through a file, as a user carrying the reference's JSON over would do.
    path = tmp_path / name
    path.write_text(json.dumps(data))
    assert load_config(path) == expected


def test_reference_pact_config_is_our_default_pact() -> None:
    cfg = load_config(REF_PACT)
    differing = {k for k, v in cfg.to_dict().items() if v != ALL_DEFAULTS[k]}
    assert differing == {"fastv_causal", "log_output_path"}  # FastV-only flag, and the log folder


def test_reference_script_overrides() -> None:
    # scripts/pact_qwenvl2.0_7b.sh exported cutoff=0.1 and pruning_tokeep_percentage_value=0.8.
    cfg = load_config(REF_PACT, cutoff=0.1, pruning_tokeep_percentage_value=0.8)
    assert (cfg.cutoff, cfg.keep_ratio, cfg.pruning, cfg.clustering) == (0.1, 0.8, "euti", "dbdpc")


@pytest.mark.parametrize("name", sorted(PLACEHOLDER_CONFIGS))
def test_reference_placeholder_configs(name: str) -> None:
    data, key, method = PLACEHOLDER_CONFIGS[name]
    with pytest.raises(
        ValueError, match=rf"'{key}' \(our name: cluster_ratio\) must be a number in \(0, 1\]"
    ):
        load_config(data)
    cfg = load_config(data, **{key: 0.4})  # the value the reference's comparison script exported
    assert (cfg.clustering, cfg.cluster_ratio, cfg.pruning) == (method, 0.4, "none")
    assert cfg.linkage == "single"


# ------------------------------------------------------------------------------------------------
# Overrides
# ------------------------------------------------------------------------------------------------


def test_overrides_win_over_file_values(tmp_path: Path) -> None:
    assert load_config("configs/pact.json", layer_for_reduction=2).layer == 2
    assert load_config("pact", layer=2) == PactConfig(layer=2)
    path = tmp_path / "c.json"
    path.write_text(
        json.dumps({"layer_for_reduction": 6, "visual_token_reduction": True, "token_pruning": True})
    )
    cfg = load_config(path, layer=3, pruning_tokeep_percentage_value=0.7)
    assert (cfg.layer, cfg.keep_ratio, cfg.pruning) == (3, 0.7, "euti")


def test_overrides_are_merged_before_validation(tmp_path: Path) -> None:
    # The reference's dpc.json holds a 0.0 placeholder that its scripts replaced: the file alone is
    # refused, the file plus an override is fine (overrides win, then one validation).
    data, key, _ = PLACEHOLDER_CONFIGS["dpc.json"]
    path = tmp_path / "dpc.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_config(path)
    assert load_config(path, cluster_ratio=0.4).cluster_ratio == 0.4  # our name replaces the alias
    assert load_config(path, **{key: 0.4}).cluster_ratio == 0.4


def test_override_flags_combine_with_file_flags() -> None:
    base = {"visual_token_reduction": True, "token_pruning": True}
    assert load_config(base).pruning == "euti"
    assert load_config(base, use_attention_in_token_pruning=True).pruning == "fastv"
    assert load_config(base, pruning="norm").pruning == "norm"  # our name replaces the file's flags
    assert load_config({"pruning": "fastv"}, token_pruning=True).pruning == "euti"  # flags replace it


def test_use_tome_forced_values_and_overrides() -> None:
    tome = REFERENCE_CONFIGS["tome.json"][0]
    assert load_config(tome, layer_for_reduction=3).layer == 3  # an override wins over use_tome
    assert load_config(tome, progressive=False).progressive is False
    cfg = load_config({"pruning": "none", "layer": 5}, use_tome=True)  # an override use_tome wins
    assert (cfg.clustering, cfg.layer, cfg.progressive) == ("tome", 0, True)


def test_overrides_do_not_switch_a_base_to_reference_defaults() -> None:
    # A reference-only key in the overrides only sets its own field.
    cfg = load_config("pact", take_mean=False)
    assert cfg == PactConfig(merge_mean=False)


def test_method_flag_overrides_act_on_the_base_method() -> None:
    assert load_config(use_DBDPC=False) == PactConfig(clustering="none")
    assert load_config(use_attention_in_token_pruning=True).pruning == "fastv"
    assert load_config(prune_with_norm=True).pruning == "norm"  # switches token_pruning off
    assert load_config(token_pruning=False).pruning == "none"
    cfg = load_config(token_pruning=False, use_tome=True)
    assert (cfg.pruning, cfg.clustering, cfg.progressive, cfg.layer) == ("none", "tome", True, 0)
    assert (
        load_config(PactConfig(position_mode="renumber"), get_mean_position_id=False).position_mode
        == "renumber"
    )
    iqr = PactConfig(pruning_selection="iqr")
    assert load_config(iqr, pruning_filter_wth_percentage=False).pruning_selection == "iqr"
    with pytest.raises(ValueError, match="exactly one must be true"):
        load_config(iqr, use_IQR_in_token_pruning=False)  # leaves no selection rule, as in the reference


def test_two_names_in_overrides_must_agree() -> None:
    with pytest.raises(ValueError, match=r"'layer'.*'layer_for_reduction'") as info:
        load_config(layer=2, layer_for_reduction=3)
    assert "disagree" in str(info.value)
    assert load_config(layer=2, layer_for_reduction=2).layer == 2


# ------------------------------------------------------------------------------------------------
# Errors: each class, with the key and the allowed values in the message
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "needles"),
    [
        ({"cutof": 0.2}, ["unknown config key 'cutof'", "'cutoff'"]),
        ({"use_dbdpc": True}, ["unknown config key 'use_dbdpc'", "'use_DBDPC'"]),
        ({"progressive_reduction": True}, ["'progessive_reduction'", "'progressive'"]),
        ({"kep_ratio": 0.2}, ["'keep_ratio'"]),
        ({"zzzzzz": 1}, ["unknown config key 'zzzzzz'", "CONFIGDOC"]),
    ],
)
def test_unknown_keys_suggest_close_names(changes: dict[str, Any], needles: list[str]) -> None:
    for attempt in (
        lambda: load_config(**changes),
        lambda: load_config(changes),
        lambda: PactConfig().replace(**changes),
    ):
        with pytest.raises(ValueError) as info:
            attempt()
        for needle in needles:
            assert needle in str(info.value)


def test_unknown_field_in_constructor_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        PactConfig(cutof=0.2)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("changes", "needles"),
    [
        ({"reduction": "true"}, ["'reduction'", "boolean", "str 'true'"]),
        ({"retrieval": 1}, ["'retrieval'", "boolean", "int 1"]),
        ({"merge_mean": 0}, ["'merge_mean'", "boolean"]),
        ({"layer": 4.0}, ["'layer'", "integer", "float 4.0", ">= 0"]),
        ({"layer": "4"}, ["'layer'", "integer", "str '4'"]),
        ({"layer": True}, ["'layer'", "integer", "bool True"]),
        ({"kmeans_iters": 1.5}, ["'kmeans_iters'", "integer", ">= 1"]),
        ({"cutoff": "0.2"}, ["'cutoff'", "number", "str '0.2'"]),
        ({"keep_ratio": False}, ["'keep_ratio'", "number", "[0, 1]"]),
        ({"keep_ratio": None}, ["'keep_ratio'", "must not be null", "[0, 1]"]),
        ({"pruning": 3}, ["'pruning'", "string", "'euti'"]),
        ({"cutoff": float("nan")}, ["'cutoff'", "finite"]),
        ({"cutoff": float("inf")}, ["'cutoff'", "finite"]),
        ({"take_mean": "yes"}, ["'take_mean'", "boolean"]),
        ({"layer_for_reduction": 2.0}, ["'layer_for_reduction' (our name: layer)", "integer"]),
        ({"no_proportional_attention": 1}, ["'no_proportional_attention'", "boolean"]),
        ({"token_pruning": "true"}, ["'token_pruning'", "boolean"]),
    ],
)
def test_wrong_types(changes: dict[str, Any], needles: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        load_config(**changes)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("changes", "needles"),
    [
        ({"keep_ratio": 1.5}, ["'keep_ratio'", "[0, 1]", "1.5"]),
        ({"keep_ratio": -0.1}, ["'keep_ratio'", "[0, 1]"]),
        ({"layer": -1}, ["'layer'", ">= 0"]),
        ({"cutoff": -0.1}, ["'cutoff'", ">= 0"]),
        ({"density_bandwidth": 0}, ["'density_bandwidth'", "> 0"]),
        ({"retrieval_coef": 0.0}, ["'retrieval_coef'", "> 0"]),
        ({"norm_order": -2}, ["'norm_order'", "> 0"]),
        ({"cluster_ratio": 0.0}, ["'cluster_ratio'", "(0, 1]"]),
        ({"cluster_ratio": 1.01}, ["'cluster_ratio'", "(0, 1]"]),
        ({"target_ratio": 2.0}, ["'target_ratio'", "[0, 1] or null"]),
        ({"target_tokens": -5}, ["'target_tokens'", ">= 0 or null"]),
        ({"vtw_equivalent_layer": -2}, ["'vtw_equivalent_layer'", ">= -1"]),
        ({"dbscan_min_samples": 0}, ["'dbscan_min_samples'", ">= 1"]),
        ({"pooling_stride": 0}, ["'pooling_stride'", ">= 1"]),
        ({"random_seed": -1}, ["'random_seed'", ">= 0"]),
        (
            {"pruning_tokeep_percentage_value": 1.2},
            ["'pruning_tokeep_percentage_value' (our name: keep_ratio)", "[0, 1]"],
        ),
        ({"coef_pruned": -1.0}, ["'coef_pruned' (our name: retrieval_coef)", "> 0"]),
    ],
)
def test_out_of_range(changes: dict[str, Any], needles: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        load_config(**changes)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("changes", "needles"),
    [
        (
            {"pruning": "eutii"},
            ["'pruning'", "'none'", "'euti'", "'fastv'", "'custom'", "did you mean 'euti'"],
        ),
        ({"clustering": "DBDPC"}, ["'clustering'", "'agglomerative'", "'pooling'", "did you mean 'dbdpc'"]),
        ({"cluster_features": "key"}, ["'cluster_features'", "'keys_rope'", "'hidden'"]),
        ({"position_mode": "first"}, ["'position_mode'", "'center', 'mean', 'renumber'"]),
        ({"linkage": "ward"}, ["'linkage'", "'single', 'average', 'complete'"]),
        ({"density_kernel": "laplace"}, ["'density_kernel'", "'gaussian', 'exponential'"]),
        ({"euti_support": "all"}, ["'euti_support'", "'prefix', 'visual'"]),
        ({"euti_query": "last"}, ["'euti_query'", "'prefix', 'visual'"]),
        ({"fastv_variant": "v2"}, ["'fastv_variant'", "'reference', 'original'"]),
        ({"pruning_selection": "top"}, ["'pruning_selection'", "'ratio', 'iqr'"]),
        (
            {"vector_to_use_in_distance_clustering": "keys_rope"},
            ["'vector_to_use_in_distance_clustering' (our name: cluster_features)", "'current_k_cosine'"],
        ),
        (
            {"pruning": "custom", "custom_pruning_fn": "not a path"},
            ["'custom_pruning_fn'", "package.module:function"],
        ),
        ({"custom_reduction_fn": "mod.fn"}, ["'custom_reduction_fn'", "package.module:function"]),
        ({"log_output_path": ""}, ["'log_output_path'", "non-empty"]),
    ],
)
def test_invalid_choices(changes: dict[str, Any], needles: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        load_config(**changes)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("changes", "needles"),
    [
        ({"target_tokens": 64, "target_ratio": 0.5}, ["target_tokens", "target_ratio", "exclusive"]),
        ({"pruning": "withdraw"}, ["pruning='withdraw'", "clustering must be 'none'", "'dbdpc'"]),
        ({"clustering": "tome"}, ["clustering='tome'", "pruning='none'", "'euti'"]),
        (
            {"pruning": "none", "pruning_selection": "iqr"},
            ["pruning_selection='iqr'", "'euti', 'fastv', 'norm'"],
        ),
        ({"pruning": "vispruner", "pruning_selection": "iqr"}, ["pruning_selection='iqr'", "'vispruner'"]),
        ({"pruning_selection": "iqr", "target_tokens": 10}, ["pruning_selection='iqr'", "target_tokens"]),
        ({"cutoff": 0.0}, ["clustering='dbdpc'", "cutoff > 0", "0.21"]),
        (
            {"pruning": "fastv", "fastv_variant": "original", "layer": 0},
            ["fastv_variant='original'", "layer"],
        ),
        ({"custom_pruning_fn": "pkg.mod:fn"}, ["custom_pruning_fn", "pruning='custom'"]),
        ({"custom_reduction_fn": "pkg.mod:fn"}, ["custom_reduction_fn", "clustering='custom'"]),
        ({"prumerge_sampling": "lattice"}, ["prumerge_sampling='lattice'", "prumerge_plus=true"]),
    ],
)
def test_incompatible_options(changes: dict[str, Any], needles: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        load_config(**changes)
    assert "incompatible" in str(info.value)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_several_incompatibilities_are_all_reported() -> None:
    with pytest.raises(ValueError) as info:
        PactConfig(target_tokens=1, target_ratio=0.5, pruning="withdraw")
    assert "target_ratio" in str(info.value) and "withdraw" in str(info.value)


def test_allowed_combinations() -> None:
    # Harmless combinations are allowed on purpose.
    assert load_config(pruning="none").retrieval is True  # retrieval without pruning does nothing
    assert load_config(clustering="kmeans").retrieval is True  # nor without dbdpc
    assert load_config(position_mode="mean").position_mode == "mean"
    assert load_config(position_mode="renumber").position_mode == "renumber"
    assert load_config(clustering="custom", cutoff=0).cutoff == 0.0  # custom hooks get cutoff as is
    assert load_config(clustering="custom", cutoff=3).cutoff == 3.0  # e.g. a window size
    assert load_config(pruning="custom", custom_pruning_fn="my.mod:score").custom_pruning_fn == "my.mod:score"
    for method in SCORE_PRUNING_METHODS:
        assert load_config(pruning=method, pruning_selection="iqr").pruning_selection == "iqr"
    assert load_config(target_tokens=64).target_tokens == 64
    assert load_config(target_ratio=0.7).target_ratio == 0.7


@pytest.mark.parametrize(
    ("data", "needles"),
    [
        ({"layer": 2, "layer_for_reduction": 3}, ["'layer'", "'layer_for_reduction'", "disagree"]),
        (
            {"keep_ratio": 0.5, "pruning_tokeep_percentage_value": 0.6},
            ["'keep_ratio'", "'pruning_tokeep_percentage_value'"],
        ),
        (
            {"proportional_attention": True, "no_proportional_attention": True},
            ["'proportional_attention'", "'no_proportional_attention'"],
        ),
        (
            {"cluster_features": "keys", "vector_to_use_in_distance_clustering": "current_q"},
            ["'cluster_features'", "'vector_to_use_in_distance_clustering'"],
        ),
        (
            {"position_mode": "mean", "change_position_ids": True},
            ["'position_mode'", "'change_position_ids'"],
        ),
        (
            {"pruning_selection": "ratio", "use_IQR_in_token_pruning": True},
            ["'pruning_selection'", "'use_IQR_in_token_pruning'"],
        ),
        ({"target_tokens": 10, "visual_token_num": 20}, ["'target_tokens'", "'visual_token_num'"]),
        ({"pruning": "fastv", "token_pruning": True}, ["'pruning'='fastv'", "token_pruning=true", "'euti'"]),
        (
            {"clustering": "kmeans", "use_DBDPC": True, "cutoff": 0.2},
            ["'clustering'='kmeans'", "use_DBDPC=true"],
        ),
        ({"use_DBDPC": True, "use_kmeans": True}, ["use_DBDPC", "use_kmeans", "at most one"]),
        (
            {"token_pruning": True, "prune_with_norm": True},
            ["prune_with_norm", "token_pruning", "at most one"],
        ),
        (
            {"get_mean_position_id": True, "change_position_ids": True},
            ["get_mean_position_id", "change_position_ids"],
        ),
        (
            {"pruning_filter_wth_percentage": True, "use_IQR_in_token_pruning": True},
            ["pruning_filter_wth_percentage", "use_IQR_in_token_pruning"],
        ),
        (
            {"pruning_filter_wth_percentage": False, "use_IQR_in_token_pruning": False},
            ["exactly one must be true"],
        ),
        (
            {"use_tome": True, "layer_for_reduction": 4},
            ["use_tome", "'layer_for_reduction'", "clustering='tome'"],
        ),
        ({"use_tome": True, "progessive_reduction": False}, ["use_tome", "'progessive_reduction'"]),
        (
            {"do_not_consider_non_image_tokens_as_pruned": False},
            ["do_not_consider_non_image_tokens_as_pruned", "not implemented"],
        ),
    ],
)
def test_conflicting_names_and_flags(data: dict[str, Any], needles: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        load_config(data)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_explicit_method_with_reference_flags_of_the_other_group() -> None:
    # No pruning flag given: our explicit pruning stands next to a reference clustering flag.
    cfg = load_config({"pruning": "random", "use_DBDPC": True, "cutoff": 0.2, "visual_token_reduction": True})
    assert (cfg.pruning, cfg.clustering) == ("random", "dbdpc")
    # Flags that agree with the explicit value are fine.
    assert load_config({"pruning": "euti", "token_pruning": True}).pruning == "euti"


def test_reference_dbdpc_needs_a_cutoff() -> None:
    with pytest.raises(ValueError, match="cutoff > 0"):
        load_config({"visual_token_reduction": True, "use_DBDPC": True})  # reference default cutoff 0.0


def test_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"layer": 4,}')
    with pytest.raises(ValueError, match="invalid JSON") as info:
        load_config(bad)
    assert str(bad) in str(info.value)
    dup = tmp_path / "dup.json"
    dup.write_text('{"layer": 4, "layer": 5}')
    with pytest.raises(ValueError, match=r"duplicate key.*'layer'"):
        load_config(dup)
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_config(arr)
    typo = tmp_path / "typo.json"
    typo.write_text('{"cutof": 0.2}')
    with pytest.raises(ValueError, match=re.escape(str(typo)) + ".*'cutoff'"):
        load_config(typo)
    with pytest.raises(TypeError, match="load_config expects"):
        load_config(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keys must be strings"):
        load_config({1: 2})  # type: ignore[dict-item]


# ------------------------------------------------------------------------------------------------
# No environment variables, ever
# ------------------------------------------------------------------------------------------------


def test_environment_variables_have_no_influence(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "cutoff": "0.9",
        "pruning_tokeep_percentage_value": "0.05",
        "layer_for_reduction": "9",
        "visual_token_reduction": "false",
        "pact_config_path": "configs/no_reduction.json",
        "keep_ratio": "0.1",
        "layer": "7",
        "reduction": "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
        monkeypatch.setenv(key.upper(), value)
    # Calls made now, and a fresh copy of the module imported now (as the reference read its
    # environment at import time); the fresh copy is separate so the real module is untouched.
    assert load_config().to_dict() == ALL_DEFAULTS
    assert load_config("pact").to_dict() == ALL_DEFAULTS
    assert load_config(REF_PACT).cutoff == 0.21
    spec = importlib.util.spec_from_file_location("_pact_config_fresh", config_module.__file__)
    assert spec is not None and spec.loader is not None
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "_pact_config_fresh", fresh)
    spec.loader.exec_module(fresh)
    assert fresh.PactConfig().to_dict() == ALL_DEFAULTS
    assert fresh.load_config().to_dict() == ALL_DEFAULTS
    assert fresh.load_config("pact").to_dict() == ALL_DEFAULTS


def test_config_module_does_not_read_the_environment() -> None:
    source = Path(config_module.__file__).read_text()
    assert not re.search(r"\b(environ|getenv|putenv|environb)\b", source)


# ------------------------------------------------------------------------------------------------
# Documentation covers every key
# ------------------------------------------------------------------------------------------------


def _doc_words() -> set[str]:
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", (REPO / "docs" / "CONFIGDOC.md").read_text()))


def test_configdoc_names_every_field_and_reference_key() -> None:
    words = _doc_words()
    missing = [f.name for f in dataclasses.fields(PactConfig) if f.name not in words]
    missing += sorted(k for k in REFERENCE_KEYS if k not in words)
    assert not missing, f"docs/CONFIGDOC.md does not mention {missing}"


def test_configdoc_names_every_key_used_in_bundled_configs() -> None:
    words = _doc_words()
    for path in sorted((REPO / "configs").glob("*.json")):
        keys = json.loads(path.read_text())
        missing = [k for k in keys if k not in words]
        assert not missing, f"{path.name} uses keys not in docs/CONFIGDOC.md: {missing}"


def test_configdoc_states_every_default() -> None:
    text = (REPO / "docs" / "CONFIGDOC.md").read_text()
    for name, value in ALL_DEFAULTS.items():  # every method's defaults are pinned here
        shown = json.dumps(value)
        row = next((line for line in text.splitlines() if line.startswith(f"| `{name}`")), None)
        assert row is not None, f"no table row for {name}"
        assert shown in row or (isinstance(value, float) and _num_in(row, value)), (name, shown, row)


def _num_in(row: str, value: float) -> bool:
    return any(math.isclose(float(x), value) for x in re.findall(r"-?\d+(?:\.\d+)?", row))
