"""Gemma 3 (``gemma3``), the part that is done: the masks of its layers on a reduced layout.

Gemma 3's full layers attend "causal OR same image block" (the tokens of one image see each other in
both directions) and its sliding layers AND that with a sliding window. ``build_block_window_mask``
states the pattern per key (row order, original image block, rotary position), so the engine can
apply it to a reduced, left-padded layout. Checked here against the stock transformers mask builder
on unreduced layouts and against hand-worked answers on reduced ones.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import (
    create_masks_for_vision_model,
    get_block_sequence_ids_for_mask,
)

from pact.ops.attention import build_block_window_mask

NEG = float("-inf")


def stock_visible(token_type_ids: torch.Tensor, attention_mask: torch.Tensor, window: int) -> dict:
    """The stock Gemma 3 masks (eager) of a prompt as bool "visible" (B, T, T), per layer kind."""
    cfg = Gemma3TextConfig(
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=8,
        sliding_window=window,
        layer_types=["sliding_attention", "full_attention"],
        vocab_size=10,
    )
    cfg._attn_implementation = "eager"
    B, T = token_type_ids.shape
    masks = create_masks_for_vision_model(
        config=cfg,
        inputs_embeds=torch.zeros(B, T, 8),
        attention_mask=attention_mask,
        past_key_values=None,
        position_ids=torch.arange(T)[None].expand(B, T),
        block_sequence_ids=get_block_sequence_ids_for_mask(token_type_ids),
    )
    return {kind: m[:, 0] == 0 for kind, m in masks.items()}


def pact_inputs(token_type_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple:
    """(key_bias, key_block, key_position) of an unreduced layout, as the engine would build them."""
    valid = attention_mask.bool()
    block = get_block_sequence_ids_for_mask(token_type_ids)
    block = torch.where(valid, block, -1)
    bias = torch.where(valid, 0.0, NEG)
    position = torch.arange(token_type_ids.shape[1])[None].expand_as(token_type_ids)
    return bias, block, position


@pytest.mark.parametrize("window", [1, 2, 3, 5, 64])
def test_block_window_mask_equals_the_stock_gemma3_masks(window):
    """Unreduced layout (two samples, left padding, two images in one, adjacent text): the pattern is
    exactly the stock one on every non-padding query row, for sliding and full layers."""
    token_types = torch.tensor(
        [
            [0, 0, 1, 1, 1, 1, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0],
        ]
    )
    attention_mask = torch.tensor([[1] * 11, [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    stock = stock_visible(token_types, attention_mask, window)
    bias, block, position = pact_inputs(token_types, attention_mask)
    T = token_types.shape[1]
    for kind, w in (("sliding_attention", window), ("full_attention", None)):
        ours = build_block_window_mask(bias, block, position, T, w, torch.float32)[:, 0]
        for b in range(2):
            rows = attention_mask[b].bool()
            assert torch.equal(ours[b][rows] == 0, stock[kind][b][rows]), (kind, b)


def test_reduced_layout_hand_worked():
    """Reduced layout: text at positions 0, 1; an image at 2..7 of which 3 and 6 are kept (6 merged,
    size 3); text at 8, 9. W = 3 over original positions.

    rows:      0  1  2(p3)  3(p6)  4(p8)  5(p9)
    full:      causal, plus rows 2 and 3 see each other (one image block);
    sliding:   a key is visible when its position > query position - 3:
               row 2 (p3) sees p1, p3, p6 (block, future); row 3 (p6) sees p6 and, in its block, p3?
               p3 > 6 - 3 is false: no; row 4 (p8) sees p6, p8; row 5 (p9) sees p8, p9.
    """
    bias = torch.tensor([[0.0, 0.0, 0.0, math.log(3), 0.0, 0.0]])
    block = torch.tensor([[-1, -1, 0, 0, -1, -1]])
    position = torch.tensor([[0, 1, 3, 6, 8, 9]])
    full = build_block_window_mask(bias, block, position, 6, None, torch.float32)[0, 0]
    sliding = build_block_window_mask(bias, block, position, 6, 3, torch.float32)[0, 0]
    full_visible = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1],
        ]
    ).bool()
    sliding_visible = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 1, 1, 1, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 1, 1],
        ]
    ).bool()
    assert torch.equal(torch.isfinite(full), full_visible)
    assert torch.equal(torch.isfinite(sliding), sliding_visible)
    # the merged token's log(size) is on every query that sees it
    assert torch.allclose(full[:, 3][full_visible[:, 3]], torch.tensor(math.log(3)))
    assert torch.allclose(sliding[:, 3][sliding_visible[:, 3]], torch.tensor(math.log(3)))


def test_decode_rows_are_the_last_keys_and_padding_rows_stay_finite():
    """q_len < K (a cached step: the queries are the last q_len keys); a padding query (it sees only
    padding) gets 0 on its own key instead of an all -inf row."""
    bias = torch.tensor([[NEG, 0.0, 0.0, 0.0, 0.0], [NEG, NEG, NEG, NEG, 0.0]])
    block = torch.tensor([[-1, 0, 0, -1, -1], [-1, -1, -1, -1, -1]])
    position = torch.tensor([[0, 0, 1, 2, 3], [0, 0, 0, 0, 0]])
    m = build_block_window_mask(bias, block, position, 2, 2, torch.float32)[:, 0]
    # sample 0: query p2 sees p1 (1 > 2 - 2) and itself, not p0; query p3 sees p2 and itself
    assert torch.equal(torch.isfinite(m[0]), torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]).bool())
    # sample 1: the first query row is padding only -> its own key (column 3) gets 0
    assert m[1, 0, 3] == 0 and torch.isneginf(m[1, 0, :3]).all()


def test_block_window_mask_rejects_bad_arguments():
    bias = torch.zeros(1, 4)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="key_block"):
        build_block_window_mask(bias, ids[:, :3], ids, 4, None, torch.float32)
    with pytest.raises(ValueError, match="q_len"):
        build_block_window_mask(bias, ids, ids, 5, None, torch.float32)
    with pytest.raises(ValueError, match="window"):
        build_block_window_mask(bias, ids, ids, 4, 0, torch.float32)
