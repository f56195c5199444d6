"""Custom hooks used by tests/test_methods_*.py through "module:function" config strings."""

from __future__ import annotations

import torch


def first_tokens_first(k_image: torch.Tensor, q_image: torch.Tensor) -> torch.Tensor:
    """Reference-style (two positional arguments, (1, P) result): earlier tokens score higher."""
    p = k_image.shape[2]
    return -torch.arange(p, dtype=torch.float32)[None]


def merge_all_into_first(hidden, features, *, pruned_hidden=None, **context):
    """Every candidate and every pruned token joins candidate 0."""
    n = hidden.shape[0]
    m = 0 if pruned_hidden is None else pruned_hidden.shape[0]
    return torch.tensor([0]), torch.zeros(n + m, dtype=torch.long)


def bad_labels(hidden, features, **context):
    """Returns float labels: must be refused with a clear message."""
    return torch.tensor([0]), torch.zeros(hidden.shape[0])


def reference_style_reduction(image_feature, image_feature_for_reduction, position_ids=None, cutoff=0):
    """The reference's return format (features, mask, weights, position_ids): refused with a hint."""
    n = image_feature.shape[0]
    return image_feature, torch.ones(n, dtype=torch.bool), torch.ones(n), position_ids
