"""EVS (Efficient Video Sampling, vLLM's ``compute_retention_mask``): the rule on hand-made videos,
the selection on the tiny video models against the rule recomputed from the stock model's own video
embeddings, the logits against the stock language model on the physically shortened input (what
vLLM runs), batches, budgets and refusals.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import ATTENTION, model_for, stock_embeds

import pact
import pact.api
from pact import testing
from pact.methods.base import Signals, build_method
from pact.methods.evs import EVS, video_keep_counts, video_runs
from pact.models import get_adapter
from pact.models.groups import Group
from pact.ops.video import evs_dissimilarity, evs_keep, evs_retained_count

SUPPORTED = ("qwen2_vl", "qwen2_5_vl", "llava_onevision")
# Every family it runs on (the ADAPTERS order): the timestamped-frame families (Qwen3-VL, Qwen3.5,
# GLM-4.1V) are tested in tests/test_video_frames.py; InternVL and SmolVLM2 are refused.
RUNS_ON = (*SUPPORTED, "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "glm4v")
MROPE = ("qwen2_vl", "qwen2_5_vl")


# ---------------------------------------------------------------------------------------------------
# the rule on hand-made inputs


def hand_video() -> torch.Tensor:
    """3 frames of 2 tokens, 2-d features. Frame 1 vs frame 0: token 0 turns 90 degrees (cos 0 ->
    dissimilarity 1), token 1 is scaled (cos 1 -> 0). Frame 2 vs frame 1: token 0 turns 180 degrees
    (cos -1 -> 2), token 1 turns 60 degrees (cos 0.5 -> 0.5)."""
    c, s = 0.5, math.sqrt(3) / 2
    return torch.tensor(
        [
            [[1.0, 0.0], [0.0, 1.0]],
            [[0.0, 1.0], [0.0, 3.0]],
            [[0.0, -1.0], [-s, c]],
        ]
    )


def test_dissimilarity_is_one_minus_cosine_with_the_previous_frame_and_first_frame_wins():
    scores = evs_dissimilarity(hand_video())
    torch.testing.assert_close(scores, torch.tensor([[255.0, 255.0], [1.0, 0.0], [2.0, 0.5]]))
    assert scores.dtype == torch.float32
    # a one-frame video (an image) keeps everything: only first-frame scores
    assert evs_dissimilarity(hand_video()[:1]).tolist() == [[255.0, 255.0]]


def test_retained_count_is_vllms():
    # int(F * S * (1 - q)), never below one frame
    assert evs_retained_count(48, 4, 0.0) == 192
    assert evs_retained_count(48, 4, 0.5) == 96
    assert evs_retained_count(48, 4, 0.999) == 48
    assert evs_retained_count(2, 3, 0.5) == 3
    with pytest.raises(ValueError, match="pruning_rate must be in"):
        evs_retained_count(2, 3, 1.0)


def test_keep_takes_the_highest_scores_ties_to_the_earlier_token():
    scores = evs_dissimilarity(hand_video())  # flat: 255 255 1 0 2 0.5
    assert evs_keep(scores, 3).tolist() == [0, 1, 4]
    assert evs_keep(scores, 4).tolist() == [0, 1, 2, 4]
    tied = torch.tensor([[255.0, 255.0], [0.5, 0.5], [0.5, 0.25]])
    assert evs_keep(tied, 3).tolist() == [0, 1, 2]  # frame 1 token 0 before frame 1 token 1 / frame 2
    assert evs_keep(tied, 4).tolist() == [0, 1, 2, 3]


def test_video_runs_split_videos_and_skip_images():
    groups = [
        Group(0, "image", 0, 2, 2),
        Group(1, "frame", 4, 1, 2),
        Group(1, "frame", 6, 1, 2),
        Group(2, "frame", 8, 1, 2),  # a new video
        Group(2, "frame", 10, 1, 2),
        Group(3, "base", 12, 2, 2),
    ]
    runs = video_runs(groups)
    assert [[g.start for g in v] for v in runs] == [[4, 6], [8, 10]]


def hand_signals(cfg: Any) -> Signals:
    """One sample: 2 text tokens, a 2x2 image (4 visual tokens), the 3-frame video of
    ``hand_video`` (frames of 1x2 tokens, hidden size 2), 1 text token."""
    image = torch.tensor([[3.0, 1.0], [1.0, 3.0], [2.0, 2.0], [1.0, 1.0]])
    hidden = torch.cat([torch.ones(2, 2), image, hand_video().reshape(6, 2), torch.ones(1, 2)])
    mask = torch.zeros(hidden.shape[0], dtype=torch.bool)
    mask[2:12] = True
    groups = [Group(0, "image", 0, 2, 2)] + [Group(1, "frame", 4 + 2 * f, 1, 2) for f in range(3)]
    return Signals(
        layer=0,
        sample=0,
        hidden=hidden,
        visual_mask=mask,
        sizes=torch.ones(10),
        positions=torch.arange(hidden.shape[0])[None],
        visual_index=torch.arange(10),
        config=cfg,
        qk_fn=lambda *a: (None, None, None, None),
        cos_sin_fn=lambda: (None, None),
        layer_input_fn=lambda j: None,
        groups_fn=lambda: groups,
    )


def test_evs_prunes_the_video_and_leaves_the_image_alone():
    # q = 0.5: the video keeps max(2, int(6 * 0.5)) = 3 = both first-frame tokens + the highest
    # dissimilarity (frame 2 token 0, score 2); the image keeps its 4 tokens.
    cfg = pact.load_config("evs", evs_pruning_rate=0.5)
    red = build_method(cfg).reduce(hand_signals(cfg))
    assert red.kept.tolist() == [0, 1, 2, 3, 4, 5, 8]
    torch.testing.assert_close(red.scores[4:], torch.tensor([255.0, 255.0, 1.0, 0.0, 2.0, 0.5]))
    # q = 0.25 keeps int(4.5) = 4: frame 1 token 0 (score 1) too
    cfg = cfg.replace(evs_pruning_rate=0.25)
    assert build_method(cfg).reduce(hand_signals(cfg)).kept.tolist() == [0, 1, 2, 3, 4, 5, 6, 8]


def test_evs_budget_counts_the_images_and_keeps_the_first_frame():
    # target_tokens 8 of 10: the image keeps 4, the video the other 4.
    cfg = pact.load_config("evs", target_tokens=8)
    assert build_method(cfg).reduce(hand_signals(cfg)).kept.tolist() == [0, 1, 2, 3, 4, 5, 6, 8]
    # target_ratio 0.5 -> 5 tokens: the video would get 1 < one frame; it keeps its first frame.
    cfg = pact.load_config("evs", target_ratio=0.5)
    assert build_method(cfg).reduce(hand_signals(cfg)).kept.tolist() == [0, 1, 2, 3, 4, 5]
    # two videos of 6 tokens and 4 image tokens, 10 kept: the videos share 6, 6 * 6 // 12 = 3 each
    # (the 3-token-frame video keeps exactly its first frame); 7 kept: 3 for the videos, 1.5 each
    # rounds down to 1, raised to one frame (2 and 3).
    cfg = pact.load_config("evs", target_tokens=10)
    assert video_keep_counts(cfg, 16, [(3, 2), (2, 3)]) == [3, 3]
    assert video_keep_counts(cfg.replace(target_tokens=7), 16, [(3, 2), (2, 3)]) == [2, 3]


# ---------------------------------------------------------------------------------------------------
# on the tiny models


def video_sample(seed: int = 0, question: str = "Describe the video.") -> dict:
    return {"question": question, "videos": [testing.sample_video(seed)]}


def official_kept(model: Any, x: Any, sample: int, q: float) -> list[int]:
    """vLLM's rule in plain Python on the stock model's video embeddings of ``sample`` (its only
    visual input is one video): frame count from the processor's output, not from pact's layout."""
    family = testing.family_of(model)
    frames = int(x["video_grid_thw"][0][0]) if family in MROPE else int(x["pixel_values_videos"].shape[1])
    video = stock_embeds(model, x)[sample][testing.patch_token_mask(model, x)[sample]].float()
    per_frame = video.shape[0] // frames
    v = video.reshape(frames, per_frame, -1)
    score = {}
    for f in range(frames):
        for s in range(per_frame):
            if f == 0:
                score[f * per_frame + s] = 255.0
            else:
                a, b = v[f, s], v[f - 1, s]
                cos = float(a @ b) / max(float(a.norm()) * float(b.norm()), 1e-8)
                score[f * per_frame + s] = 1.0 - cos
    count = max(per_frame, int(frames * per_frame * (1 - q)))
    order = sorted(score, key=lambda i: (-score[i], i))
    return sorted(order[:count])


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", SUPPORTED)
def test_evs_keeps_what_the_official_rule_keeps_and_batches_equal_singles(family, attn):
    model, processor = model_for(family, attn)
    samples = [
        video_sample(0),
        {"question": "What is in the image?", "images": [testing.sample_image(1)]},
        video_sample(2, "What moves?"),
    ]
    batch = testing.build_inputs(family, processor, samples, padding_side="left")
    pact.api.apply(model, pact.load_config("evs", evs_pruning_rate=0.5))
    with torch.no_grad():
        logits = model(**batch).logits
    assert bool(torch.isfinite(logits).all())
    st = pact.api.stats(model)
    before = testing.patch_token_mask(model, batch).sum(1).tolist()
    assert st.visual_before == before
    batched = [r.kept.tolist() for r in st.records[0]]
    assert batched[1] == list(range(before[1])), "the image was pruned"
    for i in (0, 2):
        single = testing.build_inputs(family, processor, [samples[i]])
        with torch.no_grad():
            model(**single)
        kept = pact.api.stats(model).records[0][0].kept.tolist()
        assert kept == batched[i], f"sample {i} is reduced differently in a batch"
        pact.api.remove(model)
        assert kept == official_kept(model, single, 0, 0.5)
        pact.api.apply(model, pact.load_config("evs", evs_pruning_rate=0.5))


def mrope_positions(model: Any, x: Any) -> torch.Tensor:
    """(3, B, T) the stock M-RoPE position ids of the full prompt."""
    rope, _ = model.model.get_rope_index(
        x["input_ids"],
        mm_token_type_ids=x["mm_token_type_ids"],
        video_grid_thw=x["video_grid_thw"],
        attention_mask=x["attention_mask"],
    )
    return rope


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", SUPPORTED)
def test_evs_equals_the_stock_language_model_on_the_pruned_sequence(family, attn):
    """What vLLM runs: the pruned video tokens never reach the LLM. 1-D RoPE: contiguous positions
    over the short sequence (and decoding from its length); M-RoPE: the kept video tokens keep their
    (t, h, w) ids (vLLM's compute_mrope_for_media sliced by the retention mask)."""
    model, processor = model_for(family, attn)
    x = testing.build_inputs(family, processor, [video_sample(0)])
    pact.api.apply(model, pact.load_config("evs"))
    with torch.no_grad():
        reduced = model(**x).logits[0]
    with torch.no_grad():
        gen = model.generate(**x, max_new_tokens=3, min_new_tokens=3, do_sample=False)[0, -3:]
    record = pact.api.stats(model).records[0][0]
    pact.api.remove(model)
    assert 0 < record.kept.numel() < record.labels.numel()

    embeds = stock_embeds(model, x)[0]
    visual = testing.patch_token_mask(model, x)[0].nonzero().flatten()
    dropped = set(visual[record.labels < 0].tolist())
    rows = [t for t in range(embeds.shape[0]) if t not in dropped]
    short = embeds[rows]
    positions = mrope_positions(model, x)[:, 0][:, rows][:, None] if family in MROPE else None
    text_model = get_adapter(model).text_model
    with torch.no_grad():
        stock = model.lm_head(
            text_model(inputs_embeds=short[None], position_ids=positions).last_hidden_state
        )[0]
    torch.testing.assert_close(reduced[rows], stock, atol=1e-5, rtol=1e-4)
    if family not in MROPE:
        with torch.no_grad():
            out = model.generate(
                inputs_embeds=short[None],
                attention_mask=torch.ones(1, short.shape[0], dtype=torch.long),
                max_new_tokens=3,
                min_new_tokens=3,
                do_sample=False,
            )
        assert torch.equal(out[0, -3:], gen)


def test_evs_budget_on_a_model_meets_the_target():
    model, processor = model_for("llava_onevision")
    x = testing.build_inputs("llava_onevision", processor, [video_sample(0)])
    pact.api.apply(model, pact.load_config("evs", target_ratio=0.6))
    with torch.no_grad():
        model(**x)
    st = pact.api.stats(model)
    n = st.visual_before[0]
    assert st.visual_after == [max(n // 4, math.floor(n * 0.4 + 1e-9))]  # 4 frames: first frame floor


# ---------------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize("family", [f for f in testing.FAMILIES if f not in RUNS_ON])
def test_evs_refuses_families_without_frame_layouts(family):
    model, _ = model_for(family)
    with pytest.raises(ValueError, match=f"evs does not support the '{family}' model family: "):
        pact.api.apply(model, pact.load_config("evs"))
    assert EVS.families == RUNS_ON


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"evs_pruning_rate": 1.0}, r"evs_pruning_rate.*\[0, 1\)"),
        ({"evs_pruning_rate": -0.1}, r"evs_pruning_rate.*\[0, 1\)"),
        ({"evs_pruning_rate": "0.5"}, "evs_pruning_rate' must be a number"),
    ],
)
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        pact.load_config("evs", **overrides)


def test_progressive_evs_is_refused_at_apply():
    model, _ = model_for("qwen2_vl")
    with pytest.raises(ValueError, match="evs prunes each video once: set progressive=false"):
        pact.api.apply(model, pact.load_config("evs", progressive=True))
