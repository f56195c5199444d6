"""SmolVLM2 (``smolvlm``): image splitting, pixel shuffle, the text tokens around each sub-image, video
frames, the vision probe without [CLS], and ``pact demo --model`` on a saved checkpoint.

The tiny model (``pact.testing``): 56-px sub-images of 7-px patches (8 x 8), pixel shuffle 2 -> 4 x 4 =
16 ``<image>`` tokens per sub-image and per global image; the 96 x 64 default image is split 2 x 2.
"""

from __future__ import annotations

import pytest
import torch
from conftest import greedy, inputs_for, model_for, one_image

import pact
import pact.api
from pact import testing
from pact.models import get_adapter
from pact.models.groups import Group

FAMILY = "smolvlm"
AROUND = testing._SMOLVLM_TOKENS_AROUND[:-1]  # <fake_token_around_image>, <global-img>, <row_i_col_j>


def test_wrapper_tokens_are_text_never_candidates_and_never_removed():
    """<fake_token_around_image>, <row_i_col_j> and <global-img> sit between the grids: they are not
    candidates, and a strong reduction keeps every one of them (and every other text token)."""
    model, _ = model_for(FAMILY)
    x = inputs_for(FAMILY, [one_image(FAMILY), {"question": "Only text here."}])
    ids = x["input_ids"]
    around = torch.tensor([testing.token_id(t) for t in AROUND])
    wrappers = torch.isin(ids, around)
    assert int(wrappers[0].sum()) == 4 * 2 + 3  # per sub-image fake + row/col; global: fake, global, fake
    candidates = get_adapter(model).candidate_mask(ids, x)
    assert not (candidates & wrappers).any()
    assert torch.equal(candidates, ids == testing.token_id("<image>"))
    assert int(candidates[0].sum()) == 5 * 16
    pact.api.apply(model, pact.load_config("configs/pact.json", layer=1, keep_ratio=0.2))
    with torch.no_grad():
        model(**x)
    lay = pact.api.engine_of(model).layout
    st = pact.api.stats(model)
    assert st.visual_after[0] < st.visual_before[0] == 80
    for b in range(ids.shape[0]):
        kept = set(lay.slot_orig[b][lay.slot_orig[b] >= 0].tolist())
        text = torch.nonzero(x["attention_mask"][b].bool() & ~candidates[b]).flatten().tolist()
        assert set(text) <= kept, "a text token (wrapper or prompt) was removed"


def test_groups_of_split_images_and_video_frames():
    """Hand-worked: each sub-image is a 4 x 4 "tile", the global image that closes an image its "base"
    (same image index); each video frame (never split) is one "image". A 168 x 48 image is resized to
    84 x 24, then to 112 x 56 (multiples of 56): 1 x 2 sub-images; the 96 x 64 one 2 x 2."""
    model, _ = model_for(FAMILY)
    adapter = get_adapter(model)
    split, wide = testing.sample_image(0), testing.sample_image(1, size=(168, 48))
    samples = [
        {"question": "Compare.", "images": [wide, split]},
        {"question": "Video?", "videos": [testing.sample_video(0, num_frames=3)]},
    ]
    # images and videos cannot share a batch (testing.BATCH_LIMITS): one batch each
    images = inputs_for(FAMILY, samples[:1])
    video = inputs_for(FAMILY, samples[1:])
    (groups,) = adapter.visual_groups(images["input_ids"], images)
    wide_groups = [Group(0, "tile", 0, 4, 4), Group(0, "tile", 16, 4, 4), Group(0, "base", 32, 4, 4)]
    tiles = [Group(1, "tile", 48 + 16 * t, 4, 4) for t in range(4)]
    assert groups == [*wide_groups, *tiles, Group(1, "base", 112, 4, 4)]
    (frames,) = adapter.visual_groups(video["input_ids"], video)
    assert frames == [Group(f, "image", 16 * f, 4, 4) for f in range(3)]
    # a spatial method runs on those grids: 2 x 2 pooling keeps 4 tokens of each 4 x 4 grid
    pact.api.apply(model, pact.load_config("pooling", layer=1))
    with torch.no_grad():
        model(**images)
    assert pact.api.stats(model).visual_after == [8 * 4]


def test_probe_rows_follow_the_pixel_shuffle():
    """Per-patch values -> per-row values: the mean over the 2 x 2 patches the connector's pixel
    shuffle puts in each row. Patch p of an 8 x 8 sub-image has value p; row (r, c) of the 4 x 4 grid
    holds patches (2r + i) * 8 + 2c + j, i, j in {0, 1}: mean 16 r + 2 c + 4.5."""
    model, _ = model_for(FAMILY)
    probe = get_adapter(model).vision_probe()
    assert probe.has_cls is False  # SigLIP: the documented substitute signal, no [CLS]
    values = torch.arange(64, dtype=torch.float32)[:, None].repeat(2, 1)  # two sub-images
    rows = probe.to_rows(values, [64, 64])
    r, c = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    expected = (16 * r + 2 * c + 4.5).flatten().float()
    assert torch.equal(rows[:, 0], torch.cat([expected, expected]))


def test_vision_methods_run_or_are_refused_with_the_reason():
    model, _ = model_for(FAMILY)
    x = inputs_for(FAMILY, [one_image(FAMILY)])
    for name in ("vispruner", "prumerge"):
        pact.api.apply(model, pact.load_config(name))
        with torch.no_grad():
            model(**x)
        st = pact.api.stats(model)
        assert 0 < st.visual_after[0] < st.visual_before[0] == 80, name
        pact.api.remove(model)
    with pytest.raises(ValueError, match="hired does not support the 'smolvlm' model family"):
        pact.api.apply(model, pact.load_config("hired"))


def test_reduced_video_generation_cached_equals_uncached():
    model, _ = model_for(FAMILY, "eager")
    x = inputs_for(FAMILY, [{"question": "Video?", "videos": [testing.sample_video(0, num_frames=3)]}])
    pact.api.apply(model, pact.load_config("configs/pact.json", layer=2))
    assert torch.equal(greedy(model, x, n=3), greedy(model, x, n=3, use_cache=False))
    assert pact.api.stats(model).visual_before == [48]
