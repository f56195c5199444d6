"""One typed, validated, immutable configuration for a token-reduction run.

    from pact.config import PactConfig, load_config

    cfg = PactConfig()                                   # PACT at the LLaVA-OneVision-7B point
    cfg = load_config("pact", keep_ratio=0.8, cutoff=0.1)  # bare name -> <repo>/configs/pact.json
    cfg = load_config("configs/pact.json", layer_for_reduction=2)  # reference names work too
    cfg.to_json("run/config.json"); print(cfg.describe())

Every field has our name (see `PactConfig`). The reference implementation's key names are accepted
as aliases wherever a mapping is read (`load_config`, `PactConfig.from_dict`, `PactConfig.replace`),
so its JSON files carry over; see docs/CONFIGDOC.md for the full table and for the places where we
deliberately differ. Nothing here reads environment variables: the configuration is exactly what the
caller passes (the reference's import-time environment overrides were its issue #3).

Layout of this module, top to bottom: choices, the dataclass, the per-field rules (`_RULES`) and the
rules that relate fields (`_combination_problems`) -- all validation lives in those two places --,
then the reference-name translation, then loading and saving.
"""

from __future__ import annotations

import difflib
import json
import math
import numbers
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

__all__ = [
    "CLUSTERING_METHODS",  # noqa: F822 (module __getattr__, derived from the method registry)
    "CONFIGS_DIR",
    "PRUNING_METHODS",  # noqa: F822 (module __getattr__)
    "REFERENCE_KEYS",
    "SCORE_PRUNING_METHODS",  # noqa: F822 (module __getattr__)
    "PactConfig",
    "config_names",
    "load_config",
]

# Where bare names such as "pact" are looked up: pact/configs/<name>.json (the repository's
# top-level configs/ is a symlink to it, so reference-style paths like configs/pact.json work).
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"

# The method names are not listed here: they are derived from the method registry
# (`pact.methods.base.declare`), so a new method file is enough. Deriving them imports the method
# modules (and torch), so it happens on first use, never at import time (`pact --help` stays fast):
# `PRUNING_METHODS`, `CLUSTERING_METHODS` and `SCORE_PRUNING_METHODS` are computed by the module
# `__getattr__` below, and the `pruning` / `clustering` rules ask the registry when they validate.
_METHOD_LISTS = {
    "PRUNING_METHODS": ("pruning", None),
    "CLUSTERING_METHODS": ("clustering", None),
    # Pruning methods that produce one score per visual token, so a score threshold (IQR) can apply.
    "SCORE_PRUNING_METHODS": ("pruning", "score pruner"),
}


def _method_names(axis: str, kind: str | None = None) -> tuple[str, ...]:
    """Registered pruning/clustering names ("none" first unless ``kind``), from the registry."""
    import pact.methods  # noqa: F401  (imports every method module, which declares its names)
    from pact.methods.base import names

    return names(axis, kind)


def __getattr__(name: str) -> tuple[str, ...]:
    if name in _METHOD_LISTS:
        return _method_names(*_METHOD_LISTS[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class PactConfig:
    """Every setting of a token-reduction run. Defaults reproduce PACT on LLaVA-OneVision-7B.

    Instances are immutable and validated on construction: an unknown key, a wrong type, an
    out-of-range value or an incompatible combination raises ValueError naming the key and the
    allowed values. Use `replace(**changes)` for a modified copy and `load_config` / `from_dict` to
    read mappings that may use the reference implementation's key names.
    """

    # ---- selection: what runs, and where -------------------------------------------------------
    reduction: bool = True
    """Master switch. False: the model behaves exactly like the stock model."""
    layer: int = 4
    """Decoder layer index L (0-based). Reduction happens on the hidden states entering layer L;
    layers < L see every token."""
    pruning: str = "euti"
    """Pruning method: one of PRUNING_METHODS, derived from the method registry (none, euti, fastv,
    norm, random, withdraw = VTW, vispruner, hired, custom; `pact methods` lists them)."""
    clustering: str = "dbdpc"
    """Clustering/merging method: one of CLUSTERING_METHODS, derived from the method registry (none,
    dbdpc, tome, kmeans, dpc, agglomerative, dbscan, prumerge, pooling, custom)."""
    progressive: bool = False
    """Re-apply the method at every layer >= L instead of once at L."""
    target_tokens: int | None = None
    """Budget: visual tokens to keep per sample (methods with a threshold search it to meet the
    budget). Exclusive with target_ratio. None: no budget, use the method's own parameters."""
    target_ratio: float | None = None
    """Budget: fraction of visual tokens removed (reduction ratio) to reach, in [0, 1]. Exclusive
    with target_tokens."""

    # ---- pruning -------------------------------------------------------------------------------
    keep_ratio: float = 0.55
    """Fraction lambda of visual tokens kept by pruning: exactly int(N * keep_ratio) tokens."""
    pruning_selection: str = "ratio"
    """How scores become a keep-set: "ratio" (top keep_ratio) or "iqr" (score > q1 + iqr_alpha *
    (q3 - q1))."""
    iqr_alpha: float = 0.5
    """alpha of the IQR threshold q1 + alpha * (q3 - q1)."""
    multiply_by_norm: bool = True
    """EUTI: multiply each token's score by the norm of its layer-L input hidden state."""
    norm_order: float = 2.0
    """p of that norm, ||h||_p (> 0)."""
    euti_rope: bool = False
    """Score with post-RoPE queries/keys instead of pre-RoPE ones (EUTI, reference FastV, custom)."""
    euti_support: str = "prefix"
    """EUTI softmax support: "prefix" = every token up to the last visual one (reference code) or
    "visual" = visual tokens only (paper eq. 2)."""
    euti_query: str = "prefix"
    """EUTI global query: mean query over the "prefix" (reference code) or over the "visual" tokens
    (paper eq. 1)."""
    # -- per-method pruning settings (FastV, random, VTW, VisPruner, HiRED, vision side): a new
    #    pruning method's fields go at the end of this block, named after the method
    fastv_variant: str = "reference"
    """"reference": the reference's FastV (layer L, prefix queries, mean over queries and heads);
    "original": FastV's own rule (last token's attention at layer L - 1)."""
    fastv_causal: bool = True
    """Causal mask in the reference FastV attention."""
    random_seed: int = 0
    """Seed of random pruning (same seed, same input -> same tokens)."""
    vtw_equivalent_layer: int = -1
    """L_eq of the VTW layer formula round(n * (1 - (1 - p) * (n - L_eq) / n)); -1: withdraw at
    `layer` as given."""
    vtw_keep_ratio: float = 0.0
    """p of the VTW layer formula."""
    vispruner_important_ratio: float = 0.5
    """VisPruner: share r of the budget given to important (attention-selected) tokens."""
    hired_alpha: float = 0.5
    """HiRED: share of the budget split between sub-images by the base image's attention."""
    hired_layout: str = "raster"
    """HiRED sub-image shares: base tokens counted per contiguous "raster" chunk (official) or for
    the crop covering them ("spatial")."""
    vispruner_scope: str = "crop"
    """VisPruner budget: per encoder image/"crop" (official; LLaVA-NeXT "32 x 5 = 160") or one
    selection over the whole "sample"."""
    vispruner_dtype: str = "model"
    """VisPruner attention and similarity dtype: the "model" dtype (official) or "float32"."""
    vision_features: str = "encoder"
    """VisPruner similarity / PruMerge merge features: the "encoder" selected-layer outputs (projector
    input, official) or the "projector" outputs (LLM input embeddings)."""
    visionzip_contextual_ratio: float = 0.15625
    """VisionZip: share of each encoder image's kept tokens that are contextual (merged) tokens,
    int(T * ratio); the official 64 = 54 dominant + 10 contextual is 0.15625."""
    visionzip_features: str = "auto"
    """VisionZip merge features: "encoder" (projector input, then projected: official LLaVA),
    "projector" (LLM input embeddings: the official Qwen2.5-VL port) or "auto" (projector on M-RoPE
    families, else encoder)."""
    cdpruner_theta: float | None = None
    """CDPruner kernel factor: the relevance itself (None, the official code path) or
    exp(theta / (2 (1 - theta)) * relevance) with theta in [0, 1) (the official commented variant)."""
    cdpruner_negate_relevance: bool = False
    """CDPruner: negate the mean instruction cosine before normalising (the official code, for CLIP
    patch-text similarities); False for the LLM-embedding relevance used here."""
    sparsevlm_budget: int = 192
    """SparseVLM: the official per-stage schedule of this budget label (64, 96, 128 or 192 tokens;
    kept tokens per stage scaled by N / 576)."""
    sparsevlm_layers: str = "2,6,15"
    """SparseVLM pruning layers, comma-separated (official 2, 6, 15 of 32 decoder layers)."""
    sparsevlm_reference_depth: int = 32
    """SparseVLM: the layers are given for a model of this depth and scaled to round(l * n / depth)
    on a model of n layers; 0 = use them as given."""
    sparsevlm_count: str = "schedule"
    """SparseVLM kept count per stage: the official "schedule" or the first release's "rank"
    (int(rank * sparsevlm_rank_scale) of the raters x visual attention)."""
    sparsevlm_rank_scale: float = 13.5
    """SparseVLM: scale of the rank count (the first release's default 13.5)."""
    sparsevlm_recycle: bool = True
    """SparseVLM: recycle the best pruned tokens into DPC-KNN merged tokens (official)."""

    # ---- clustering / merging ------------------------------------------------------------------
    cutoff: float = 0.21
    """DBDPC cutoff distance d_c (cosine distance; > 0 for dbdpc). Passed through unchanged to a
    custom clustering function, as the reference does."""
    density_bandwidth: float = 2.0
    """d_n of the DBDPC/DPC density (hard-coded 2 in the reference)."""
    density_kernel: str = "gaussian"
    """Density kernel: "gaussian" sum exp(-(d/d_n)^2) (reference code) or "exponential"
    sum exp(-d/d_n) (paper eq. 6)."""
    dbdpc_matrix_max_points: int = 8192
    """DBDPC stores the N x N float32 distance matrix when N <= this (256 MiB at 8192, fastest);
    above it the rows are recomputed in tiles (no N x N buffer, about twice the matmul work). Same
    centers and labels either way; 0 = always blocked (long videos on a busy GPU)."""
    retrieval: bool = True
    """Add pruned tokens within retrieval_coef * cutoff of their nearest center to that cluster."""
    retrieval_coef: float = 1.5
    """alpha: retrieval radius as a multiple of cutoff (> 0)."""
    merge_mean: bool = True
    """A merged token's hidden state is the mean of its members (False: the center keeps its own)."""
    cluster_features: str = "keys_rope"
    """Vectors the clustering compares: keys_rope, keys, queries, queries_rope (layer L) or hidden."""
    proportional_attention: bool = True
    """Add log(cluster size) to merged keys' attention logits in every layer >= L."""
    position_mode: str = "center"
    """Positions after a reduction: kept tokens keep theirs and a merged token its "center"'s, or
    the members' "mean" (per M-RoPE axis), or "renumber" (1-D RoPE: contiguous positions over the
    reduced sequence, decoding from its length; M-RoPE: the kept tokens' (t, h, w) ids, as the Qwen
    ports of vision-side methods; docs/CONFIGDOC.md, "Positions")."""
    # -- per-method clustering settings (k-means, DPC, agglomerative, DBSCAN, ToMe, pooling,
    #    PruMerge): a new clustering method's fields go at the end of this block
    cluster_ratio: float = 1.0
    """Fraction of tokens kept as clusters, in (0, 1]: k-means k, DPC centers, agglomerative
    n_clusters."""
    kmeans_iters: int = 100
    """k-means iterations."""
    linkage: str = "single"
    """Agglomerative linkage: single, average or complete."""
    dbscan_eps: float = 0.1
    """DBSCAN neighbourhood radius (> 0)."""
    dbscan_min_samples: int = 5
    """DBSCAN: neighbours needed for a core point."""
    dbscan_noise_as_clusters: bool = False
    """DBSCAN: keep noise points as singleton clusters (False: drop them)."""
    tome_keep_ratio: float = 1.0
    """p of the ToMe schedule (layer-averaged fraction of visual tokens kept)."""
    tome_equivalent_layer: int = 4
    """L_eq of the ToMe schedule."""
    pooling_stride: int = 2
    """Spatial pooling window (pooling clustering)."""
    prumerge_plus: bool = False
    """PruMerge+: add spatially uniform samples to PruMerge's outlier tokens (clustering="prumerge")."""
    prumerge_attention: str = "full_width"
    """PruMerge [CLS] attention: one head over the "full_width" q/k (official) or the "head_mean"."""
    prumerge_sampling: str = "arange"
    """PruMerge+ samples: 1-D "arange" over the flat token list (official) or a 2-D "lattice"."""
    prumerge_extra_token: bool = True
    """PruMerge: append the attention-weighted sum of the pruned tokens after the kept ones (official)."""
    sdpa_fast_path: bool = True
    """On attn_implementation="sdpa", fold the log(size) key bias into one extra query/key column and
    keep SDPA's causal kernel (same outputs, much faster than an explicit float mask on CPU); False
    passes the explicit causal+padding+bias 4-D mask instead."""
    custom_pruning_fn: str | None = None
    """"pkg.module:function" scoring hook for pruning="custom" (None: pact.custom.custom_pruning)."""
    custom_reduction_fn: str | None = None
    """"pkg.module:function" clustering+merging hook for clustering="custom" (None:
    pact.custom.custom_token_reduction)."""

    # ---- run / reporting -----------------------------------------------------------------------
    log_output_path: str | None = None
    """Folder for the metrics JSON of evaluation runs (None: do not write one)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = _check_value(f.name, getattr(self, f.name), _label(f.name))
            object.__setattr__(self, f.name, value)  # normalised (e.g. int -> float)
        problems = _combination_problems(self)
        if problems:
            raise ValueError("incompatible config options:\n  - " + "\n  - ".join(problems))

    # ---- conversion ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """All fields, our names, in declaration order (JSON-compatible values)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PactConfig:
        """Build a config from a mapping of our names and/or the reference's names.

        Keys absent from `data` take our defaults, except for a reference-form mapping (one that uses
        any reference-only key), whose absent keys take the reference's defaults (see CONFIGDOC).
        """
        return _from_mapping(data)

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """The config as JSON text (our names); also written to `path` if given."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        if path is not None:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        return text

    def replace(self, **changes: Any) -> PactConfig:
        """A validated copy with `changes` applied (our names or reference aliases)."""
        return _apply_overrides(self, changes)

    # ---- reporting -----------------------------------------------------------------------------
    def describe(self) -> str:
        """One line for logs: the method, then every value that differs from the defaults."""
        if self.reduction:
            head = f"pruning={self.pruning} clustering={self.clustering} layer={self.layer}"
        else:
            head = "reduction off"
        shown = {"reduction", "pruning", "clustering", "layer"}
        defaults = _DEFAULTS
        diff = [f"{k}={v!r}" for k, v in self.to_dict().items() if k not in shown and v != defaults[k]]
        tail = "non-default: " + ", ".join(diff) if diff else "other values default"
        return f"PactConfig({head}; {tail})"

    def __str__(self) -> str:
        return self.describe()


# =================================================================================================
# Validation: the per-field rules and the rules relating fields. Nothing else validates values.
# =================================================================================================


@dataclass(frozen=True)
class _Rule:
    """Type and allowed values of one field."""

    kind: type  # bool, int, float or str
    nullable: bool = False
    choices: tuple[str, ...] | None = None
    lo: float | None = None  # bounds for numbers
    hi: float | None = None
    lo_open: bool = False  # True: value > lo (else >= lo)
    hi_open: bool = False
    pattern: str | None = None  # regex a string must match fully
    pattern_doc: str = ""
    method_axis: str | None = None  # choices are the registered "pruning"/"clustering" names

    def allowed_choices(self) -> tuple[str, ...] | None:
        """The allowed strings, or None (asked of the method registry for a method key)."""
        return _method_names(self.method_axis) if self.method_axis is not None else self.choices

    def allowed(self) -> str:
        """Human-readable description of the allowed values."""
        choices = self.allowed_choices()
        if choices is not None:
            text = "one of " + ", ".join(repr(c) for c in choices)
        elif self.kind is bool:
            text = "true or false"
        elif self.kind in (int, float):
            noun = "an integer" if self.kind is int else "a number"
            if self.lo is not None and self.hi is not None:
                left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
                text = f"{noun} in {left}{_num(self.lo)}, {_num(self.hi)}{right}"
            elif self.lo is not None:
                text = f"{noun} {'>' if self.lo_open else '>='} {_num(self.lo)}"
            else:
                text = f"a finite {noun.split()[-1]}"
        else:
            text = self.pattern_doc or "a string"
        return text + (" or null" if self.nullable else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _choice(*values: str) -> _Rule:
    return _Rule(str, choices=values)


def _unit(lo_open: bool = False, nullable: bool = False) -> _Rule:
    """A float in [0, 1] (or (0, 1] with lo_open)."""
    return _Rule(float, lo=0.0, hi=1.0, lo_open=lo_open, nullable=nullable)


def _positive(kind: type = float) -> _Rule:
    return _Rule(kind, lo=0, lo_open=True)


def _at_least(lo: int, kind: type = int, nullable: bool = False) -> _Rule:
    return _Rule(kind, lo=lo, nullable=nullable)


_BOOL = _Rule(bool)
_HOOK = _Rule(
    str,
    nullable=True,
    pattern=r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*",
    pattern_doc='"package.module:function"',
)

_RULES: dict[str, _Rule] = {
    # selection
    "reduction": _BOOL,
    "layer": _at_least(0),
    "pruning": _Rule(str, method_axis="pruning"),
    "clustering": _Rule(str, method_axis="clustering"),
    "progressive": _BOOL,
    "target_tokens": _at_least(0, nullable=True),
    "target_ratio": _unit(nullable=True),
    # pruning
    "keep_ratio": _unit(),
    "pruning_selection": _choice("ratio", "iqr"),
    "iqr_alpha": _Rule(float),
    "multiply_by_norm": _BOOL,
    "norm_order": _positive(),
    "euti_rope": _BOOL,
    "euti_support": _choice("prefix", "visual"),
    "euti_query": _choice("prefix", "visual"),
    # -- per-method pruning settings (same block as in the dataclass)
    "fastv_variant": _choice("reference", "original"),
    "fastv_causal": _BOOL,
    "random_seed": _at_least(0),
    "vtw_equivalent_layer": _at_least(-1),
    "vtw_keep_ratio": _unit(),
    "vispruner_important_ratio": _unit(),
    "hired_alpha": _unit(),
    "hired_layout": _choice("raster", "spatial"),
    "vispruner_scope": _choice("crop", "sample"),
    "vispruner_dtype": _choice("model", "float32"),
    "vision_features": _choice("encoder", "projector"),
    "visionzip_contextual_ratio": _unit(),
    "visionzip_features": _choice("auto", "encoder", "projector"),
    "cdpruner_theta": _Rule(float, nullable=True, lo=0.0, hi=1.0, hi_open=True),
    "cdpruner_negate_relevance": _BOOL,
    "sparsevlm_budget": _at_least(1),
    "sparsevlm_layers": _Rule(
        str, pattern=r"\d+(,\d+)*", pattern_doc='comma-separated layer indices, e.g. "2,6,15"'
    ),
    "sparsevlm_reference_depth": _at_least(0),
    "sparsevlm_count": _choice("schedule", "rank"),
    "sparsevlm_rank_scale": _positive(),
    "sparsevlm_recycle": _BOOL,
    # clustering / merging ("> 0 for dbdpc" is a combination rule: custom clustering may get 0)
    "cutoff": _at_least(0, kind=float),
    "density_bandwidth": _positive(),
    "density_kernel": _choice("gaussian", "exponential"),
    "dbdpc_matrix_max_points": _at_least(0),
    "retrieval": _BOOL,
    "retrieval_coef": _positive(),
    "merge_mean": _BOOL,
    "cluster_features": _choice("keys_rope", "keys", "queries", "queries_rope", "hidden"),
    "proportional_attention": _BOOL,
    "position_mode": _choice("center", "mean", "renumber"),
    # -- per-method clustering settings (same block as in the dataclass)
    "cluster_ratio": _unit(lo_open=True),
    "kmeans_iters": _at_least(1),
    "linkage": _choice("single", "average", "complete"),
    "dbscan_eps": _positive(),
    "dbscan_min_samples": _at_least(1),
    "dbscan_noise_as_clusters": _BOOL,
    "tome_keep_ratio": _unit(),
    "tome_equivalent_layer": _at_least(0),
    "pooling_stride": _at_least(1),
    "prumerge_plus": _BOOL,
    "prumerge_attention": _choice("full_width", "head_mean"),
    "prumerge_sampling": _choice("arange", "lattice"),
    "prumerge_extra_token": _BOOL,
    "sdpa_fast_path": _BOOL,
    "custom_pruning_fn": _HOOK,
    "custom_reduction_fn": _HOOK,
    # run / reporting
    "log_output_path": _Rule(str, nullable=True, pattern=r"(?s).+", pattern_doc="a non-empty path"),
}


def _combination_problems(c: PactConfig) -> list[str]:
    """Every rule that relates two or more fields; returns one message per violated rule."""
    problems = []
    if c.target_tokens is not None and c.target_ratio is not None:
        problems.append(
            f"target_tokens ({c.target_tokens}) and target_ratio ({c.target_ratio}) are exclusive "
            "budgets: set one of them and leave the other null"
        )
    if c.pruning == "withdraw" and c.clustering != "none":
        problems.append(
            f"pruning='withdraw' (VTW) removes every visual token, so clustering must be 'none' "
            f"(got clustering={c.clustering!r})"
        )
    if c.clustering == "tome" and c.pruning != "none":
        problems.append(
            "clustering='tome' runs its own merge schedule and needs pruning='none' "
            f"(got pruning={c.pruning!r})"
        )
    score_pruners = _method_names("pruning", "score pruner") if c.pruning_selection == "iqr" else ()
    if c.pruning_selection == "iqr" and c.pruning not in score_pruners:
        problems.append(
            "pruning_selection='iqr' thresholds pruning scores, so pruning must be one of "
            f"{', '.join(repr(m) for m in score_pruners)} (got pruning={c.pruning!r}); "
            "use pruning_selection='ratio' otherwise"
        )
    if c.pruning_selection == "iqr" and (c.target_tokens is not None or c.target_ratio is not None):
        problems.append(
            "pruning_selection='iqr' chooses its own number of tokens, which contradicts a budget "
            "(target_tokens / target_ratio): use pruning_selection='ratio' with a budget"
        )
    if c.clustering == "dbdpc" and c.cutoff <= 0:
        problems.append(
            f"clustering='dbdpc' needs cutoff > 0 (got cutoff={c.cutoff}); PACT uses 0.21 on "
            "LLaVA-OneVision-7B and 0.1 on Qwen2-VL-7B"
        )
    if c.pruning == "fastv" and c.fastv_variant == "original" and c.layer < 1:
        problems.append(
            "fastv_variant='original' ranks tokens with the attention of layer L-1, so layer must be "
            f">= 1 (got layer={c.layer})"
        )
    if c.prumerge_sampling == "lattice" and not c.prumerge_plus:
        problems.append(
            "prumerge_sampling='lattice' places PruMerge+'s uniform samples, so it needs "
            "prumerge_plus=true (got prumerge_plus=false)"
        )
    if c.custom_pruning_fn is not None and c.pruning != "custom":
        problems.append(f"custom_pruning_fn is only used with pruning='custom' (got pruning={c.pruning!r})")
    if c.custom_reduction_fn is not None and c.clustering != "custom":
        problems.append(
            f"custom_reduction_fn is only used with clustering='custom' (got clustering={c.clustering!r})"
        )
    # Deliberately allowed: retrieval without pruning or without dbdpc (it then has nothing to do),
    # position_mode / proportional_attention with a pruning-only method (every size is 1).
    return problems


def _label(key: str, field_name: str | None = None) -> str:
    """How error messages name a key: 'cutoff', or 'coef_pruned' (our name: retrieval_coef)."""
    if field_name is None or field_name == key:
        return f"config key {key!r}"
    return f"config key {key!r} (our name: {field_name})"


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _suggest(word: str, candidates: list[str] | tuple[str, ...]) -> str:
    """'; did you mean ...?' with the closest candidates (case-insensitive), or ''."""
    by_lower = {c.lower(): c for c in candidates}
    close = [by_lower[c] for c in difflib.get_close_matches(word.lower(), list(by_lower), n=3, cutoff=0.6)]
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _check_value(field_name: str, value: Any, label: str) -> Any:
    """Return `value` normalised to the field's type, or raise ValueError naming `label`."""
    rule = _RULES[field_name]
    expected = f"expected {rule.allowed()}"
    if value is None:
        if rule.nullable:
            return None
        raise ValueError(f"{label} must not be null; {expected}")
    if rule.kind is bool:
        # A real boolean only: "true", 1 or 0 are refused so that typos cannot flip a switch.
        if not isinstance(value, bool):
            raise ValueError(f"{label} must be a boolean (true or false), got {_show(value)}")
        return value
    if rule.kind is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{label} must be an integer, got {_show(value)}; {expected}")
        value = int(value)
    elif rule.kind is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{label} must be a number, got {_show(value)}; {expected}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{label} must be a finite number, got {value}; {expected}")
    elif not isinstance(value, str):
        raise ValueError(f"{label} must be a string, got {_show(value)}; {expected}")
    choices = rule.allowed_choices()
    if choices is not None and value not in choices:
        raise ValueError(f"{label} must be {rule.allowed()}, got {value!r}{_suggest(value, choices)}")
    if rule.lo is not None and (value <= rule.lo if rule.lo_open else value < rule.lo):
        raise ValueError(f"{label} must be {rule.allowed()}, got {value}")
    if rule.hi is not None and (value >= rule.hi if rule.hi_open else value > rule.hi):
        raise ValueError(f"{label} must be {rule.allowed()}, got {value}")
    if rule.pattern is not None and not re.fullmatch(rule.pattern, value):
        raise ValueError(f"{label} must be {rule.allowed()}, got {value!r}")
    return value


# =================================================================================================
# Reference key names (orailix/PACT transformers/PACT/utils.py::load_config) -> our fields
# =================================================================================================

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

_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(PactConfig))
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(PactConfig)}

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


# =================================================================================================
# Building configs from mappings, files and overrides
# =================================================================================================


def _start_for(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """Values a mapping's omitted keys take: ours, or the reference's for a reference-form mapping."""
    start = dict(_DEFAULTS)
    if any(k in _REFERENCE_ONLY for k in mapping):
        start.update(_REF_DEFAULTS)
    return start


def _merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` on top: an override drops every base key that sets the same field
    (whatever its name), except reference flags of one group, which combine (e.g. a file's
    token_pruning=true with an override use_attention_in_token_pruning=true means FastV)."""
    merged = {}
    for key, value in base.items():
        fields_k, group_k = _KEY_FIELDS[key]
        clash = any(
            o != key and fields_k & _KEY_FIELDS[o][0] and (group_k is None or group_k != _KEY_FIELDS[o][1])
            for o in overrides
        )
        if not clash:
            merged[key] = value
    merged.update(overrides)
    return merged


def _build(base: Mapping[str, Any], start: Mapping[str, Any], overrides: Mapping[str, Any]) -> PactConfig:
    """Validate `base` (a mapping, any names) on top of `start`, `overrides` winning; one check."""
    _check_keys(base)
    _check_keys(overrides)
    merged = _merge(base, overrides)
    values = _translate(merged, start, priority=frozenset(overrides))
    return PactConfig(**{**start, **values})


def _from_mapping(mapping: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> PactConfig:
    if not isinstance(mapping, Mapping):
        raise ValueError(f"a config must be a mapping of keys to values, got {_show(mapping)}")
    return _build(mapping, _start_for(mapping), overrides or {})


def _apply_overrides(base: PactConfig, overrides: Mapping[str, Any]) -> PactConfig:
    return _build({}, base.to_dict(), overrides)


def config_names() -> list[str]:
    """Names of the bundled configs usable as `load_config(name)`."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


def _resolve(path: str | os.PathLike[str]) -> Path:
    """A bare name -> configs/<name>.json; a relative path is tried from the cwd, then the repo root."""
    p = Path(path)
    if not p.suffix and len(p.parts) == 1:
        candidates = [CONFIGS_DIR / f"{p.name}.json"]
    elif p.is_absolute():
        candidates = [p]
    else:
        candidates = [p, CONFIGS_DIR.parent / p, CONFIGS_DIR / p]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"config {os.fspath(path)!r} not found (tried {', '.join(str(c) for c in candidates)}); "
        f"bundled configs: {', '.join(config_names()) or 'none'}"
    )


def _read_json(path: Path) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"{path}: duplicate key(s) {', '.join(repr(k) for k in dup)}")
        return dict(pairs)

    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a JSON object, got {type(data).__name__}")
    return data


def load_config(
    path_or_dict: str | os.PathLike[str] | Mapping[str, Any] | PactConfig | None = None, **overrides: Any
) -> PactConfig:
    """Build a validated PactConfig.

    Args:
        path_or_dict: None (the defaults: PACT at the LLaVA-OneVision-7B point); a PactConfig; a
            mapping; a path to a JSON file; or a bare name such as "pact" or "no_reduction" meaning
            <repo>/configs/<name>.json. Mappings and files may use our names and/or the reference's.
        **overrides: field values that win over those of `path_or_dict`, by our name or any alias,
            e.g. `load_config("configs/pact.json", layer_for_reduction=2)`.

    Raises:
        ValueError: unknown key, wrong type, value out of range or incompatible options (the message
            names the key and the allowed values). FileNotFoundError: no such config file.
    """
    if path_or_dict is None:
        return _apply_overrides(PactConfig(), overrides) if overrides else PactConfig()
    if isinstance(path_or_dict, PactConfig):
        return _apply_overrides(path_or_dict, overrides) if overrides else path_or_dict
    if isinstance(path_or_dict, Mapping):
        return _from_mapping(path_or_dict, overrides)
    if isinstance(path_or_dict, (str, os.PathLike)):
        _check_keys(overrides)  # a typo in an override is not the file's fault: say so before reading it
        path = _resolve(path_or_dict)
        try:
            # Merged before validation: an override may replace a value the file alone would refuse
            # (the reference's dpc.json holds a 0.0 placeholder its scripts override).
            return _from_mapping(_read_json(path), overrides)
        except ValueError as e:
            if str(e).startswith(str(path)):
                raise
            where = f"{path} with overrides {', '.join(overrides)}" if overrides else str(path)
            raise ValueError(f"{where}: {e}") from e
    raise TypeError(
        f"load_config expects a path, a config name, a dict, a PactConfig or None, got {_show(path_or_dict)}"
    )


# The rule table must cover exactly the dataclass fields (caught at import, not at a user's run).
if set(_RULES) != set(_FIELD_NAMES):  # pragma: no cover
    raise RuntimeError(f"_RULES and PactConfig fields differ: {set(_RULES) ^ set(_FIELD_NAMES)}")


def main(argv: list[str] | None = None) -> int:
    """`pact config`: see `pact.cli.config_main` (kept here for `python -c "import pact.config ..."`)."""
    from pact.cli import config_main

    return config_main(argv)
