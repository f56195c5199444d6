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
        order: optional LongTensor[R], a permutation of range(R): the kept tokens are placed in the
            sequence in this order (``kept[order[0]]`` first, in the slots the kept visual tokens
            occupy). None: sequence order. ``kept`` still says WHICH tokens stay (strictly increasing);
            ``order`` only says where they go (e.g. PruMerge's attention-descending output).
        extra: optional Tensor[E, D], hidden states of E new tokens placed right after the sample's
            kept visual tokens (e.g. PruMerge's attention-weighted sum of the pruned tokens). Each has
            size 1 and represents no original token (``labels`` never point to it). With
            ``position_mode="renumber"`` they get the next contiguous positions; with center/mean the
            position of the kept visual token right before them.
        drop_removable: also remove the sample's *removable* non-candidate slots in this step: the
            slots inside its visual spans that the model family marks as removable
            (``ModelAdapter.removable_mask``: LLaVA-NeXT / -OneVision image newlines). They are no
            visual tokens (``kept``/``labels`` never index them); a removed slot is represented, like
            a dropped token, by the nearest kept token before it. False: they stay (the default).
    """

    kept: torch.Tensor
    sizes: torch.Tensor
    hidden: torch.Tensor | None
    labels: torch.Tensor
    scores: torch.Tensor | None = None
    order: torch.Tensor | None = None
    extra: torch.Tensor | None = None
    drop_removable: bool = False

    @property
    def num_kept(self) -> int:
        return int(self.kept.numel())

    @property
    def num_extra(self) -> int:
        """E, the number of new tokens (0 without ``extra``)."""
        return 0 if self.extra is None else int(self.extra.shape[0])

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
        if self.order is not None:
            order = self.order
            if order.shape != kept.shape or order.dtype != torch.long:
                raise ValueError(
                    f"Reduction.order must be a LongTensor of shape ({kept.numel()},) (a permutation of "
                    f"range({kept.numel()})), got {tuple(order.shape)} {order.dtype}"
                )
            if order.numel() and not torch.equal(torch.sort(order).values.cpu(), torch.arange(order.numel())):
                raise ValueError(f"Reduction.order must be a permutation of range({kept.numel()})")
        if not isinstance(self.drop_removable, bool):
            raise ValueError(
                f"Reduction.drop_removable must be a bool, got {type(self.drop_removable).__name__}"
            )
        if self.extra is not None:
            extra = self.extra
            if extra.dim() != 2 or not extra.is_floating_point():
                raise ValueError(
                    f"Reduction.extra must be a floating Tensor of shape (E, D), got {tuple(extra.shape)} "
                    f"{extra.dtype}"
                )
            if hidden_dim is not None and extra.shape[1] != hidden_dim:
                raise ValueError(f"Reduction.extra has width {extra.shape[1]}, model has {hidden_dim}")
            if not bool(torch.isfinite(extra).all()):
                raise ValueError("Reduction.extra has non-finite (NaN/inf) values")


def identity_reduction(num_visual: int, device: torch.device | str = "cpu") -> Reduction:
    """A reduction that keeps every token unchanged (size 1)."""
    idx = torch.arange(num_visual, device=device)
    return Reduction(kept=idx, sizes=torch.ones(num_visual, device=device), hidden=None, labels=idx.clone())
