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
then loading and saving. The reference-name translation is `pact/reference_keys.py`.
"""

from __future__ import annotations

import difflib
import json
import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

__all__ = [
    "CLUSTERING_METHODS",  # noqa: F822 (module __getattr__, derived from the method registry)
    "CONFIGS_DIR",
    "PRUNING_METHODS",  # noqa: F822 (module __getattr__)
    "REFERENCE_KEYS",  # noqa: F822 (module __getattr__, from pact.reference_keys)
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


def __getattr__(name: str) -> Any:
    if name in _METHOD_LISTS:
        return _method_names(*_METHOD_LISTS[name])
    if name == "REFERENCE_KEYS":  # every reference key; the translation lives in pact/reference_keys.py
        from pact.reference_keys import REFERENCE_KEYS

        return REFERENCE_KEYS
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
    hired_newlines: str = "remove"
    """HiRED: LLaVA-NeXT / -OneVision image-newline slots are removed with the pruned tokens
    ("remove", official: ``image_newline=None``) or "keep" them in the sequence."""
    dart_pivot_image_tokens: int = 4
    """DART: visual pivot tokens (largest L1 norm of their layer L-1 keys); kept, and each takes its
    share of the least-similar tokens."""
    dart_pivot_text_tokens: int = 4
    """DART: text pivot tokens (largest key L1 norm among the tokens after the last visual token)."""
    v2drop_layers: str = "3,17,22"
    """V2Drop: comma-separated decoder layers before which tokens are dropped, given for a model of
    v2drop_depth layers."""
    v2drop_keep_ratios: str = "0.5,0.5,0"
    """V2Drop: per stage, the fraction of the CURRENT visual tokens kept (at least one token)."""
    v2drop_depth: int = 32
    """V2Drop: depth the layers are given for (scaled to the model's depth); 0 = absolute layers."""
    pdrop_layers: str = "8,16,24"
    """PyramidDrop: comma-separated decoder layers before which tokens are dropped, given for a model
    of pdrop_depth layers."""
    pdrop_keep_ratios: str = "0.5,0.25,0.125"
    """PyramidDrop: per stage, the fraction of the ORIGINAL visual tokens kept."""
    pdrop_depth: int = 32
    """PyramidDrop: depth the layers are given for (scaled to the model's depth); 0 = absolute layers."""
    evs_pruning_rate: float = 0.75
    """EVS: fraction q of each video's tokens pruned, in [0, 1) (vLLM's ``--video-pruning-rate``);
    a video keeps max(one frame, int(tokens * (1 - q)))."""
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
    above it only each row's within-cutoff entries are kept (no N x N buffer, about one matmul pass). Same
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
    holitom_retain_ratio: float = 0.15
    """HoliTom: retain ratio r of each video's tokens before the LLM (official RETAIN_RATIO), in
    (0, 1]; raised by the static savings of the temporal segmentation."""
    holitom_tau: float = 0.8
    """HoliTom: similarity threshold T above which a token is static from one frame to the next."""
    holitom_beta: float = 0.6
    """HoliTom: a merged token = beta * its DPC-KNN center + (1 - beta) * its members' mean."""
    holitom_k: int = 7
    """HoliTom: neighbours of the DPC-KNN density (official K)."""
    holitom_dominant_share: float = 0.0
    """HoliTom: share D of each frame's dynamic budget given to contextual (DPC-KNN) tokens instead
    of attention-dominant ones (official D, default 0)."""
    holitom_inner_layer: int | None = 18
    """HoliTom: decoder layer k of the inner-LLM merge (official HOLITOM_k); None: no inner merge
    ("HoliTom w/o M")."""
    holitom_inner_ratio: float = 0.5
    """HoliTom: fraction of the visual tokens merged away at the inner layer (official HOLITOM_r)."""

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

# Comma-separated lists (schedules of progressive methods), checked further in _combination_problems.
_LAYER_LIST = _Rule(str, pattern=r"\d+(,\d+)*", pattern_doc='comma-separated layer indices, e.g. "3,17,22"')
_RATIO_LIST = _Rule(
    str,
    pattern=r"\d+(\.\d*)?(,\d+(\.\d*)?)*",
    pattern_doc='comma-separated fractions in [0, 1], e.g. "0.5,0.25"',
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
    "hired_newlines": _choice("remove", "keep"),
    "dart_pivot_image_tokens": _at_least(0),
    "dart_pivot_text_tokens": _at_least(0),
    "v2drop_layers": _LAYER_LIST,
    "v2drop_keep_ratios": _RATIO_LIST,
    "v2drop_depth": _at_least(0),
    "pdrop_layers": _LAYER_LIST,
    "pdrop_keep_ratios": _RATIO_LIST,
    "pdrop_depth": _at_least(0),
    "evs_pruning_rate": _Rule(float, lo=0.0, hi=1.0, hi_open=True),
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
    "holitom_retain_ratio": _unit(lo_open=True),
    "holitom_tau": _Rule(float, lo=-1.0, hi=1.0),
    "holitom_beta": _unit(),
    "holitom_k": _at_least(1),
    "holitom_dominant_share": _unit(),
    "holitom_inner_layer": _at_least(1, nullable=True),
    "holitom_inner_ratio": _Rule(float, lo=0.0, hi=1.0, hi_open=True),
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
    if c.pruning == "dart" and c.layer < 1:
        problems.append(
            "pruning='dart' reads the keys of layer L-1 and prunes before layer L, so layer must be >= 1 "
            f"(got layer={c.layer}; the official K is 2)"
        )
    if c.pruning == "dart" and c.dart_pivot_image_tokens + c.dart_pivot_text_tokens == 0:
        problems.append(
            "pruning='dart' needs at least one pivot: dart_pivot_image_tokens + dart_pivot_text_tokens "
            "must be >= 1 (official: 4 + 4)"
        )
    problems.extend(_schedule_problems("v2drop", c.v2drop_layers, c.v2drop_keep_ratios))
    problems.extend(_schedule_problems("pdrop", c.pdrop_layers, c.pdrop_keep_ratios))
    if c.clustering == "holitom" and c.holitom_inner_layer is not None and c.holitom_inner_layer <= c.layer:
        problems.append(
            f"holitom_inner_layer ({c.holitom_inner_layer}) must come after the outer merge at layer "
            f"{c.layer}: use a later layer, or null for no inner merge"
        )
    # Deliberately allowed: retrieval without pruning or without dbdpc (it then has nothing to do),
    # position_mode / proportional_attention with a pruning-only method (every size is 1).
    return problems


def _schedule_problems(method: str, layers: str, ratios: str) -> list[str]:
    """A progressive method's stage layers and keep ratios: as many ratios as layers, layers strictly
    increasing, ratios in [0, 1] (the formats are checked by the field rules)."""
    lay = [int(v) for v in layers.split(",")]
    rat = [float(v) for v in ratios.split(",")]
    out = []
    if len(lay) != len(rat):
        out.append(
            f"{method}_layers={layers!r} has {len(lay)} stages but {method}_keep_ratios={ratios!r} has "
            f"{len(rat)} ratios: give one ratio per stage layer"
        )
    if lay != sorted(set(lay)):
        out.append(f"{method}_layers={layers!r} must be strictly increasing")
    if any(r > 1.0 for r in rat):
        out.append(f"{method}_keep_ratios={ratios!r}: every ratio must be in [0, 1]")
    return out


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


_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(PactConfig))
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(PactConfig)}


# =================================================================================================
# Building configs from mappings, files and overrides
# =================================================================================================


def _start_for(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """Values a mapping's omitted keys take: ours, or the reference's for a reference-form mapping."""
    from pact import reference_keys as ref

    start = dict(_DEFAULTS)
    if any(k in ref._REFERENCE_ONLY for k in mapping):
        start.update(ref._REF_DEFAULTS)
    return start


def _merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` on top: an override drops every base key that sets the same field
    (whatever its name), except reference flags of one group, which combine (e.g. a file's
    token_pruning=true with an override use_attention_in_token_pruning=true means FastV)."""
    from pact.reference_keys import _KEY_FIELDS

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
    from pact.reference_keys import _check_keys, _translate

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
        from pact.reference_keys import _check_keys

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
