"""The record every reduction method returns and the engine applies.

A `Reduction` describes, for ONE sample at ONE decoder layer, what becomes of that sample's
current visual tokens (indexed 0..N-1 in sequence order). It says nothing about masks, caches or
rotary embeddings: the engine derives those from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Reduction:
    """What remains of one sample's N visual tokens after a reduction step.

    Attributes:
        kept: LongTensor[R], strictly increasing indices in [0, N) of the visual tokens that stay in
            the sequence. A merged cluster stays at its center's slot and keeps the center's
            position id (1-D or M-RoPE triple). R may be 0 (every visual token removed).
        sizes: FloatTensor[R] (float32), how many original tokens each kept token now stands for
            (>= 1). Proportional attention adds log(sizes) to that key's attention logits.
        hidden: Tensor[R, D] or None. Replacement hidden states for the kept tokens (cluster means,
            accumulated in float32 and cast to the model dtype by the engine); None means the kept
            tokens keep their own hidden states (pure pruning).
        labels: LongTensor[N], for each visual token the index into `kept` of the token that
            represents it, or -1 if it was dropped. For kept token r, labels[kept[r]] == r.
        scores: optional FloatTensor[N] importance scores (for plots and debugging).
        order: optional LongTensor[R], a permutation of range(R): the kept visual tokens are placed
            in the sequence in that order (``kept[order[0]]`` first); None = sequence order. ``kept``
            itself stays strictly increasing. (Vision-side methods whose official code emits the
            tokens in attention order, e.g. PruMerge.)
        extra: optional Tensor[E, D], hidden states of E new tokens placed right after the sample's
            kept visual tokens, each of size 1 and representing no original token (PruMerge's
            attention-weighted sum of the pruned tokens).
    """

    kept: torch.Tensor
    sizes: torch.Tensor
    hidden: torch.Tensor | None
    labels: torch.Tensor
    scores: torch.Tensor | None = None
    order: torch.Tensor | None = None
    extra: torch.Tensor | None = None

    @property
    def num_kept(self) -> int:
        return int(self.kept.numel())

    def validate(self, num_visual: int, hidden_dim: int | None = None) -> None:
        """Raise ValueError if the record is inconsistent (a method bug, never silently applied)."""
        kept, sizes, labels = self.kept, self.sizes, self.labels
        if kept.dim() != 1 or kept.dtype != torch.long:
            raise ValueError(f"Reduction.kept must be a 1-D LongTensor, got {tuple(kept.shape)} {kept.dtype}")
        if labels.shape != (num_visual,) or labels.dtype != torch.long:
            raise ValueError(
                f"Reduction.labels must be a LongTensor of shape ({num_visual},), got "
                f"{tuple(labels.shape)} {labels.dtype}"
            )
        if sizes.shape != kept.shape:
            raise ValueError(f"Reduction.sizes shape {tuple(sizes.shape)} != kept shape {tuple(kept.shape)}")
        if kept.numel():
            if int(kept.min()) < 0 or int(kept.max()) >= num_visual:
                raise ValueError(f"Reduction.kept has indices outside [0, {num_visual})")
            if kept.numel() > 1 and not bool((kept[1:] > kept[:-1]).all()):
                raise ValueError("Reduction.kept must be strictly increasing")
            if bool((sizes < 1).any()):
                raise ValueError("Reduction.sizes must be >= 1")
        if self.hidden is not None:
            if self.hidden.dim() != 2 or self.hidden.shape[0] != kept.numel():
                raise ValueError(
                    f"Reduction.hidden must have shape ({kept.numel()}, D), got {tuple(self.hidden.shape)}"
                )
            if hidden_dim is not None and self.hidden.shape[1] != hidden_dim:
                raise ValueError(f"Reduction.hidden has width {self.hidden.shape[1]}, model has {hidden_dim}")


def identity_reduction(num_visual: int, device: torch.device | str = "cpu") -> Reduction:
    """A reduction that keeps every token unchanged (size 1)."""
    idx = torch.arange(num_visual, device=device)
    return Reduction(kept=idx, sizes=torch.ones(num_visual, device=device), hidden=None, labels=idx.clone())
