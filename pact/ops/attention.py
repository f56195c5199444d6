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
