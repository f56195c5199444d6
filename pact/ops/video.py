"""Pure tensor algorithms of the video methods (EVS, HoliTom): no transformers import, no model
knowledge. A video here is a (F, S, D) tensor: F frames of S tokens each (a frame's row-major grid
flattened), D features; every score and similarity is computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pact.ops.scoring import topk_indices

__all__ = [
    "EVS_FIRST_FRAME_SCORE",
    "evs_dissimilarity",
    "evs_keep",
    "evs_retained_count",
]

EVS_FIRST_FRAME_SCORE = 255.0
"""EVS score of every first-frame token: above any cosine dissimilarity (at most 2), so the first
frame is always kept (the value vLLM's ``compute_retention_mask`` uses)."""


def evs_dissimilarity(frames: torch.Tensor) -> torch.Tensor:
    """EVS score of every token of one video: 1 - cosine similarity with the token at the same
    spatial position in the previous frame; first-frame tokens get ``EVS_FIRST_FRAME_SCORE``.

    Args:
        frames: (F, S, D) the video's token features, frame by frame (any float dtype).
    Returns:
        float32 (F, S).
    """
    if frames.dim() != 3:
        raise ValueError(f"frames must be (F, S, D), got shape {tuple(frames.shape)}")
    x = frames.detach().float()
    first = torch.full_like(x[:1, :, 0], EVS_FIRST_FRAME_SCORE)
    if x.shape[0] < 2:
        return first
    # torch's cosine_similarity clamps the norms at eps = 1e-8 (as vLLM's call does): a zero
    # vector has similarity 0, dissimilarity 1.
    dissimilarity = 1.0 - F.cosine_similarity(x[1:], x[:-1], dim=-1)
    return torch.cat([first, dissimilarity], dim=0)


def evs_retained_count(tokens_per_frame: int, num_frames: int, pruning_rate: float) -> int:
    """Tokens EVS keeps of a video: ``int(F * S * (1 - q))``, but never fewer than one frame's S
    (the first frame is always kept whatever the rate q)."""
    if not 0.0 <= pruning_rate < 1.0:
        raise ValueError(f"pruning_rate must be in [0, 1), got {pruning_rate}")
    return max(int(tokens_per_frame), int(tokens_per_frame * num_frames * (1.0 - pruning_rate)))


def evs_keep(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Ascending flat indices (frame-major) of the ``count`` highest EVS scores of one video.

    Ties go to the lower flat index (earlier frame, then earlier position), the order of vLLM's
    stable descending argsort.

    Args:
        scores: (F, S) from ``evs_dissimilarity``. count: in [0, F * S].
    Returns:
        LongTensor (count,).
    """
    return topk_indices(scores.reshape(-1), int(count))
