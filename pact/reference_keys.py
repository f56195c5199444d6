"""The reference implementation's configuration keys, translated to `PactConfig` fields.

The public PACT reference (orailix/PACT, `transformers/PACT/utils.py::load_config`) names its keys
differently, spreads one choice over several boolean flags and has one keep fraction per clustering
baseline. `pact.config.load_config` accepts all of them so that its JSON files and scripts carry
over; this module is that translation (the tables, the accepted-key check and `_translate`), kept out
of `pact/config.py` so the config module is the dataclass and its validation only.
docs/CONFIGDOC.md has the full table; tests/test_reference_keys.py checks every key.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from pact.config import _FIELD_NAMES, _RULES, _check_value, _label, _show, _suggest

# Same meaning and value type, different name.
_REF_RENAMED: dict[str, str] = {
    "visual_token_reduction": "reduction",
    "layer_for_reduction": "layer",
    "progessive_reduction": "progressive",  # sic
    "pruning_tokeep_percentage_value": "keep_ratio",
    "alpha_IQR": "iqr_alpha",
    "norm_to_use": "norm_order",
    "use_cosine_in_token_pruning": "euti_rope",
    "use_mask_in_use_attention_in_token_pruning": "fastv_causal",
    "VTW_equivalant_layer_for_reduction": "vtw_equivalent_layer",  # sic
    "equivalent_reduc_percentage_vtw": "vtw_keep_ratio",
    "include_pruned_in_mean": "retrieval",
    "coef_pruned": "retrieval_coef",
    "take_mean": "merge_mean",
    "eps_dbscan": "dbscan_eps",
    "noise_as_clusters_dbscan": "dbscan_noise_as_clusters",
    "perc_tokeep_tome_total": "tome_keep_ratio",
    "tome_equivalant_layer_for_reduction": "tome_equivalent_layer",  # sic
}
# Reference keys spelled like ours (they do not make a mapping "reference-form").
_REF_SHARED = ("cutoff", "multiply_by_norm", "linkage", "log_output_path")
# Reference key -> (our field, {reference value: our value}); the raw value is type-checked first.
_REF_MAPPED: dict[str, tuple[str, dict[Any, Any]]] = {
    "no_proportional_attention": ("proportional_attention", {True: False, False: True}),  # inverted
    "use_all_non_text_pruning": ("euti_support", {True: "prefix", False: "visual"}),
    "vector_to_use_in_distance_clustering": (
        "cluster_features",
        {
            "current_k_cosine": "keys_rope",
            "current_k": "keys",
            "current_q": "queries",
            "current_q_cosine": "queries_rope",
        },
    ),
}
# Groups of boolean reference flags that together choose one value of a field.
# (flag -> value when true; value when all are false, or None if that is an error)
_REF_FLAG_GROUPS: dict[str, tuple[dict[str, str], str | None]] = {
    "pruning_selection": (
        {"pruning_filter_wth_percentage": "ratio", "use_IQR_in_token_pruning": "iqr"},
        None,
    ),
    "position_mode": ({"get_mean_position_id": "mean", "change_position_ids": "renumber"}, "center"),
}
# The reference has one keep-fraction per clustering baseline; we have one cluster_ratio.
_REF_CLUSTER_RATIO: dict[str, str] = {
    "perc_tokeep_kmeans": "kmeans",
    "percentage_to_keep_dpc": "dpc",
    "percentage_to_keep_agglomerative": "agglomerative",
}
# Method flags (section "Reference method flags" of CONFIGDOC).
_REF_PRUNING_FLAGS = (
    "withdraw_visual_tokens",
    "prune_with_norm",
    "token_pruning",
    "use_custom_pruning",
    "use_attention_in_token_pruning",
)
_REF_EXCLUSIVE_PRUNING = ("withdraw_visual_tokens", "prune_with_norm", "token_pruning")
# In the reference's branch priority (DBDPC > custom > ToMe > k-means > DPC > DBSCAN > agglomerative).
_REF_CLUSTERING_FLAGS: dict[str, str] = {
    "use_DBDPC": "dbdpc",
    "use_custom_merging": "custom",
    "use_tome": "tome",
    "use_kmeans": "kmeans",
    "use_dpc": "dpc",
    "use_dbscan": "dbscan",
    "use_agglomerative": "agglomerative",
}
# Accepted (boolean, type-checked) and without effect here; why is in docs/CONFIGDOC.md.
_REF_IGNORED = (
    "synchro",
    "get_performance_metrics",
    "get_reduction_ratio",
    "keep_casual",  # sic
    "avoid_numerical_instability_DBDPC",
    "avoid_numerical_instability_prune",
    "need_kq",
    "do_not_upcast_to_full_precision_for_pruning",
    "do_not_consider_non_image_tokens_as_pruned",  # only true is supported
)
# No-effect keys whose value asks for a computation the reference did and we do not: a warning
# says so instead of silently computing something else (value that warns, what we do instead).
_REF_IGNORED_WARN: dict[str, tuple[bool, str]] = {
    "avoid_numerical_instability_DBDPC": (
        False,
        "DBDPC always orders densities strictly (float32, ties broken by index), as the reference's "
        "rank transform intends",
    ),
    "avoid_numerical_instability_prune": (
        False,
        "pruning always keeps exactly int(N * keep_ratio) tokens, ties going to the lower index",
    ),
    "do_not_upcast_to_full_precision_for_pruning": (True, "pruning scores are always computed in float32"),
}
# Reference defaults where they differ from ours: a reference-form mapping starts from these.
_REF_DEFAULTS: dict[str, Any] = {
    "reduction": False,
    "pruning": "none",
    "clustering": "none",
    "keep_ratio": 1.0,
    "multiply_by_norm": False,
    "fastv_causal": False,
    "cutoff": 0.0,
    "log_output_path": "aggregated_metrics",
}
# Other projects' names for our fields (do not make a mapping reference-form).
_OTHER_ALIASES: dict[str, str] = {"visual_token_num": "target_tokens"}  # VisPruner

REFERENCE_KEYS: frozenset[str] = frozenset(
    [
        *_REF_RENAMED,
        *_REF_SHARED,
        *_REF_MAPPED,
        *(k for flags, _ in _REF_FLAG_GROUPS.values() for k in flags),
        *_REF_CLUSTER_RATIO,
        *_REF_PRUNING_FLAGS,
        *_REF_CLUSTERING_FLAGS,
        *_REF_IGNORED,
    ]
)
"""Every key of the reference's configuration (all accepted by `load_config`)."""
_REFERENCE_ONLY = REFERENCE_KEYS - set(_FIELD_NAMES)
_ACCEPTED: tuple[str, ...] = (*_FIELD_NAMES, *sorted(REFERENCE_KEYS - set(_FIELD_NAMES)), *_OTHER_ALIASES)


def _key_fields() -> dict[str, tuple[frozenset[str], str | None]]:
    """accepted key -> (fields it sets, group of flags it combines with or None)."""
    table: dict[str, tuple[frozenset[str], str | None]] = {k: (frozenset([k]), None) for k in _FIELD_NAMES}
    for key, field_name in (*_REF_RENAMED.items(), *_OTHER_ALIASES.items()):
        table[key] = (frozenset([field_name]), None)
    for key, (field_name, _) in _REF_MAPPED.items():
        table[key] = (frozenset([field_name]), None)
    for field_name, (flags, _) in _REF_FLAG_GROUPS.items():
        table.update({k: (frozenset([field_name]), field_name) for k in flags})
    table.update({k: (frozenset(["cluster_ratio"]), None) for k in _REF_CLUSTER_RATIO})
    table.update({k: (frozenset(["pruning"]), "pruning") for k in _REF_PRUNING_FLAGS})
    table.update({k: (frozenset(["clustering"]), "clustering") for k in _REF_CLUSTERING_FLAGS})
    table.update({k: (frozenset(), None) for k in _REF_IGNORED})
    return table


_KEY_FIELDS = _key_fields()


def _pruning_from_flags(flags: Mapping[str, bool]) -> str:
    """The reference's pruning branch selected by its flags (absent = False)."""
    on = [k for k in _REF_EXCLUSIVE_PRUNING if flags.get(k)]
    if len(on) > 1:
        raise ValueError(f"reference flags {' and '.join(on)} are exclusive: at most one may be true")
    if flags.get("withdraw_visual_tokens"):
        return "withdraw"
    if flags.get("prune_with_norm"):
        return "norm"
    if flags.get("token_pruning"):
        if flags.get("use_custom_pruning"):
            return "custom"
        if flags.get("use_attention_in_token_pruning"):
            return "fastv"
        return "euti"
    return "none"


def _pruning_flags(pruning: str) -> dict[str, bool]:
    """Reference flags that select `pruning` (all false for methods the reference lacks)."""
    on = {
        "withdraw": ("withdraw_visual_tokens",),
        "norm": ("prune_with_norm",),
        "euti": ("token_pruning",),
        "fastv": ("token_pruning", "use_attention_in_token_pruning"),
        "custom": ("token_pruning", "use_custom_pruning"),
    }.get(pruning, ())
    return {k: k in on for k in _REF_PRUNING_FLAGS}


def _pruning_value(present: Mapping[str, bool], current: str) -> str:
    """Pruning selected by the reference flags `present`, applied on top of the `current` method."""
    flags = _pruning_flags(current)
    if any(present.get(k) for k in _REF_EXCLUSIVE_PRUNING):
        # Switching one of the exclusive branches on switches the current one off.
        flags.update(dict.fromkeys(_REF_EXCLUSIVE_PRUNING, False))
    flags.update(present)
    return _pruning_from_flags(flags)


def _clustering_value(present: Mapping[str, bool], current: str) -> str:
    """Clustering selected by the reference flags `present`, applied on top of the `current` method."""
    return _from_flag_group(_REF_CLUSTERING_FLAGS, "none", dict(present), current)


def _check_keys(mapping: Mapping[str, Any]) -> None:
    for key in mapping:
        if not isinstance(key, str):
            raise ValueError(f"config keys must be strings, got {_show(key)}")
        if key not in _ACCEPTED:
            raise ValueError(
                f"unknown config key {key!r}{_suggest(key, _ACCEPTED)} "
                "(accepted keys: the PactConfig fields and the reference names in docs/CONFIGDOC.md)"
            )


def _check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"config key {key!r} must be a boolean (true or false), got {_show(value)}")
    return value


def _translate(
    mapping: Mapping[str, Any], start: Mapping[str, Any], priority: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """The field values set by `mapping` (accepted names, already checked), as our names.

    `start` is the complete set of values the mapping applies to; it is needed where reference flags
    are relative (e.g. use_IQR_in_token_pruning=false only means something given the current
    selection rule). Two names for one field with different values raise ValueError naming both.
    `priority` holds the keys that came from overrides (they win over use_tome's forced values).
    """
    given: dict[str, tuple[Any, str]] = {}  # field -> (value, key it came from)

    def put(field_name: str, value: Any, key: str) -> None:
        if field_name in given and given[field_name][0] != value:
            other_value, other_key = given[field_name]
            raise ValueError(
                f"config keys {other_key!r} and {key!r} both set {field_name} but disagree "
                f"({other_key} gives {other_value!r}, {key} gives {value!r}); give only one of them"
            )
        given[field_name] = (value, key)

    for key, value in mapping.items():
        if key in _RULES:  # our name (also the four shared reference names)
            put(key, _check_value(key, value, _label(key)), key)
    for key, field_name in (*_REF_RENAMED.items(), *_OTHER_ALIASES.items()):
        if key in mapping:
            put(field_name, _check_value(field_name, mapping[key], _label(key, field_name)), key)
    for key, (field_name, table) in _REF_MAPPED.items():
        if key in mapping:
            raw = mapping[key]
            if isinstance(next(iter(table)), bool):
                _check_bool(key, raw)
            elif not isinstance(raw, str) or raw not in table:
                raise ValueError(
                    f"{_label(key, field_name)} must be one of {', '.join(repr(v) for v in table)}, "
                    f"got {raw!r}{_suggest(str(raw), list(table))}"
                )
            put(field_name, table[raw], key)
    for field_name, (flag_values, neither) in _REF_FLAG_GROUPS.items():
        present = {k: _check_bool(k, mapping[k]) for k in flag_values if k in mapping}
        if present:
            put(
                field_name,
                _from_flag_group(flag_values, neither, present, start[field_name]),
                next(iter(present)),
            )

    _translate_method_flags(mapping, start, given, priority)

    ratios = {
        k: _check_value("cluster_ratio", mapping[k], _label(k, "cluster_ratio"))
        for k in _REF_CLUSTER_RATIO
        if k in mapping
    }
    if ratios:
        if len(set(ratios.values())) > 1:
            # Several per-method fractions (e.g. a full dump of the reference defaults): the one of
            # the active clustering method is the one the reference would read.
            active = given["clustering"][0] if "clustering" in given else start["clustering"]
            ratios = {k: v for k, v in ratios.items() if _REF_CLUSTER_RATIO[k] == active} or ratios
        for key, value in ratios.items():
            put("cluster_ratio", value, key)

    for key in _REF_IGNORED:
        if key in mapping:
            _check_bool(key, mapping[key])
            if key in _REF_IGNORED_WARN and mapping[key] == _REF_IGNORED_WARN[key][0]:
                value, why = _REF_IGNORED_WARN[key]
                warnings.warn(
                    f"config key {key!r}={str(value).lower()} has no effect here: {why} "
                    "(docs/CONFIGDOC.md, 'Reference keys accepted with no effect here')",
                    UserWarning,
                    stacklevel=5,  # the caller of load_config / from_dict / replace
                )
    if mapping.get("do_not_consider_non_image_tokens_as_pruned") is False:
        raise ValueError(
            "config key 'do_not_consider_non_image_tokens_as_pruned' = false (the reference's experimental "
            "option that offers text tokens to the retrieval step) is not implemented; only true is supported"
        )
    return {k: v for k, (v, _) in given.items()}


def _from_flag_group(
    flag_values: dict[str, str], neither: str | None, present: dict[str, bool], current: str
) -> str:
    """Value selected by a group of exclusive reference flags, given those present in the input."""
    on = [k for k, v in present.items() if v]
    if len(on) > 1:
        raise ValueError(f"reference flags {' and '.join(on)} are exclusive: at most one may be true")
    if on:
        return flag_values[on[0]]
    switched_off = {flag_values[k] for k in present}
    if current not in switched_off:
        return current  # e.g. get_mean_position_id=false while the mode is "renumber"
    if neither is None:
        raise ValueError(f"reference flags {', '.join(flag_values)} are all false: exactly one must be true")
    return neither


def _translate_method_flags(
    mapping: Mapping[str, Any],
    start: Mapping[str, Any],
    given: dict[str, tuple[Any, str]],
    priority: frozenset[str],
) -> None:
    """Set pruning / clustering in `given` from the reference's method flags present in `mapping`."""
    groups = (
        ("pruning", _REF_PRUNING_FLAGS, _pruning_value),
        ("clustering", tuple(_REF_CLUSTERING_FLAGS), _clustering_value),
    )
    for field_name, names, value_of in groups:
        present = {k: _check_bool(k, mapping[k]) for k in names if k in mapping}
        if not present:
            continue  # no flag of this group: an explicit `pruning`/`clustering` (or the start) stands
        value = value_of(present, start[field_name])
        if field_name in given and given[field_name][0] != value:
            shown = ", ".join(f"{k}={str(v).lower()}" for k, v in present.items())
            raise ValueError(
                f"config key {field_name!r}={given[field_name][0]!r} disagrees with the reference flags "
                f"{shown} (which select {field_name}={value!r}); use either our key or the flags"
            )
        given[field_name] = (value, next(iter(present)))

    if mapping.get("use_tome") is True:
        # The reference loader forces ToMe to run at every layer from layer 0.
        for field_name, forced in (("progressive", True), ("layer", 0)):
            if field_name in given and given[field_name][0] != forced:
                value, key = given[field_name]
                if key in priority and "use_tome" not in priority:
                    continue  # an override wins over the file's use_tome
                if "use_tome" in priority and key not in priority:
                    given[field_name] = (forced, "use_tome")  # an override use_tome wins
                    continue
                raise ValueError(
                    f"use_tome=true runs ToMe at every layer from 0 (the reference forces "
                    f"progessive_reduction=true, layer_for_reduction=0), but config key {key!r} gives "
                    f"{value!r}; to choose otherwise use clustering='tome' with our names"
                )
            given[field_name] = (forced, "use_tome")
