"""CDPruner: the conditional-DPP greedy MAP against brute-force determinants, the relevance on
hand-made vectors, the method on a tiny LLaVA-1.5 against a plain recomputation from the model's own
input embeddings, budgets, and refused settings."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import pact
import pact.api
from pact import testing
from pact.methods.budget import target_count
from pact.methods.cdpruner import instruction_mask
from pact.ops.dpp import dpp_greedy_map, instruction_relevance, relevance_weights


def brute_force_greedy(features: torch.Tensor, quality: torch.Tensor, k: int) -> list[int]:
    """Greedy MAP by determinants: add the token maximising det(L_S) (float64, explicit kernel)."""
    x = torch.nn.functional.normalize(features.double(), dim=1)
    q = quality.double()
    kernel = q[:, None] * (x @ x.T) * q[None, :]
    chosen: list[int] = []
    for _ in range(k):
        best, best_det = -1, -math.inf
        for j in range(features.shape[0]):
            if j in chosen:
                continue
            s = [*chosen, j]
            det = float(torch.linalg.det(kernel[s][:, s]))
            if det > best_det + 1e-12:
                best, best_det = j, det
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_greedy_equals_the_determinant_greedy(seed):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(12, 8, generator=g)
    quality = torch.rand(12, generator=g) + 0.1
    assert dpp_greedy_map(features, quality, 7).tolist() == brute_force_greedy(features, quality, 7)


def test_duplicates_are_avoided_and_ties_go_to_the_lower_index():
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # equal quality: token 0 (tie with 1, lower index), then the orthogonal 2; then 1, whose
    # conditional variance is 0 (the kernel's rank is reached)
    assert dpp_greedy_map(features, torch.ones(3), 3).tolist() == [0, 2, 1]
    # quality decides among equally diverse tokens: 1 before 0
    assert dpp_greedy_map(features, torch.tensor([1.0, 2.0, 1.5]), 2).tolist() == [1, 2]
    assert dpp_greedy_map(features, torch.ones(3), 0).tolist() == []
    with pytest.raises(ValueError, match="features"):
        dpp_greedy_map(torch.full((3, 2), float("nan")), torch.ones(3), 1)


def test_relevance_by_hand():
    visual = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    text = torch.tensor([[5.0, 0.0]])
    # cosines 1, 0, 1/sqrt(2); min-max: (r - 0 + 1e-6) / 1
    c = 1 / math.sqrt(2)
    torch.testing.assert_close(instruction_relevance(visual, text), torch.tensor([1.0, 0.0, c]) + 1e-6)
    # the official negation: -1, 0, -c -> (r + 1 + 1e-6) / 1
    torch.testing.assert_close(
        instruction_relevance(visual, text, negate=True), torch.tensor([0.0, 1.0, 1 - c]) + 1e-6
    )
    # two instruction tokens: mean of the cosines
    two = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(
        instruction_relevance(visual, two),
        torch.tensor([0.0, 0.0, 2 * c - 0.5]) / (2 * c - 0.5) + 1e-6 / (2 * c - 0.5),
    )
    assert instruction_relevance(torch.ones(3, 2), text).tolist() == [1.0, 1.0, 1.0]
    torch.testing.assert_close(
        relevance_weights(torch.tensor([0.0, 1.0]), 0.5), torch.tensor([1.0, math.exp(0.5)])
    )
    with pytest.raises(ValueError, match="theta"):
        relevance_weights(torch.ones(2), 1.0)


def test_instruction_is_the_text_after_the_last_visual_token():
    visual = torch.tensor([False, True, True, False, True, False, False])
    assert instruction_mask(visual).tolist() == [False, False, False, False, False, True, True]
    assert not bool(instruction_mask(torch.zeros(3, dtype=torch.bool)).any())


# ---------------------------------------------------------------------------------------------------
# on a tiny LLaVA-1.5

_MODELS: dict[str, Any] = {}


def tiny(family: str) -> tuple[Any, Any]:
    if family not in _MODELS:
        _MODELS[family] = testing.tiny_pair(family, num_hidden_layers=2)
    return _MODELS[family]


@pytest.fixture(autouse=True)
def _stock():
    yield
    for model, _ in _MODELS.values():
        pact.api.remove(model)


def two_images(family: str) -> Any:
    _, processor = tiny(family)
    samples = [
        {"question": "What is in the image?", "images": [testing.sample_image(0, size=(96, 64))]},
        {"question": "Describe it in one sentence.", "images": [testing.sample_image(1, size=(64, 120))]},
    ]
    return testing.build_inputs(family, processor, samples, padding_side="left")


def test_cdpruner_recomputed_from_the_models_embeddings_on_llava():
    model, _ = tiny("llava")
    x = two_images("llava")
    grabbed: dict[str, torch.Tensor] = {}

    def grab(module: Any, args: tuple, kwargs: dict) -> None:
        grabbed["h"] = kwargs["inputs_embeds"]

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    pact.api.apply(model, pact.load_config("cdpruner", keep_ratio=0.25))
    try:
        with torch.no_grad():
            model(**x)
    finally:
        hook.remove()
    records = pact.api.stats(model).records[0]
    visual = testing.patch_token_mask(model, x)
    for b, rec in enumerate(records):
        valid = x["attention_mask"][b].bool()
        h = grabbed["h"][b][valid].float()
        vis = visual[b][valid]
        last = int(vis.nonzero()[-1])
        text = h[last + 1 :]  # the instruction: every token after the image
        v = h[vis]
        cos = torch.nn.functional.normalize(v, dim=1) @ torch.nn.functional.normalize(text, dim=1).T
        rel = cos.mean(1)
        rel = (rel - rel.min() + 1e-6) / (rel.max() - rel.min())
        expected = sorted(brute_force_greedy(v, rel, int(v.shape[0] * 0.25)))
        assert rec.kept.tolist() == expected


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_next", "internvl"])
@pytest.mark.parametrize("budget", [{"target_tokens": 7}, {"target_ratio": 0.5}])
def test_budgets_are_met_exactly(family, budget):
    model, _ = tiny(family)
    x = two_images(family)
    cfg = pact.load_config("cdpruner", **budget)
    pact.api.apply(model, cfg)
    with torch.no_grad():
        model(**x)
    st = pact.api.stats(model)
    for before, after in zip(st.visual_before, st.visual_after, strict=True):
        assert after == target_count(cfg, before)


def test_the_instruction_changes_the_selection():
    model, _ = tiny("llava")
    _, processor = tiny("llava")
    kept = []
    for question in ("What is in the image?", "Count the red squares in the lower left corner."):
        x = testing.build_inputs(
            "llava", processor, [{"question": question, "images": [testing.sample_image(0)]}]
        )
        pact.api.apply(model, pact.load_config("cdpruner", keep_ratio=0.25))
        with torch.no_grad():
            model(**x)
        kept.append(pact.api.stats(model).records[0][0].kept.tolist())
        pact.api.remove(model)
    assert kept[0] != kept[1]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="cdpruner_theta"):
        pact.load_config("cdpruner", cdpruner_theta=1.0)
    with pytest.raises(ValueError, match="cdpruner_negate_relevance"):
        pact.load_config("cdpruner", cdpruner_negate_relevance="yes")
    model, _ = tiny("llava")
    with pytest.raises(ValueError, match="set progressive=false"):
        pact.api.apply(model, pact.load_config("cdpruner", progressive=True))
