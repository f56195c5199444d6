"""Pure tensor algorithms of PACT and its baselines (no transformers import, no model knowledge)."""

from pact.ops.reduction import Reduction, identity_reduction

__all__ = ["Reduction", "identity_reduction"]
