"""User methods: ``pruning="custom"`` (a scoring hook) and ``clustering="custom"`` (a clustering and
merging hook); contracts in ``pact/custom.py``.

The hooks are ``pact.custom.custom_pruning`` / ``pact.custom.custom_token_reduction`` unless the
config names another importable function (``custom_pruning_fn`` / ``custom_reduction_fn``,
``"package.module:function"``), resolved when the method is built (``pact.apply``), so a typo fails
there with a clear message.

Registered pairs: custom + none (pruning only), custom + every clustering baseline, and every
pruning (none, euti, fastv, norm, random, custom) + custom clustering.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch

from pact.methods.base import CLUSTERING, PRUNING, Method, Signals, declare, register, spec
from pact.methods.budget import cluster_reduction, pruned_reduction, select_by_scores, target_count
from pact.methods.pact import cluster_features
from pact.ops.reduction import Reduction


def resolve_hook(spec: str | None, default: str) -> Callable[..., Any]:
    """The function named ``"package.module:function"`` (``default`` when ``spec`` is None).

    Raises:
        ValueError: the module cannot be imported, or has no such callable.
    """
    spec = spec or default
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} of custom hook {spec!r}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(
                f"custom hook {spec!r}: {obj.__name__ if hasattr(obj, '__name__') else obj} has no {part!r}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"custom hook {spec!r} is not callable")
    return obj


def call_hook(fn: Callable[..., Any], *args: Any, **context: Any) -> Any:
    """Call ``fn(*args, **context)`` passing only the keyword arguments ``fn`` accepts (all of them if
    it takes ``**kwargs``), so two-argument hooks written for the reference keep working."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: positional only
        return fn(*args)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        context = {k: v for k, v in context.items() if k in params}
    return fn(*args, **context)


def _repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(T, H_kv, d) -> (1, H, T, d), each KV head repeated H / H_kv times (transformers' repeat_kv)."""
    return x.repeat_interleave(heads // x.shape[1], dim=1).transpose(0, 1)[None]


def custom_token_scores(signals: Signals, fn: Callable[..., Any] | None = None) -> torch.Tensor:
    """float32 (N,) scores of the custom pruning hook (see ``pact/custom.py`` for the contract)."""
    cfg = signals.config
    fn = fn or resolve_hook(cfg.custom_pruning_fn, "pact.custom:custom_pruning")
    rope = bool(cfg.euti_rope)
    q, k = signals.queries(rope=rope), signals.keys(rope=rope)
    vis = signals.visual_mask
    n = signals.num_visual
    last = int(vis.nonzero().max()) + 1 if n else 0
    prefix = torch.arange(last, device=vis.device)
    # As the reference: the queries are always the prefix's; the keys (the scored tokens) are the
    # prefix's (use_all_non_text_pruning=true) or the visual tokens' only (false).
    rows = vis.nonzero().squeeze(1) if cfg.euti_support == "visual" else prefix
    keys, queries = _repeat_heads(k[rows], q.shape[1]), _repeat_heads(q[prefix], q.shape[1])
    out = call_hook(
        fn, keys, queries, hidden=signals.hidden[rows], visual_mask=vis[rows], layer=signals.layer
    )
    scores = torch.as_tensor(out, device=vis.device).float().flatten()
    if scores.numel() == rows.numel():
        scores = scores[vis[rows]]
    if scores.numel() != n:
        raise ValueError(
            f"custom pruning function returned {scores.numel()} scores; expected {rows.numel()} (one per "
            f"token given) or {n} (one per visual token)"
        )
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("custom pruning function returned NaN or inf scores")
    return scores


def _as_long(x: Any, device: torch.device, name: str) -> torch.Tensor:
    t = torch.as_tensor(x, device=device)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() != 1:
        raise ValueError(
            f"custom token reduction: {name} must be a 1-D integer tensor, got {t.dtype} {tuple(t.shape)}"
        )
    return t.long()


class CustomReduction(Method):
    """Optional score pruning (any score pruner or none), then the custom clustering hook.

    The composer of clustering="custom": ``build_method`` resolves any score pruner (or "none") +
    "custom" to this class at call time, whichever file declared the pruner.
    """

    name = "custom_reduction"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.reduce_fn = resolve_hook(config.custom_reduction_fn, "pact.custom:custom_token_reduction")
        self.pruner = None if config.pruning == "none" else spec(PRUNING, config.pruning)
        if self.pruner is not None and self.pruner.check is not None:
            self.pruner.check(config)

    def input_layers(self, num_layers: int) -> list[int]:
        if self.pruner is None or self.pruner.input_layers is None:
            return []
        return self.pruner.input_layers(self.config)

    def reduce(self, signals: Signals) -> Reduction:
        cfg = self.config
        n = signals.num_visual
        dev = signals.hidden.device
        vis = signals.visual_mask
        scores = None
        subset = torch.arange(n, device=dev)
        if cfg.pruning != "none":
            scores = self.pruner.score_fn(signals)
            subset = select_by_scores(scores, cfg, alone=False)
        hidden_v = signals.hidden[vis]
        features_v = cluster_features(signals)[vis]
        pruned = torch.ones(n, dtype=torch.bool, device=dev)
        pruned[subset] = False
        pruned_idx = pruned.nonzero().squeeze(1)
        give_pruned = bool(cfg.retrieval) and pruned_idx.numel() > 0
        out = call_hook(
            self.reduce_fn,
            hidden_v[subset],
            features_v[subset],
            sizes=signals.sizes[subset].float(),
            cutoff=float(cfg.cutoff),
            pruned_hidden=hidden_v[pruned_idx] if give_pruned else None,
            pruned_features=features_v[pruned_idx] if give_pruned else None,
            positions=signals.positions[:, vis][:, subset],
            layer=signals.layer,
            target=target_count(cfg, n),
        )
        if isinstance(out, Reduction):
            if cfg.pruning == "none":
                return out
            labels = torch.full((n,), -1, dtype=torch.long, device=dev)
            labels[subset] = out.labels
            return Reduction(subset[out.kept], out.sizes, out.hidden, labels, scores)
        if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
            got = f"a {len(out)}-tuple" if isinstance(out, (tuple, list)) else type(out).__name__
            raise ValueError(
                "custom token reduction must return (kept, labels), (kept, labels, merged) or a Reduction, "
                f"got {got} (a hook written for the reference, returning (features, mask, weights, "
                "position_ids), needs porting: see the contract in pact/custom.py)"
            )
        kept = _as_long(out[0], dev, "kept")
        labels = _as_long(out[1], dev, "labels")
        s = subset.numel()
        if labels.numel() < s or labels.numel() > s + pruned_idx.numel():
            raise ValueError(f"custom token reduction returned {labels.numel()} labels for {s} candidates")
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= s):
            raise ValueError(f"custom token reduction: kept must index the {s} candidates")
        extra = None
        if labels.numel() > s:
            extra = torch.full((n,), -1, dtype=torch.long, device=dev)
            extra[pruned_idx[: labels.numel() - s]] = labels[s:]
        red = cluster_reduction(
            hidden_v,
            signals.sizes,
            n,
            subset,
            kept,
            labels[:s],
            merge_mean=bool(cfg.merge_mean) and len(out) == 2,
            scores=scores,
            extra_labels=extra,
        )
        if len(out) == 3:
            merged = torch.as_tensor(out[2], device=dev)
            order = torch.argsort(kept)
            if merged.shape != (kept.numel(), hidden_v.shape[1]):
                raise ValueError(
                    f"custom token reduction: merged must be ({kept.numel()}, {hidden_v.shape[1]})"
                )
            red.hidden = merged[order].float()
        return red


class CustomPruning(Method):
    """Custom scores, top-k (or IQR) selection."""

    name = "custom_pruning"
    needs_merge = False

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.score_fn = resolve_hook(config.custom_pruning_fn, "pact.custom:custom_pruning")

    def reduce(self, signals: Signals) -> Reduction:
        scores = custom_token_scores(signals, self.score_fn)
        return pruned_reduction(
            select_by_scores(scores, self.config), signals.num_visual, signals.sizes, scores
        )


def _check_custom_pruning(config: Any) -> None:
    """Fail at build time on an unimportable ``custom_pruning_fn`` (not at the first prefill)."""
    resolve_hook(config.custom_pruning_fn, "pact.custom:custom_pruning")


declare(
    PRUNING,
    "custom",
    "score pruner",
    "custom pruning score (pact.custom / custom_pruning_fn)",
    score_fn=custom_token_scores,
    check=_check_custom_pruning,
)
declare(
    CLUSTERING,
    "custom",
    "clusterer",
    "custom clustering and merging (pact.custom / custom_reduction_fn)",
    composer=CustomReduction,
)
register("custom", "none")(CustomPruning)

__all__ = ["CustomPruning", "CustomReduction", "call_hook", "custom_token_scores", "resolve_hook"]
