"""Reduction methods: one file per method family, each registering its (pruning, clustering) pairs.

``build_method(cfg)`` returns the method selected by ``cfg.pruning`` / ``cfg.clustering``. To add a
method, write a file here with a ``Method`` subclass decorated by ``@register(pruning, clustering)``
and import it below.
"""

from pact.methods import clustering as _clustering  # noqa: F401  (k-means, agglomerative, DPC, DBSCAN)
from pact.methods import controls as _controls  # noqa: F401  (random, norm, pooling)
from pact.methods import custom_method as _custom_method  # noqa: F401  (custom hooks)
from pact.methods import fastv as _fastv  # noqa: F401  (FastV)
from pact.methods import pact as _pact  # noqa: F401  (registers PACT and its ablations)
from pact.methods import tome as _tome  # noqa: F401  (ToMe)
from pact.methods import vision as _vision  # noqa: F401  (VisPruner, PruMerge, HiRED)
from pact.methods import vtw as _vtw  # noqa: F401  (VTW)
from pact.methods.base import REGISTRY, Method, Signals, build_method, register
from pact.methods.listing import main  # noqa: F401  (`pact methods`)

__all__ = ["REGISTRY", "Method", "Signals", "build_method", "register"]
