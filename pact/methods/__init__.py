"""Reduction methods: one file per method family; each declares its names and registers its pairs.

``build_method(cfg)`` returns the method selected by ``cfg.pruning`` / ``cfg.clustering``. To add a
method, write a file here that ``declare``s its name (kind, one-line description, and for a score
pruner its score function) and registers its ``Method`` subclass with ``@register(pruning,
clustering)``; every module of this package is imported below (``pkgutil``), and pairs with every
clusterer (k-means, ..., custom) are resolved at build time. See DESIGN.md, "Adding a method".
"""

import importlib
import pkgutil

from pact.methods.base import REGISTRY, Method, Signals, build_method, declare, register
from pact.methods.listing import main  # noqa: F401  (`pact methods`)


def _import_method_modules() -> None:
    """Import every module of this package so that each declares and registers its methods."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_import_method_modules()

__all__ = ["REGISTRY", "Method", "Signals", "build_method", "declare", "register"]
