"""Visual-token grids for methods: ``Group`` and ``sample_groups(signals)``.

The family-specific derivation lives in the adapters (``pact.models``: ``visual_groups`` /
``position_groups``, helpers in ``pact.models.groups``); methods read it through
``Signals.groups()``. This module keeps the names methods import.
"""

from __future__ import annotations

from pact.methods.base import Signals
from pact.models.groups import Group

__all__ = ["Group", "sample_groups"]


def sample_groups(signals: Signals) -> list[Group]:
    """The grids of the sample's ORIGINAL visual tokens: ``signals.groups()``.

    Raises ValueError for a layout that cannot be derived (the message names the family).
    """
    return signals.groups()
