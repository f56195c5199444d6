"""pact: training-free visual-token reduction (PACT, CVPR 2025, and its baselines) on stock
Hugging Face vision-language models.

    import pact
    cfg = pact.load_config("configs/pact.json", layer_for_reduction=2)
    pact.apply(model, cfg)
    out = model.generate(**inputs)
    print(pact.stats(model))
    pact.remove(model)

The public names are imported on first use, so `import pact` (and `pact --help`) does not pay for
torch and transformers until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from pact.api import ReductionRecord, ReductionStats, apply, remove, stats
    from pact.config import PactConfig, load_config

# public name -> module that defines it
_LAZY = {
    "ReductionRecord": "pact.api",
    "ReductionStats": "pact.api",
    "apply": "pact.api",
    "remove": "pact.api",
    "stats": "pact.api",
    "PactConfig": "pact.config",
    "load_config": "pact.config",
}

__all__ = ["PactConfig", "ReductionRecord", "ReductionStats", "apply", "load_config", "remove", "stats"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pact' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
