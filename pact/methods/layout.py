"""Visual-token grids for methods: ``Group`` and ``sample_groups(signals)``.

The family-specific derivation lives in the adapters (``pact.models``: ``visual_groups`` /
``position_groups``, helpers in ``pact.models.groups``); methods read it through
``Signals.groups()``. This module keeps the names methods import.
"""

from __future__ import annotations

from pact.methods.base import Signals
from pact.models.groups import Group

__all__ = ["Group", "full_grids", "sample_groups"]


def sample_groups(signals: Signals) -> list[Group]:
    """The grids of the sample's ORIGINAL visual tokens: ``signals.groups()``.

    Raises ValueError for a layout that cannot be derived (the message names the family).
    """
    return signals.groups()


def full_grids(signals: Signals, needs: str) -> list[Group]:
    """``sample_groups(signals)`` for a method that reads whole grids, so it must be the sample's first
    reduction: ValueError naming the method's need (``needs``, e.g. "evs needs the full frame grids")
    when earlier reductions left fewer visual tokens than the grids hold."""
    groups = sample_groups(signals)
    total = sum(g.size for g in groups)
    if total != signals.num_visual:
        raise ValueError(
            f"{needs}: it must be the first reduction of the sample "
            f"(got {signals.num_visual} visual tokens for grids of {total})"
        )
    return groups
