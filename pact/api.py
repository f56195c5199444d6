"""Public API: ``apply``, ``remove``, ``stats``.

    import pact
    cfg = pact.load_config("configs/pact.json", layer_for_reduction=2)
    pact.apply(model, cfg)          # in place; per-instance hooks only; returns model
    out = model.generate(**inputs)
    st = pact.stats(model)          # the last prefill: visual_before/after per sample, layers, seconds
    pact.remove(model)              # back to the stock model, bit for bit

Applying to a model that already has pact applied REPLACES the previous configuration (the old
hooks are removed first), so ``apply`` can be called again to change settings between runs.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pact.engine import Engine, ReductionRecord, ReductionStats, check_attention_backend
from pact.models import get_adapter

_ATTR = "_pact_engine"


def apply(model: nn.Module, config: Any = None, *, method: Any = None, **overrides: Any) -> nn.Module:
    """Install token reduction on ``model`` in place and return it.

    Args:
        model: a supported Hugging Face VLM (``*ForConditionalGeneration``; see ``pact.models``).
        config: a ``PactConfig``, a mapping, a JSON path or config name, or None for the defaults;
            ``overrides`` are applied on top (any accepted key name), as in ``pact.load_config``.
        method: a ``pact.methods.Method`` instance to use instead of the one the config selects
            (for custom methods and tests); it still reads ``config`` for the layer(s).
    Raises:
        ValueError: unsupported model class, method combination or attention backend (e.g.
            FlashAttention with proportional attention), or a reduction layer beyond the model.
    """
    from pact.config import PactConfig, load_config
    from pact.methods.base import build_method

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
    return model


def remove(model: nn.Module) -> nn.Module:
    """Remove pact's hooks from ``model`` (no-op if none); the model is then the stock model."""
    engine = model.__dict__.pop(_ATTR, None)
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
