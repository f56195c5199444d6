"""pact: training-free visual-token reduction (PACT, CVPR 2025, and its baselines) on stock
Hugging Face vision-language models.

    import pact
    cfg = pact.load_config("configs/pact.json", layer_for_reduction=2)
    pact.apply(model, cfg)
    out = model.generate(**inputs)
    print(pact.stats(model))
    pact.remove(model)
"""

from pact.api import ReductionRecord, ReductionStats, apply, remove, stats
from pact.config import PactConfig, load_config

__all__ = ["PactConfig", "ReductionRecord", "ReductionStats", "apply", "load_config", "remove", "stats"]
__version__ = "0.1.0"
