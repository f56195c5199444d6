"""Public API: ``apply``, ``remove``, ``stats``.

    import pact
    cfg = pact.load_config("configs/pact.json", layer_for_reduction=2)
    pact.apply(model, cfg)          # in place; per-instance hooks only; returns model
    out = model.generate(**inputs)
    st = pact.stats(model)          # the last prefill: visual_before/after per sample, layers, seconds
    pact.remove(model)              # back to the stock model, bit for bit

Applying to a model that already has pact applied REPLACES the previous configuration (the old
hooks are removed first), so ``apply`` can be called again to change settings between runs.

``copy.deepcopy(model)`` of a model with pact applied gives an independent copy with the same
configuration applied to it (its own engine and hooks; the original is left as it was).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from pact.engine import Engine, ReductionRecord, ReductionStats, check_attention_backend
from pact.models import get_adapter

_ATTR = "_pact_engine"
_GIVEN_METHOD = "_pact_given_method"  # the `method=` argument of apply (None: built from the config)
_DEEPCOPY = "__deepcopy__"  # per-instance hook, so that deepcopy re-applies pact to the copy


def apply(model: nn.Module, config: Any = None, *, method: Any = None, **overrides: Any) -> nn.Module:
    """Install token reduction on ``model`` in place and return it.

    Args:
        model: a supported Hugging Face VLM (``*ForConditionalGeneration``; see ``pact.models``).
        config: a ``PactConfig``, a mapping, a JSON path or config name, or None for the defaults;
            ``overrides`` are applied on top (any accepted key name), as in ``pact.load_config``.
        method: a ``pact.methods.Method`` instance to use instead of the one the config selects
            (for custom methods and tests); it still reads ``config`` for the layer(s).
    Raises:
        TypeError: ``model`` is not a torch module, or ``method`` is not a ``pact.methods.Method``.
        ValueError: unsupported model class, method combination or attention backend (e.g.
            FlashAttention with proportional attention), or a reduction layer beyond the model.
    """
    from pact.config import PactConfig, load_config
    from pact.methods.base import Method, build_method

    if not isinstance(model, nn.Module):
        raise TypeError(
            f"pact.apply: model must be a Hugging Face VLM (torch nn.Module), got {type(model).__name__}"
        )
    given_method = method
    if method is not None and not isinstance(method, Method):
        raise TypeError(
            f"pact.apply: method must be a pact.methods.Method instance or None, got {type(method).__name__} "
            f"{method!r}; to select a bundled method by name use the config keys `pruning` and "
            "`clustering` (e.g. pact.apply(model, 'fastv')), listed by `pact methods`"
        )
    cfg = config if isinstance(config, PactConfig) and not overrides else load_config(config, **overrides)
    adapter = get_adapter(model)
    if not cfg.reduction:
        method = None
    elif method is None:
        method = build_method(cfg)
    if method is not None:
        adapter.check_supported()  # structure the adapter cannot model: refuse, never compute wrong q/k
        method.layers(len(adapter.layers))  # validates the layer index early
    check_attention_backend(adapter, cfg, method)
    remove(model)
    engine = Engine(model, adapter, cfg, method)
    engine.install()
    object.__setattr__(model, _ATTR, engine)
    object.__setattr__(model, _GIVEN_METHOD, given_method)
    # The hooks are bound to this engine and this model's modules, and the engine's masks and
    # positions are per-call state of this instance: a plain deepcopy would duplicate hooks that
    # point at the wrong objects. Copy the stock model instead and apply pact to the copy.
    object.__setattr__(model, _DEEPCOPY, lambda memo: _deepcopy_applied(model, memo))
    return model


def _deepcopy_applied(model: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy`` of a model with pact applied: a copy of the stock model, same config applied."""
    engine: Engine = model.__dict__[_ATTR]
    given = model.__dict__.get(_GIVEN_METHOD)
    state, fast_sdpa = engine.state, engine.fast_sdpa
    _detach(model)
    engine.remove()
    try:
        clone = copy.deepcopy(model, memo)
    finally:
        # Back to exactly what it was, the last call's stats included.
        engine.install()
        engine.state = state
        object.__setattr__(model, _ATTR, engine)
        object.__setattr__(model, _GIVEN_METHOD, given)
        object.__setattr__(model, _DEEPCOPY, lambda memo: _deepcopy_applied(model, memo))
    # A user-given method is copied along (its references to model modules map to the copy's);
    # otherwise the copy builds its own method from the config, as apply does.
    apply(clone, engine.config, method=copy.deepcopy(given, memo) if given is not None else None)
    if not fast_sdpa:
        engine_of(clone).set_fast_sdpa(False)
    return clone


def _detach(model: nn.Module) -> Engine | None:
    """Remove pact's attributes from ``model`` (not the hooks); returns the engine or None."""
    model.__dict__.pop(_GIVEN_METHOD, None)
    model.__dict__.pop(_DEEPCOPY, None)
    return model.__dict__.pop(_ATTR, None)


def remove(model: nn.Module) -> nn.Module:
    """Remove pact's hooks from ``model`` (no-op if none); the model is then the stock model."""
    engine = _detach(model)
    if engine is not None:
        engine.remove()
    return model


def stats(model: nn.Module) -> ReductionStats:
    """Reduction statistics of the last prefill of ``model``.

    Raises:
        ValueError: pact is not applied to ``model``.
    """
    engine = model.__dict__.get(_ATTR)
    if engine is None:
        raise ValueError(
            f"pact is not applied to this {type(model).__name__}; call pact.apply(model, cfg) first"
        )
    return engine.stats()


def engine_of(model: nn.Module) -> Engine | None:
    """The engine attached to ``model`` (for tests and tools), or None."""
    return model.__dict__.get(_ATTR)


__all__ = ["ReductionRecord", "ReductionStats", "apply", "engine_of", "remove", "stats"]
