"""VisionZip (CVPR'25): dominant tokens by vision-encoder attention, contextual tokens by merging the
rest on key similarity, for ONE encoder image (crop).

The official rule (``dvlab-research/VisionZip``, ``visionzip/clip_encoder.py``, on the select layer
of the CLIP tower, i.e. layer -2):

* **Dominant**: the ``n_dominant`` patches with the highest [CLS] attention summed over heads (the
  encoders without [CLS] of the Qwen2.5-VL port: the attention each patch receives). Kept with
  their own features, in index order.
* **Contextual**: the other R patches, in index order, compared by the cosine of that layer's keys
  averaged over heads. Targets are R-index ``0, s, 2s, ...`` with ``s = max(1, R // n_contextual)``
  (the first ``n_contextual`` of them); every other remaining patch joins the target of highest
  cosine (ties -> the first target, as ``argmax``); a contextual token is
  ``h_target + mean(h_members)`` (the official sum: the target's own features plus the members'
  plain mean, the mean being 0 for a target without members).
* Output order: the dominant tokens, then the contextual tokens in target order.

Everything is float32 here (the official code runs in the model dtype); top-k ties go to the lower
index (the official ``topk`` leaves them unspecified).
"""

from __future__ import annotations

import torch

from pact.ops.dbdpc import normalize_rows
from pact.ops.reduction import Reduction
from pact.ops.scoring import check_finite

__all__ = ["visionzip_counts", "visionzip_crop"]


def visionzip_counts(total: int, contextual_ratio: float) -> tuple[int, int]:
    """(dominant, contextual) counts of an image that keeps ``total`` tokens:
    ``contextual = int(total * contextual_ratio)`` (10 of 64 at the official 0.15625, 20 of 128,
    30 of 192), the rest dominant."""
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    if not 0.0 <= contextual_ratio <= 1.0:
        raise ValueError(f"contextual_ratio must be in [0, 1], got {contextual_ratio}")
    contextual = int(total * contextual_ratio)
    return total - contextual, contextual


def visionzip_crop(
    attn: torch.Tensor,
    keys: torch.Tensor,
    features: torch.Tensor,
    n_dominant: int,
    n_contextual: int,
    merge_mean: bool = True,
) -> tuple[Reduction, torch.Tensor]:
    """VisionZip on the N patches of one encoder image.

    Args:
        attn: (N,) dominant score ([CLS] attention summed over heads, or the substitute).
        keys: (N, d) keys of the attention layer averaged over heads (the similarity metric).
        features: (N, F) the features that are merged (official: the select layer's outputs).
        n_dominant: dominant tokens (clamped to [0, N]).
        n_contextual: contextual tokens (clamped to [0, N - dominant]).
        merge_mean: contextual token = ``h_target + mean(h_members)`` (official); False: the target
            keeps its own features.
    Returns:
        (Reduction over the N patches, BoolTensor[R] True at the contextual kept tokens). ``kept``
        ascending; ``order`` puts the dominant tokens first, then the contextual ones (both in index
        order); ``hidden`` (R, F) float32 = the features of every kept token (merged for the
        contextual ones); ``labels`` map each merged patch to its contextual token; ``sizes`` =
        1 + members; ``scores`` = ``attn``.
    """
    if attn.dim() != 1:
        raise ValueError(f"attn must be 1-D (N,), got {tuple(attn.shape)}")
    n = attn.numel()
    if keys.dim() != 2 or keys.shape[0] != n or features.dim() != 2 or features.shape[0] != n:
        raise ValueError(
            f"keys and features must have shape ({n}, *), got {tuple(keys.shape)} and {tuple(features.shape)}"
        )
    check_finite(attn=attn, keys=keys)
    device = attn.device
    a = attn.detach().float()
    d = max(0, min(int(n_dominant), n))
    dominant = torch.sort(torch.sort(a, descending=True, stable=True).indices[:d]).values
    is_rest = torch.ones(n, dtype=torch.bool, device=device)
    is_rest[dominant] = False
    rest = is_rest.nonzero().squeeze(1)  # index order, as the official masked_select
    c = max(0, min(int(n_contextual), rest.numel()))
    labels = torch.full((n,), -1, dtype=torch.long, device=device)
    feats = features.float()
    if c > 0:
        step = max(1, rest.numel() // c)
        target_pos = torch.arange(0, rest.numel(), step, device=device)[:c]
        is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=device)
        is_target[target_pos] = True
        metric = normalize_rows(keys.detach()[rest])
        members = (~is_target).nonzero().squeeze(1)
        sim = metric[members] @ metric[target_pos].T  # (M, C)
        choice = sim.argmax(dim=1) if members.numel() else members  # ties -> first target
        ones = torch.ones(members.numel(), device=device)
        counts = torch.zeros(c, device=device).index_add_(0, choice, ones)
        summed = torch.zeros(c, feats.shape[1], device=device).index_add_(0, choice, feats[rest[members]])
        targets = rest[target_pos]
        merged = feats[targets] + summed / counts.clamp(min=1)[:, None] if merge_mean else feats[targets]
    else:
        targets = rest[:0]
        choice = rest[:0]
        members = rest[:0]
        counts = torch.zeros(0, device=device)
        merged = feats[:0]
    kept = torch.sort(torch.cat([dominant, targets])).values
    slot = torch.full((n,), -1, dtype=torch.long, device=device)
    slot[kept] = torch.arange(kept.numel(), device=device)
    labels[kept] = slot[kept]
    if c > 0 and members.numel():
        labels[rest[members]] = slot[targets][choice]
    contextual = torch.zeros(kept.numel(), dtype=torch.bool, device=device)
    contextual[slot[targets]] = True
    hidden = feats[kept].clone()
    hidden[slot[targets]] = merged
    sizes = torch.ones(kept.numel(), device=device)
    sizes[slot[targets]] = 1.0 + counts
    # dominant tokens first, then contextual, each in index order (a stable sort on the flag)
    order = torch.sort(contextual.to(torch.uint8), stable=True).indices
    red = Reduction(kept=kept, sizes=sizes, hidden=hidden, labels=labels, scores=a, order=order)
    return red, contextual
