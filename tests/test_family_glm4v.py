"""GLM-4.1V (``glm4v``): 3-D M-RoPE from ``get_rope_index`` (each video frame its own grid), partial
rotary (RoPE on half of each head), video frames as ``<|image|>`` runs, and ``pact demo --model`` on a
saved checkpoint."""

from __future__ import annotations

import pytest
import torch
from conftest import inputs_for, model_for, one_image

import pact
import pact.api
from pact import testing
from pact.models import get_adapter
from pact.models.groups import Group

FAMILY = "glm4v"


def stock_positions(model, x) -> torch.Tensor:
    """(3, B, T) the position ids the stock model computes for the prompt."""
    positions, _ = model.model.get_rope_index(
        x["input_ids"],
        mm_token_type_ids=x["mm_token_type_ids"],
        image_grid_thw=x.get("image_grid_thw"),
        video_grid_thw=x.get("video_grid_thw"),
        attention_mask=x["attention_mask"],
    )
    return positions


@pytest.mark.parametrize("position_mode", ["center", "renumber"])
def test_kept_tokens_keep_their_3d_positions(position_mode):
    """After PACT at layer 2 every kept token (text and visual) carries the (t, h, w) ids
    ``get_rope_index`` gave it; on M-RoPE ``renumber`` is defined as ``center`` (CONFIGDOC)."""
    model, _ = model_for(FAMILY)
    x = inputs_for(FAMILY, [one_image(FAMILY), {"question": "Text only, a little longer."}])
    stock = stock_positions(model, x)
    pact.api.apply(model, pact.load_config("configs/pact.json", layer=2, position_mode=position_mode))
    with torch.no_grad():
        model(**x)
    lay = pact.api.engine_of(model).layout
    assert pact.api.stats(model).visual_after[0] < pact.api.stats(model).visual_before[0] == 20
    for b in range(2):
        ok = lay.slot_orig[b] >= 0
        kept = lay.slot_orig[b][ok]
        merged = lay.visual[b][ok]
        # a merged token carries its center's position: the center is the kept original token
        assert torch.equal(lay.positions[:, b][:, ok], stock[:, b, kept]), (b, merged.sum())
    # the image's (h, w) ids span its 4 x 5 grid (96 x 64 px -> 8 x 10 patches, merged 2 x 2)
    vis = x["input_ids"][0] == testing.token_id("<|image|>")
    h, w = stock[1, 0, vis], stock[2, 0, vis]
    assert (int(h.max() - h.min()) + 1, int(w.max() - w.min()) + 1) == (4, 5)


def test_partial_rotary_rotates_half_of_each_head():
    """``partial_rotary_factor`` 0.5: the adapter's rotated keys equal the unrotated ones on the
    second half of each head (the model's own apply_rotary_pos_emb), and differ on the first half."""
    model, _ = model_for(FAMILY)
    x = inputs_for(FAMILY, [one_image(FAMILY)])
    seen = testing.attention_qk(model, x, 1)
    adapter = get_adapter(model)
    layer = adapter.layers[1]
    _, k, _, k_rope = adapter.queries_keys(
        layer, seen["hidden"][0], seen["cos"][0], seen["sin"][0], False, True
    )
    half = adapter.head_dim(layer) // 2
    assert seen["cos"].shape[-1] == half
    assert torch.equal(k_rope[..., half:], k[..., half:])
    assert not torch.allclose(k_rope[..., :half], k[..., :half])
    torch.testing.assert_close(k_rope.transpose(0, 1), seen["keys"][0], atol=1e-5, rtol=1e-5)


def test_video_frames_are_grids_and_cannot_share_a_batch_with_images():
    """A 4-frame 96 x 64 video: 2 temporal patches x (4 x 6) patches -> 2 frames of 2 x 3 tokens,
    each its own run between <|begin_of_image|> / <|end_of_image|> and its own M-RoPE grid."""
    model, processor = model_for(FAMILY)
    video = {"question": "Video?", "videos": [testing.sample_video(0, num_frames=4)]}
    x = inputs_for(FAMILY, [video])
    assert x["video_grid_thw"].tolist() == [[2, 4, 6]]
    stock = stock_positions(model, x)
    vis = x["input_ids"][0] == testing.token_id("<|image|>")
    groups = get_adapter(model).position_groups(stock[:, 0], vis)
    assert groups == [Group(0, "image", 0, 2, 3), Group(1, "image", 6, 2, 3)]
    pact.api.apply(model, pact.load_config("pooling", layer=1))
    with torch.no_grad():
        model(**x)
    assert pact.api.stats(model).visual_after == [2 * 2]  # 2 x 2 pooling (ceil): 1 x 2 per frame
    with pytest.raises(ValueError, match="cannot batch images and videos"):
        testing.build_inputs(FAMILY, processor, [video, one_image(FAMILY)])
