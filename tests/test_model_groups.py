"""The visual-token grids each adapter derives (``Signals.groups()``), checked by hand on the tiny
models' default image, and the narrow ``Signals`` accessors methods use instead of the adapter."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, PairMerge, inputs_for, model_for, one_image

import pact
from pact.methods.base import Signals
from pact.models import ADAPTERS, ModelAdapter, get_adapter
from pact.models.groups import Group


class GroupsRecorder(PairMerge):
    """PairMerge that records what a method sees through the narrow accessors."""

    def __init__(self, config):
        super().__init__(config)
        self.seen = []

    def reduce(self, s: Signals):
        self.seen.append((s.groups(), s.num_layers, s.num_visual))
        return super().reduce(s)


def expected_groups(family: str, inputs) -> list[Group]:
    """Hand-worked grids of ``one_image`` (96 x 64 pixels) in the tiny models (see pact.testing)."""
    if family in ("qwen2_vl", "qwen2_5_vl", "glm4v", "qwen3_5", "qwen3_5_moe"):
        _, h, w = (int(v) for v in inputs["image_grid_thw"][0])
        return [Group(0, "image", 0, h // 2, w // 2)]  # 2x2 patches per merged token
    if family in ("llava_onevision", "llava_next"):
        # 56-pixel crops of 14-pixel patches: a 4x4 base crop, then the unpadded 6 x 8 crop grid
        # (a newline slot after each of its 6 rows: 16 + 48 + 6 = 70 tokens)
        return [Group(0, "base", 0, 4, 4), Group(0, "grid", 16, 6, 8)]
    if family == "llava":
        return [Group(0, "image", 0, 6, 6)]  # one 84-pixel crop: 6 x 6 patches
    if family == "internvl":
        return [Group(0, "tile", 4 * t, 2, 2) for t in range(7)]  # 7 tiles of 2 x 2 tokens
    if family == "smolvlm":
        # 96 x 64 -> 84 x 56 -> 112 x 112: 2 x 2 sub-images of 56 px, then the global image; each is
        # 8 x 8 patches of 7 px, pixel-shuffled 2 x 2 -> a 4 x 4 grid (text tokens between them)
        return [Group(0, "tile", 16 * t, 4, 4) for t in range(4)] + [Group(0, "base", 64, 4, 4)]
    if family in ("qwen3_vl", "qwen3_vl_moe"):
        # 32-pixel tokens (16-px patches merged 2 x 2), at least 16: 64 x 96 pixels (6 tokens) are
        # scaled by sqrt(16 / 6) and rounded up to 128 x 160 pixels, 4 x 5 tokens
        return [Group(0, "image", 0, 4, 5)]
    if family == "gemma3":
        # resized to 56 x 56 whatever its shape: 8 x 8 SigLIP patches of 7 px, average-pooled 2 x 2
        return [Group(0, "image", 0, 4, 4)]
    raise AssertionError(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_groups_and_num_layers_through_signals(family):
    model, _ = model_for(family)
    inputs = inputs_for(family, [one_image(family)])
    method = GroupsRecorder(pact.load_config(None, layer=1))
    pact.apply(model, pact.load_config(None, layer=1), method=method)
    with torch.no_grad():
        model(**inputs)
    pact.remove(model)
    (groups, num_layers, num_visual), *_ = method.seen
    assert groups == expected_groups(family, inputs)
    assert sum(g.size for g in groups) == num_visual
    assert num_layers == len(get_adapter(model).layers)


def test_adapter_without_a_grid_layout_says_so():
    class NoGrid(ADAPTERS["llava"]):
        family = "no_grid"

        visual_groups = ModelAdapter.visual_groups  # a family that did not define its grids

    model, _ = model_for("llava")
    with pytest.raises(ValueError, match="no visual token layout for model family 'no_grid'"):
        NoGrid(model).visual_groups(torch.zeros(1, 3, dtype=torch.long), {})
    with pytest.raises(ValueError, match="not M-RoPE"):
        NoGrid(model).position_groups(torch.zeros(3, 3, dtype=torch.long), torch.ones(3, dtype=torch.bool))


def test_signals_without_adapter_name_what_is_missing():
    s = Signals(
        layer=0, sample=0, hidden=torch.zeros(2, 4), visual_mask=torch.ones(2, dtype=torch.bool),
        sizes=torch.ones(2), positions=torch.arange(2)[None], visual_index=torch.arange(2), config=None,
        qk_fn=None, cos_sin_fn=None, layer_input_fn=None,
    )  # fmt: skip
    with pytest.raises(ValueError, match="num_layers"):
        _ = s.num_layers
    with pytest.raises(ValueError, match="groups_fn"):
        s.groups()
    given = Signals(
        layer=0, sample=0, hidden=torch.zeros(2, 4), visual_mask=torch.ones(2, dtype=torch.bool),
        sizes=torch.ones(2), positions=torch.arange(2)[None], visual_index=torch.arange(2), config=None,
        qk_fn=None, cos_sin_fn=None, layer_input_fn=None, num_layers=7,
        groups_fn=lambda: [Group(0, "image", 0, 1, 2)],
    )  # fmt: skip
    assert given.num_layers == 7 and given.groups() == [Group(0, "image", 0, 1, 2)]


def test_vision_method_families_come_from_adapter_attributes():
    from pact.methods.vision import HiRED, PruMerge, VisPruner

    assert VisPruner.families == PruMerge.families == tuple(ADAPTERS)  # every family has a probe
    assert HiRED.families == tuple(f for f, a in ADAPTERS.items() if a.base_and_sub_images)
    assert set(HiRED.families) == {"llava", "llava_next", "llava_onevision"}
    assert [f for f, a in ADAPTERS.items() if a.has_cls] == ["llava_next", "llava", "internvl"]

    class NoProbe(ADAPTERS["llava"]):
        family = "no_probe"
        vision_probe_class = None

    model, _ = model_for("llava")
    adapter = NoProbe(model)
    with pytest.raises(ValueError, match="vision-side methods do not support model family 'no_probe'"):
        adapter.vision_probe()
    method = VisPruner(pact.load_config("vispruner"))
    with pytest.raises(ValueError, match="vispruner does not support the 'no_probe' model family"):
        method.install(model, adapter)


def test_full_grids_refuses_a_reduced_sample_naming_the_method():
    """Methods that read whole grids (pooling, EVS, HoliTom's outer merge) must be a sample's first
    reduction: after an earlier one the grids hold more tokens than the sample has left."""
    from pact.methods.layout import full_grids

    def signals(n: int) -> Signals:
        return Signals(
            layer=0, sample=0, hidden=torch.zeros(n, 4), visual_mask=torch.ones(n, dtype=torch.bool),
            sizes=torch.ones(n), positions=torch.arange(n)[None], visual_index=torch.arange(n), config=None,
            qk_fn=None, cos_sin_fn=None, layer_input_fn=None, groups_fn=lambda: [Group(0, "image", 0, 2, 2)],
        )  # fmt: skip

    assert full_grids(signals(4), "evs needs the full frame grids") == [Group(0, "image", 0, 2, 2)]
    with pytest.raises(ValueError, match=r"evs needs the full frame grids: it must be the first reduction "
                       r"of the sample \(got 3 visual tokens for grids of 4\)"):  # fmt: skip
        full_grids(signals(3), "evs needs the full frame grids")
