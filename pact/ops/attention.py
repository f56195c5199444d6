"""Proportional attention and the 4-D additive masks of the layers that see a reduced sequence.

A merged token of size s stands for s tokens. Adding log(s) to its attention logit makes every
query weigh it exactly as if its key/value pair appeared s times:
exp(q.k / sqrt(d) + log s) = s * exp(q.k / sqrt(d)).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    visible = visible_keys(
        torch.arange(offset, K, device=device)[None],
        torch.arange(K, device=device)[None],
        query_blocks=key_block[:, offset:],
        key_blocks=key_block,
        query_positions=key_position[:, offset:],
        key_positions=key_position,
        window=window,
    )  # (B, q_len, K)
    mask = key_bias.float()[:, None, :].expand(-1, q_len, -1).masked_fill(~visible, float("-inf"))
    mask = mask[:, None].contiguous()  # (B, 1, q_len, K)
    dead = torch.isneginf(mask).all(dim=-1)
    mask[..., offset:].diagonal(dim1=-2, dim2=-1).masked_fill_(dead, 0.0)
    return mask.to(dtype)


# --- Which keys a query row sees (the rule above, for scoring ops) ----------------------------------


def visible_keys(
    query_rows: torch.Tensor,
    key_rows: torch.Tensor,
    *,
    query_blocks: torch.Tensor | None = None,
    key_blocks: torch.Tensor | None = None,
    query_positions: torch.Tensor | None = None,
    key_positions: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """bool (..., R, K): True where query row r sees key row k under "causal OR same image block, AND
    the sliding window" (the one definition of the pattern; ``build_block_window_mask`` uses it).

    Args:
        query_rows: (..., R) long, the queries' rows in the sequence (causality is by row order).
        key_rows: (..., K) long, the keys' rows.
        query_blocks, key_blocks: (..., R) / (..., K) long image blocks (>= 0; -1 for text and
            padding): a query sees every key of its own block; both None: no blocks (causal).
        query_positions, key_positions: (..., R) / (..., K) long positions the window is measured in
            (needed when ``window`` is given).
        window: W, a key is visible only when ``position(key) > position(query) - W``; None: no window.
    Leading dimensions broadcast.
    """
    visible = key_rows[..., None, :] <= query_rows[..., :, None]
    if (query_blocks is None) != (key_blocks is None):
        raise ValueError("visible_keys: give both query_blocks and key_blocks, or neither")
    if query_blocks is not None:
        qb = query_blocks[..., :, None]
        visible = visible | ((qb == key_blocks[..., None, :]) & (qb >= 0))
    if window is not None:
        if query_positions is None or key_positions is None:
            raise ValueError(f"visible_keys: window={window} needs query_positions and key_positions")
        visible = visible & (key_positions[..., None, :] > query_positions[..., :, None] - window)
    return visible


@dataclass(frozen=True, eq=False)  # tensor fields: no elementwise ==
class Visibility:
    """Which keys each query row of ONE sample sees at one decoder layer, in a form that scales (no
    T x T matrix): key row k is visible to query row t when (k <= t OR ``blocks[k] == blocks[t] >=
    0``) AND (``window`` is None OR ``positions[k] > positions[t] - window``).

    blocks: (T,) long image block of each token (-1: text), or None (no blocks).
    positions: (T,) long positions the window is measured in (the layer's rotary positions), or None
        (then ``window`` must be None).
    window: the layer's sliding window, or None (full layer).

    ``Visibility()`` is plain causal attention (``is_causal``): the scoring ops then keep their
    causal arithmetic exactly.
    """

    blocks: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    window: int | None = None

    def __post_init__(self) -> None:
        if self.window is not None:
            if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
                raise ValueError(f"Visibility: window must be a positive int or None, got {self.window!r}")
            if self.positions is None:
                raise ValueError(f"Visibility: window={self.window} needs the tokens' positions")
        for name in ("blocks", "positions"):
            t = getattr(self, name)
            if t is not None and t.dim() != 1:
                raise ValueError(f"Visibility: {name} must be (T,), got {tuple(t.shape)}")

    @property
    def is_causal(self) -> bool:
        """True when the rule is plain causal attention (no blocks, no window)."""
        return self.blocks is None and self.window is None

    def rows(self, query_rows: torch.Tensor, key_rows: torch.Tensor) -> torch.Tensor:
        """bool (R, K): which of the keys at rows ``key_rows`` (K,) the queries at ``query_rows`` (R,)
        see."""
        b, p = self.blocks, self.positions if self.window is not None else None
        return visible_keys(
            query_rows,
            key_rows,
            query_blocks=None if b is None else b[query_rows],
            key_blocks=None if b is None else b[key_rows],
            query_positions=None if p is None else p[query_rows],
            key_positions=None if p is None else p[key_rows],
            window=self.window,
        )

    def reach(self) -> torch.Tensor:
        """(T,) long: for each row t, 1 + the last key row that any query row <= t sees (a chunk of
        query rows ending at t needs only the keys before ``reach[t]``): t + 1 under causality,
        further for a row inside an image block (its block's last row)."""
        if self.blocks is None:
            raise ValueError("Visibility.reach: no blocks (the causal reach is t + 1)")
        blocks = self.blocks
        rows = torch.arange(blocks.numel(), device=blocks.device)
        in_block = blocks >= 0
        last = torch.full((int(blocks.max()) + 1 if bool(in_block.any()) else 1,), -1, device=blocks.device)
        last = last.scatter_reduce(0, blocks[in_block], rows[in_block], reduce="amax")
        own = torch.where(in_block, last[blocks.clamp(min=0)], rows)
        return torch.cummax(torch.maximum(own, rows) + 1, dim=0).values
