"""Proportional attention and the 4-D additive masks of the layers that see a reduced sequence.

A merged token of size s stands for s tokens. Adding log(s) to its attention logit makes every
query weigh it exactly as if its key/value pair appeared s times:
exp(q.k / sqrt(d) + log s) = s * exp(q.k / sqrt(d)).
"""

from __future__ import annotations

import torch


def proportional_bias(sizes: torch.Tensor) -> torch.Tensor:
    """log(size) per key, float32, same shape as `sizes` (>= 1; size 1 gives bias 0)."""
    return torch.log(sizes.float())


def build_attention_mask(key_bias: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Causal + padding + per-key bias mask for SDPA / eager attention.

    Args:
        key_bias: (B, K) float32, per key: 0 for an ordinary token, log(size) for a merged token,
            -inf for a padding slot.
        q_len: number of queries; they are the LAST q_len of the K keys (prefill: q_len == K;
            decoding: q_len == 1 and K the cache length), so query r sits at key position K - q_len + r.
        dtype: dtype of the returned mask (the attention's compute dtype).

    Returns:
        (B, 1, q_len, K) additive mask: key_bias[b, j] where key j is at or before the query, -inf
        after it. A query row that would be entirely -inf (a padding query: it sees only padding)
        gets 0 on its own diagonal entry instead, so softmax never sees an all -inf row (SDPA would
        return NaN there, and NaN leaks through V into real tokens in later layers).
    """
    if key_bias.dim() != 2:
        raise ValueError(f"key_bias must be (B, K), got {tuple(key_bias.shape)}")
    K = key_bias.shape[1]
    if not 1 <= q_len <= K:
        raise ValueError(f"q_len must be in [1, K={K}], got {q_len}")
    offset = K - q_len
    device = key_bias.device
    query_pos = torch.arange(offset, K, device=device)
    future = torch.arange(K, device=device)[None, :] > query_pos[:, None]  # (q_len, K)
    mask = key_bias.float()[:, None, None, :].masked_fill(future, float("-inf"))  # (B, 1, q_len, K)
    dead = torch.isneginf(mask).all(dim=-1)  # (B, 1, q_len)
    # The diagonal of the trailing (q_len, q_len) block is each query's own key.
    mask[..., offset:].diagonal(dim1=-2, dim2=-1).masked_fill_(dead, 0.0)
    return mask.to(dtype)


# --- Masks with image blocks and sliding windows (Gemma 3) -------------------------------------------


def build_block_window_mask(
    key_bias: torch.Tensor,
    key_block: torch.Tensor,
    key_position: torch.Tensor,
    q_len: int,
    window: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Additive mask of a layer whose stock pattern is "causal OR same image block", optionally AND a
    sliding window (Gemma 3: full layers OR(causal, block); sliding layers AND(window, OR(causal,
    block))), on any (reduced, left-padded) layout.

    The pattern is stated in terms of what each key *is*, not where its row sits, so that it applies
    unchanged to a reduced layout: causality is by row order (kept tokens keep their order), the
    block rule by the original image block of each key, the window by each key's rotary position
    (``key_position``: the original position under the default ``position_mode``, so a reduced
    sliding layer attends only to pairs the stock layer attended to; under ``renumber`` the reduced
    sequence's contiguous positions, i.e. rows).

    Args:
        key_bias: (B, K) float32 per-key bias: 0 or log(size), -inf for padding.
        key_block: (B, K) long, the image block of each key (>= 0), -1 for text and padding. Keys of
            one block attend to each other in both directions.
        key_position: (B, K) long, the position the window is measured in.
        q_len: the queries are the LAST q_len of the K keys.
        window: sliding window W (a key is visible when ``position(key) > position(query) - W``, the
            stock ``sliding_window_overlay``: a lower bound only), or None for a full layer.
        dtype: dtype of the returned mask.

    Returns:
        (B, 1, q_len, K) additive mask: key_bias where visible, -inf elsewhere; a query row that
        would be all -inf gets 0 on its own key (see ``build_attention_mask``).
    """
    if key_bias.dim() != 2:
        raise ValueError(f"key_bias must be (B, K), got {tuple(key_bias.shape)}")
    if key_block.shape != key_bias.shape or key_position.shape != key_bias.shape:
        raise ValueError(
            f"key_block {tuple(key_block.shape)} and key_position {tuple(key_position.shape)} must have "
            f"key_bias's shape {tuple(key_bias.shape)}"
        )
    K = key_bias.shape[1]
    if not 1 <= q_len <= K:
        raise ValueError(f"q_len must be in [1, K={K}], got {q_len}")
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of positions or None, got {window}")
    offset = K - q_len
    device = key_bias.device
    query_row = torch.arange(offset, K, device=device)
    causal = torch.arange(K, device=device)[None, :] <= query_row[:, None]  # (q_len, K)
    q_block = key_block[:, offset:]  # (B, q_len)
    same_block = (q_block[:, :, None] == key_block[:, None, :]) & (q_block[:, :, None] >= 0)  # (B, q, K)
    visible = causal[None] | same_block
    if window is not None:
        q_pos = key_position[:, offset:]
        visible &= key_position[:, None, :] > q_pos[:, :, None] - window
    mask = key_bias.float()[:, None, :].expand(-1, q_len, -1).masked_fill(~visible, float("-inf"))
    mask = mask[:, None].contiguous()  # (B, 1, q_len, K)
    dead = torch.isneginf(mask).all(dim=-1)
    mask[..., offset:].diagonal(dim1=-2, dim2=-1).masked_fill_(dead, 0.0)
    return mask.to(dtype)
