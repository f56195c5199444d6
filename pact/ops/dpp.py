"""Conditional determinantal point process (CDPruner, NeurIPS'25): relevance-weighted similarity
kernel and its greedy MAP inference in the fast Cholesky-update form (Chen et al., NeurIPS'18, the
"Fast-MAP-DPP" the official code follows).

Kernel over N tokens with unit feature rows x_i and relevances r_i:
``L_ij = r_i * cos(x_i, x_j) * r_j`` (``diag(r) S diag(r)``). Greedy MAP adds, T times, the token
whose inclusion multiplies ``det(L_S)`` the most, i.e. the largest conditional variance
``d_j^2 = L_jj - ||c_j||^2``; after choosing j every token's Cholesky row grows by
``e_i = (L_ji - <c_j, c_i>) / d_j`` and ``d_i^2 -= e_i^2``.

The kernel is never stored: row j is ``r_j * r * (X x_j)`` (one matrix-vector product), so memory
is O(T N) for the Cholesky rows instead of O(N^2). Everything is float32; ties go to the lower index
(``argmax``'s first maximum, the official code's rule).
"""

from __future__ import annotations

import torch

from pact.ops.dbdpc import normalize_rows
from pact.ops.scoring import check_finite

__all__ = ["dpp_greedy_map", "instruction_relevance", "relevance_weights"]

_EPS = 1e-10  # conditional variances at or below this are exhausted (the kernel's rank is reached)


def instruction_relevance(visual: torch.Tensor, text: torch.Tensor, negate: bool = False) -> torch.Tensor:
    """CDPruner's relevance of each visual token to the instruction, min-max normalised.

    ``rel_i = mean_m cos(v_i, t_m)`` (``-mean`` with ``negate``, as the official code does with CLIP
    patch and text embeddings), then ``(rel - min + 1e-6) / (max - min)`` (the official
    normalisation; all ones when every relevance is equal, where the official division is 0/0).

    Args:
        visual: (N, D) visual token features. text: (M, D) instruction token features (M >= 1).
        negate: negate the mean cosine (official, for CLIP patch-text similarities).
    Returns:
        float32 (N,).
    """
    if visual.dim() != 2 or text.dim() != 2 or visual.shape[1] != text.shape[1]:
        raise ValueError(
            f"expected visual (N, D) and text (M, D), got {tuple(visual.shape)}, {tuple(text.shape)}"
        )
    if text.shape[0] == 0:
        raise ValueError("instruction_relevance needs at least one instruction token")
    check_finite(visual=visual, text=text)
    rel = (normalize_rows(visual.detach()) @ normalize_rows(text.detach()).T).mean(dim=1)
    if negate:
        rel = -rel
    if rel.numel() == 0:
        return rel
    span = rel.max() - rel.min()
    if float(span) <= 0.0:
        return torch.ones_like(rel)
    return (rel - rel.min() + 1e-6) / span


def relevance_weights(relevance: torch.Tensor, theta: float | None = None) -> torch.Tensor:
    """The per-token factor of the kernel: the relevance itself (``theta=None``, the official code
    path) or ``exp(alpha * relevance)`` with ``alpha = theta / (2 (1 - theta))`` (the official code's
    commented-out variant: theta in [0, 1) trades relevance against diversity)."""
    if theta is None:
        return relevance.float()
    if not 0.0 <= theta < 1.0:
        raise ValueError(f"theta must be in [0, 1), got {theta}")
    return torch.exp(theta / (2.0 * (1.0 - theta)) * relevance.float())


def dpp_greedy_map(features: torch.Tensor, quality: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP of the DPP with kernel ``L = diag(q) X X^T diag(q)``, X = unit rows of ``features``.

    Args:
        features: (N, D) token features (normalised here; cosine similarity).
        quality: (N,) non-negative per-token factor q (the relevance weights).
        k: tokens to select (clamped to [0, N]).
    Returns:
        LongTensor[k] selected indices in selection order. Once every remaining conditional variance
        is exhausted (the kernel's rank is reached: duplicate or zero tokens) the remaining picks
        follow the largest remaining variance, ties to the lower index, without a Cholesky update
        (the official code divides by zero there).
    """
    if features.dim() != 2 or quality.dim() != 1 or quality.shape[0] != features.shape[0]:
        raise ValueError(
            f"expected features (N, D) and quality (N,), got {tuple(features.shape)}, {tuple(quality.shape)}"
        )
    check_finite(features=features, quality=quality)
    n = features.shape[0]
    k = max(0, min(int(k), n))
    x = normalize_rows(features.detach())
    q = quality.detach().float()
    device = x.device
    chol = torch.zeros(k, n, device=device)  # c_i rows, one per selected token
    d2 = q * q * (x * x).sum(dim=1)  # L_ii
    chosen = torch.empty(k, dtype=torch.long, device=device)
    taken = torch.zeros(n, dtype=torch.bool, device=device)
    for i in range(k):
        j = torch.argmax(d2)
        chosen[i] = j
        dj = d2[j]
        row = q[j] * q * (x @ x[j])  # L_j.
        e = (row - chol[:i, j] @ chol[:i]) / torch.sqrt(dj.clamp(min=_EPS))
        e = torch.where(dj > _EPS, e, torch.zeros_like(e))  # exhausted: no further conditioning
        chol[i] = e
        taken[j] = True
        d2 = torch.where(taken, torch.full_like(d2, -float("inf")), d2 - e * e)
    return chosen
