"""Spatial pooling: the simplest merging control (average each stride x stride window of the patch grid)."""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["grid_pool"]


def grid_pool(
    n_rows: int,
    n_cols: int,
    stride: int | tuple[int, int],
    placement: Literal["first", "center"] = "first",
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge every stride x stride window of a row-major (n_rows, n_cols) token grid into one token.

    Windows start at (0, 0) and tile the grid; windows on the bottom/right edges are smaller when the
    stride does not divide the grid (ragged edges are kept, not dropped). The merged token takes the
    slot (and so the position id) of the window's first token (top-left, ``placement="first"``) or of
    its central token (``"center"``: row/col offset ``(h-1)//2``, ``(w-1)//2`` within a window of
    h x w tokens, i.e. the upper-left of the four middle tokens of an even window). Build the merged
    hidden states (window means) with ``tome.merge_reduction(hidden, kept, labels)``.

    Args:
        n_rows, n_cols: grid shape; the N = n_rows * n_cols tokens are in row-major order.
        stride: window size, an int or (row_stride, col_stride), each >= 1.
        placement: "first" or "center".
        device: device of the returned tensors.
    Returns:
        kept: LongTensor[R] ascending, R = ceil(n_rows/sr) * ceil(n_cols/sc).
        labels: LongTensor[N], index into ``kept`` of each token's window.
    """
    sr, sc = (stride, stride) if isinstance(stride, int) else stride
    if sr < 1 or sc < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if n_rows < 0 or n_cols < 0:
        raise ValueError(f"grid shape must be non-negative, got ({n_rows}, {n_cols})")
    if placement not in ("first", "center"):
        raise ValueError(f"placement must be 'first' or 'center', got {placement!r}")
    rows = torch.arange(n_rows, device=device)
    cols = torch.arange(n_cols, device=device)
    win_r, win_c = rows // sr, cols // sc
    n_wc = -(-n_cols // sc)
    labels = (win_r[:, None] * n_wc + win_c[None, :]).reshape(-1)

    def anchor(n: int, s: int) -> torch.Tensor:
        start = torch.arange(0, n, s, device=device)
        if placement == "first":
            return start
        size = torch.clamp(n - start, max=s)  # ragged last window
        return start + (size - 1) // 2

    ar, ac = anchor(n_rows, sr), anchor(n_cols, sc)
    kept = (ar[:, None] * n_cols + ac[None, :]).reshape(-1)  # row-major over windows: ascending
    return kept, labels
