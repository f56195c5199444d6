"""Videos whose frames are separate visual runs with text between them (Qwen3-VL / Qwen3.5: a
``<t seconds>`` timestamp before every frame; GLM-4.1V: a timestamp after every frame inside
``<|begin_of_video|>`` ... ``<|end_of_video|>``): the adapters say which runs form one video
(``ModelAdapter.run_media``), ``Signals.groups()`` reports the frames of each video, and EVS and
HoliTom run on them.

Checked: the pure helpers by hand; the groups of the tiny models against hand-worked counts from
the processor's grids (images in the same prompt stay images, several videos and samples, the
``generate`` path that passes encoded videos instead of grids); EVS keeps exactly what vLLM's rule
keeps on the video embeddings entering layer 0 and equals the stock language model on the pruned
sequence with the timestamps and text untouched at their stock positions (DeepStack features of the
kept tokens, as vLLM feeds them); HoliTom never moves a token past a timestamp; for both, cached ==
uncached greedy decoding and a left-padded batch (video + image + text-only samples) == each sample
alone, eager and sdpa; InternVL and SmolVLM2 stay refused with the reason.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import ATTENTION, model_for, text_model_call, tiny

import pact
import pact.api
from pact import testing
from pact.methods.base import Method
from pact.methods.evs import video_runs
from pact.models import get_adapter
from pact.models.groups import Group, media_by_delimiters, media_by_video_sizes, mrope_groups
from pact.ops.reduction import Reduction

TIMESTAMPED = ("qwen3_vl", "qwen3_5", "glm4v")
"""The tiny families whose video frames are separate runs (the MoE variants share the adapters)."""

HOLITOM = {"holitom_inner_layer": 2, "holitom_retain_ratio": 0.4}  # the tiny decoders have 4 layers


# ---------------------------------------------------------------------------------------------------
# the pure helpers, by hand


def test_media_by_video_sizes_gathers_the_runs_of_each_video():
    # sample 0: an image run (20), a 3-frame video (3 runs of 6); sample 1: an image only;
    # sample 2: a 2-frame video (2 x 6) then a 3-frame one (3 x 6), no text between the videos
    lengths = [[20, 6, 6, 6], [20], [6, 6, 6, 6, 6]]
    is_video = [[False, True, True, True], [False], [True] * 5]
    assert media_by_video_sizes(lengths, is_video, [18, 12, 18]) == [[0, 1, 1, 1], [0], [0, 0, 1, 1, 1]]
    # one run may hold several frames (Qwen2-VL style): it is one video on its own
    assert media_by_video_sizes([[12, 4]], [[True, False]], [12]) == [[0, 1]]


@pytest.mark.parametrize(
    "lengths, is_video, sizes, message",
    [
        ([[6, 6]], [[True, True]], [9], "overruns its video"),  # a frame across two videos
        ([[6, 4, 6]], [[True, False, True]], [12], "an image run inside a video"),
        ([[6], [6]], [[True], [True]], [12], "lacks 6 tokens"),  # a video split between samples
        ([[6, 6]], [[True, True]], [6], "more video runs than the 1 videos"),
        ([[6]], [[True]], [6, 6], "1 of the 2 videos given have no visual tokens"),
    ],
)
def test_media_by_video_sizes_refuses_runs_that_do_not_add_up(lengths, is_video, sizes, message):
    with pytest.raises(ValueError, match=message):
        media_by_video_sizes(lengths, is_video, sizes)


def test_media_by_delimiters_reads_the_video_markers():
    # tokens: 0 text, 1 image run, 2 text, [3 <video> 4-5 frame, 6 ts, 7-8 frame, 9 </video>],
    # [10 <video> 11 frame 12 </video>], 13 image
    begins = torch.zeros(1, 14, dtype=torch.long)
    begins[0, [3, 10]] = 1
    ends = torch.zeros(1, 14, dtype=torch.long)
    ends[0, [9, 12]] = 1
    number = begins.cumsum(1)
    inside = number - ends.cumsum(1) > 0
    assert media_by_delimiters([[1, 4, 7, 11, 13]], number, inside) == [[0, 1, 1, 2, 3]]


def test_mrope_groups_with_media_gives_the_frames_of_each_video():
    """An image (2 x 2 at h, w = 5..6), then a video of two one-frame runs (1 x 2 each) with text
    between them (the positions of text are irrelevant to the groups)."""
    positions = torch.tensor(
        [
            [0, 5, 5, 5, 5, 9, 10, 10, 12, 13, 13],
            [0, 5, 5, 6, 6, 9, 10, 10, 12, 13, 13],
            [0, 5, 6, 5, 6, 9, 10, 11, 12, 13, 14],
        ]
    )
    visual = torch.tensor([0, 1, 1, 1, 1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    assert mrope_groups(positions, visual, [0, 1, 1]) == [
        Group(0, "image", 0, 2, 2),
        Group(1, "frame", 4, 1, 2),
        Group(1, "frame", 6, 1, 2),
    ]
    # without media every run is its own image (the Qwen2-VL rule, unchanged)
    assert [g.kind for g in mrope_groups(positions, visual)] == ["image"] * 3
    with pytest.raises(ValueError, match="count up from 0"):
        mrope_groups(positions, visual, [0, 2, 2])
    with pytest.raises(ValueError, match="2 media indices for 3 runs"):
        mrope_groups(positions, visual, [0, 1])


def test_video_runs_group_by_video_and_refuse_broken_frames():
    groups = [Group(0, "image", 0, 2, 2), Group(1, "frame", 4, 1, 2), Group(1, "frame", 6, 1, 2)]
    groups += [Group(2, "frame", 8, 1, 2), Group(2, "frame", 10, 1, 2)]
    assert [[g.start for g in v] for v in video_runs(groups)] == [[4, 6], [8, 10]]
    with pytest.raises(ValueError, match="not consecutive grids of one shape"):
        video_runs([Group(1, "frame", 4, 1, 2), Group(1, "frame", 6, 2, 1)])


# ---------------------------------------------------------------------------------------------------
# inputs of the tiny models


def video(seed: int, frames: int = 6) -> list:
    return testing.sample_video(seed, num_frames=frames)


def build(family: str, samples: list[dict], padding_side: str = "left") -> Any:
    """``testing.build_inputs`` with every given frame kept (``do_sample_frames=False``: the tiny
    Qwen3.5 processor would otherwise sample 6 frames down to 4, i.e. 2 temporal patches)."""
    _, processor = tiny(family)
    texts = [
        processor.apply_chat_template(testing.prompt_messages(s), tokenize=False, add_generation_prompt=True)
        for s in samples
    ]
    kwargs: dict[str, Any] = {}
    images = [list(s.get("images") or ()) for s in samples]
    if any(images):
        kwargs["images"] = images
    videos = [list(v) for s in samples for v in s.get("videos") or ()]
    if videos:
        kwargs["videos"] = videos
    kwargs.update(padding=True, padding_side=padding_side, return_tensors="pt", do_sample_frames=False)
    return processor(text=texts, **kwargs)


def mixed_samples(family: str) -> list[dict]:
    """A left-padded batch: video (+ image where the processor mixes them), an image or a second
    video, a text-only sample, and two videos in one sample."""
    if testing.TINY_FAMILIES[family].mixes_images_and_videos:
        return [
            {"question": "Describe the video.", "images": [testing.sample_image(1)], "videos": [video(0)]},
            {"question": "What is in the image?", "images": [testing.sample_image(2)]},
            {"question": "Say something long enough to differ in length."},
            {"question": "Compare the videos.", "videos": [video(3, 4), video(4)]},
        ]
    return [
        {"question": "Describe the video.", "videos": [video(0)]},
        {"question": "Say something long enough to differ in length."},
        {"question": "Compare the videos.", "videos": [video(3, 4), video(4)]},
    ]


class GroupsSeen(Method):
    """Records ``Signals.groups()`` of every sample and reduces nothing."""

    name = "groups_seen"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.seen: list[list[Group]] = []

    def reduce(self, s: Any) -> Any:

        self.seen.append(s.groups())
        n = s.num_visual
        idx = torch.arange(n)
        return Reduction(kept=idx, sizes=s.sizes.float(), hidden=None, labels=idx)


def groups_of(family: str, x: Any, generate: bool = False) -> list[list[Group]]:
    model, _ = model_for(family)
    method = GroupsSeen(pact.load_config(None, layer=1))
    pact.apply(model, pact.load_config(None, layer=1), method=method)
    with torch.no_grad():
        if generate:  # generate encodes the videos first and passes mm_encoder_outputs, no grids
            model.generate(**x, max_new_tokens=1, do_sample=False)
        else:
            model(**x)
    pact.remove(model)
    return method.seen


def frames(video_index: int, start: int, count: int, rows: int, cols: int) -> list[Group]:
    return [Group(video_index, "frame", start + f * rows * cols, rows, cols) for f in range(count)]


def test_qwen3_vl_groups_are_the_frames_of_each_video_and_images_stay_images():
    """Tiny Qwen3-VL: 32-px tokens; the 96 x 64 image -> grid (1, 8, 10) = a 4 x 5 image; a 6-frame
    96 x 64 video -> (3, 4, 6): 3 temporal patches of 2 x 3 tokens, each its own timestamped run;
    a 4-frame one -> 2 frames."""
    family = "qwen3_vl"
    x = build(family, mixed_samples(family))
    assert x["image_grid_thw"].tolist() == [[1, 8, 10], [1, 8, 10]]
    assert x["video_grid_thw"].tolist() == [[3, 4, 6], [2, 4, 6], [3, 4, 6]]
    expected = [
        [Group(0, "image", 0, 4, 5), *frames(1, 20, 3, 2, 3)],
        [Group(0, "image", 0, 4, 5)],
        # (the text-only sample has no visual token: no reduction, no groups)
        [*frames(0, 0, 2, 2, 3), *frames(1, 12, 3, 2, 3)],
    ]
    assert groups_of(family, x) == expected
    assert groups_of(family, x, generate=True) == expected


def test_qwen3_5_groups_are_the_frames_of_each_video():
    """Tiny Qwen3.5: the image -> (1, 8, 10) = 4 x 5; its video processor caps the pixels of the
    whole video: 6 frames -> (3, 2, 4), 3 frames of 1 x 2 tokens; 4 frames -> (2, 4, 6), 2 frames of
    2 x 3 (two videos of different grids in one sample)."""
    family = "qwen3_5"
    x = build(family, mixed_samples(family))
    assert x["video_grid_thw"].tolist() == [[3, 2, 4], [2, 4, 6], [3, 2, 4]]
    expected = [
        [Group(0, "image", 0, 4, 5), *frames(1, 20, 3, 1, 2)],
        [Group(0, "image", 0, 4, 5)],
        [*frames(0, 0, 2, 2, 3), *frames(1, 12, 3, 1, 2)],
    ]
    assert groups_of(family, x) == expected
    assert groups_of(family, x, generate=True) == expected


def test_glm4v_groups_are_the_frames_between_the_video_markers():
    """Tiny GLM-4.1V (no images next to videos): (3, 4, 6) -> 3 frames of 2 x 3 tokens, each its own
    <|begin_of_image|> run; the 4-frame video -> 2 frames."""
    family = "glm4v"
    x = build(family, mixed_samples(family))
    assert x["video_grid_thw"].tolist() == [[3, 4, 6], [2, 4, 6], [3, 4, 6]]
    expected = [frames(0, 0, 3, 2, 3), [*frames(0, 0, 2, 2, 3), *frames(1, 12, 3, 2, 3)]]
    assert groups_of(family, x) == expected


def test_a_call_without_grids_or_encoded_videos_says_so():
    model, _ = model_for("qwen3_vl")
    x = build("qwen3_vl", [{"question": "Video?", "videos": [video(0)]}])
    inputs = {"input_ids": x["input_ids"], "mm_token_type_ids": x["mm_token_type_ids"]}
    with pytest.raises(ValueError, match="neither video_grid_thw nor per-video encoder outputs"):
        get_adapter(model).run_media(inputs)
    assert get_adapter(model).run_media({**inputs, "video_grid_thw": x["video_grid_thw"]}) == [[0, 0, 0]]


# ---------------------------------------------------------------------------------------------------
# EVS: vLLM's rule on the video embeddings entering layer 0


def vllm_evs_keep(frames_: torch.Tensor, q: float) -> list[int]:
    """vLLM's ``compute_retention_mask`` in plain Python: (F, S, D) -> kept flat indices."""
    count, per_frame, _ = frames_.shape
    score = {}
    for f in range(count):
        for s in range(per_frame):
            if f == 0:
                score[f * per_frame + s] = 255.0
                continue
            a, b = frames_[f, s].double(), frames_[f - 1, s].double()
            score[f * per_frame + s] = 1.0 - float(a @ b) / max(float(a.norm()) * float(b.norm()), 1e-8)
    keep = max(per_frame, int(count * per_frame * (1 - q)))
    return sorted(sorted(score, key=lambda i: (-score[i], i))[:keep])


def expected_evs_kept(model: Any, x: Any, sample: int, q: float) -> list[int]:
    """Visual indices EVS keeps in ``sample`` (a batch of one), from the stock embeddings: every
    image token, and per video (``video_grid_thw`` row, frames in its order) vLLM's rule."""
    embeds = text_model_call(model, x)["inputs_embeds"][sample].float()
    types = x["mm_token_type_ids"][sample]
    visual = (types != 0).nonzero().flatten()  # the stock candidates: image 1, video 2
    is_video = types[visual] == 2
    kept = [i for i in range(visual.numel()) if not bool(is_video[i])]
    video_rows = embeds[visual[is_video]]
    video_index = is_video.nonzero().flatten()
    start = 0
    for t, h, w in x["video_grid_thw"].tolist():
        size = t * h * w // 4
        chunk = video_rows[start : start + size].reshape(t, size // t, -1)
        kept += [int(video_index[start + i]) for i in vllm_evs_keep(chunk, q)]
        start += size
    assert start == video_rows.shape[0]
    return sorted(kept)


@pytest.mark.parametrize("family", TIMESTAMPED)
def test_evs_keeps_vllms_choice_first_frame_included(family):
    samples = mixed_samples(family)
    for sample in (samples[0], samples[-1]):  # video (+ image); two videos
        model, _ = model_for(family)
        x = build(family, [sample])
        expected = expected_evs_kept(model, x, 0, 0.5)
        pact.api.apply(model, pact.load_config("evs", evs_pruning_rate=0.5))
        with torch.no_grad():
            model(**x)
        record = pact.api.stats(model).records[0][0]
        pact.api.remove(model)
        assert record.kept.tolist() == expected
        assert record.kept.numel() < record.labels.numel()
        # the first frame of every video is kept (its tokens score 255)
        for v in video_runs(groups_of(family, x)[0]):
            first = range(v[0].start, v[0].start + v[0].size)
            assert set(first) <= set(expected)


def test_evs_budget_counts_the_image_and_gives_the_rest_to_the_videos():
    """Qwen3-VL, one sample: a 20-token image, a 2-frame and a 3-frame video of 6-token frames
    (12 + 18). target_tokens 35: the image keeps 20, the videos share 15 in proportion,
    12 * 15 // 30 = 6 and 18 * 15 // 30 = 9 (each at least its first frame)."""
    family = "qwen3_vl"
    model, _ = model_for(family)
    sample = {"question": "Compare.", "images": [testing.sample_image(1)], "videos": [video(3, 4), video(4)]}
    x = build(family, [sample])
    assert [g.size for g in groups_of(family, x)[0]] == [20, 6, 6, 6, 6, 6]
    pact.api.apply(model, pact.load_config("evs", target_tokens=35))
    with torch.no_grad():
        model(**x)
    kept = pact.api.stats(model).records[0][0].kept.tolist()
    assert kept[:20] == list(range(20))
    assert len([k for k in kept if 20 <= k < 32]) == 6 and len([k for k in kept if k >= 32]) == 9
    assert set(range(20, 26)) | set(range(32, 38)) <= set(kept)  # the first frames


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", TIMESTAMPED)
def test_evs_equals_the_stock_language_model_on_the_pruned_sequence(family, attn):
    """What vLLM runs on Qwen3-VL: the pruned video tokens never reach the LLM; every other token
    (timestamps, frame markers, text, images) stays with its stock (t, h, w) ids, the kept video
    tokens keep theirs, and DeepStack adds the kept tokens' own features."""
    model, _ = model_for(family, attn)
    x = build(family, [mixed_samples(family)[0]])
    pact.api.apply(model, pact.load_config("evs", evs_pruning_rate=0.5))
    with torch.no_grad():
        reduced = model(**x).logits[0]
    record = pact.api.stats(model).records[0][0]
    pact.api.remove(model)

    call = text_model_call(model, x)
    visual = (x["mm_token_type_ids"][0] != 0).nonzero().flatten()
    dropped = visual[record.labels < 0]
    rows = torch.tensor([t for t in range(x["input_ids"].shape[1]) if t not in set(dropped.tolist())])
    # every non-visual token stays: timestamps and markers included
    assert set(range(x["input_ids"].shape[1])) - set(rows.tolist()) <= set(visual.tolist())
    short = {
        "inputs_embeds": call["inputs_embeds"][:, rows],
        "position_ids": call["position_ids"][..., rows],
        "use_cache": False,
    }
    if call.get("visual_pos_masks") is not None:  # DeepStack: the kept visual tokens' own features
        mask = call["visual_pos_masks"][0]
        kept_rows = mask[rows].nonzero().flatten()
        feature_of = torch.full((mask.numel(),), -1, dtype=torch.long)
        feature_of[mask] = torch.arange(int(mask.sum()))
        keep = feature_of[rows[kept_rows]]
        short["visual_pos_masks"] = call["visual_pos_masks"][:, rows]
        short["deepstack_visual_embeds"] = [f[keep] for f in call["deepstack_visual_embeds"]]
    with torch.no_grad():
        stock = model.lm_head(get_adapter(model).text_model(**short).last_hidden_state)[0]
    torch.testing.assert_close(reduced[rows], stock, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# HoliTom: merges across frames stay in their frame's slots


@pytest.mark.parametrize("family", TIMESTAMPED)
def test_holitom_never_moves_a_token_past_a_timestamp(family):
    """Each output token sits at a visual slot of its own frame: the token placed in the i-th kept
    slot (``kept[order[i]]``) comes from the frame that slot belongs to, so the text between frames
    keeps its place; merged static tokens stand at their center's slot (in the window's first frame)."""
    model, _ = model_for(family)
    x = build(family, [mixed_samples(family)[-1]])
    groups = groups_of(family, x)[0]
    frame_of = torch.full((sum(g.size for g in groups),), -1, dtype=torch.long)
    for f, g in enumerate(groups):
        frame_of[g.start : g.start + g.size] = f
    pact.api.apply(model, pact.load_config("holitom", **HOLITOM))
    with torch.no_grad():
        model(**x)
    st = pact.api.stats(model)
    pact.api.remove(model)
    outer = st.records[0][0]
    assert 0 < outer.kept.numel() < outer.labels.numel()
    placed = outer.kept if outer.order is None else outer.kept[outer.order]
    assert torch.equal(frame_of[placed], frame_of[outer.kept])
    # every token a kept token stands for lies in a frame at or after the kept token's (static
    # merges span a window of frames from its first one), and within the same video
    for r, slot in enumerate(outer.kept.tolist()):
        members = (outer.labels == r).nonzero().flatten()
        assert bool((frame_of[members] >= frame_of[slot]).all())
        assert len({groups[int(f)].image for f in frame_of[members]}) == 1
    assert st.visual_after[0] < outer.kept.numel()  # the inner merge at layer 2 ran too


def returned_reductions(model: Any) -> list[Reduction]:
    """The Reductions the applied method returns (order and hidden are not in the engine's records)."""
    method = pact.api.engine_of(model).method
    out: list[Reduction] = []
    reduce = method.reduce

    def wrapped(signals: Any) -> Reduction:
        out.append(reduce(signals))
        return out[-1]

    method.reduce = wrapped  # this instance only; pact.remove drops the method
    return out


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", TIMESTAMPED)
def test_holitom_outer_merge_equals_the_stock_model_on_its_short_sequence(family, attn):
    """The outer merge as a shorter input of the stock language model: the kept visual slots, in
    sequence order, hold HoliTom's tokens in its order (each at its own (t, h, w) ids: a merged static
    token its center's), every text row (timestamps, markers) stays with its stock ids, and on
    Qwen3-VL DeepStack adds to each token the mean of its members' features (a kept token: its own).
    Every text row's logits agree."""
    model, _ = model_for(family, attn)
    x = build(family, [mixed_samples(family)[-1]])
    pact.api.apply(model, pact.load_config("holitom", holitom_inner_layer=None, holitom_retain_ratio=0.4))
    reds = returned_reductions(model)
    with torch.no_grad():
        reduced = model(**x).logits[0]
    red = reds[0]
    pact.api.remove(model)
    assert 0 < red.kept.numel() < red.labels.numel() and red.hidden is not None
    merged = torch.bincount(red.labels[red.labels >= 0], minlength=red.kept.numel())
    assert int(merged.max()) > 1, "no token was merged across frames"

    call = text_model_call(model, x)
    embeds, positions = call["inputs_embeds"][0], call["position_ids"][:, 0]
    visual = (x["mm_token_type_ids"][0] != 0).nonzero().flatten()
    token = red.kept if red.order is None else red.kept[red.order]  # what the i-th kept slot holds
    source = red.order if red.order is not None else torch.arange(red.kept.numel())
    slot_of = {int(visual[s]): i for i, s in enumerate(red.kept.tolist())}
    dropped = set(visual.tolist()) - set(slot_of)
    rows, row_pos, text_rows, is_visual, deepstack_rows = [], [], [], [], []
    features = call.get("deepstack_visual_embeds")
    for t in range(embeds.shape[0]):
        if t in dropped:
            continue
        if t in slot_of:
            i = slot_of[t]
            rows.append(red.hidden[source[i]].to(embeds.dtype))
            row_pos.append(positions[:, visual[token[i]]])
            is_visual.append(True)
            deepstack_rows.append((red.labels == source[i]).nonzero().flatten())
        else:
            text_rows.append((t, len(rows)))
            rows.append(embeds[t])
            row_pos.append(positions[:, t])
            is_visual.append(False)
    short = {
        "inputs_embeds": torch.stack(rows)[None],
        "position_ids": torch.stack(row_pos, 1)[:, None],
        "use_cache": False,
    }
    if features is not None:  # DeepStack rows follow the visual tokens, image and video alike
        short["visual_pos_masks"] = torch.tensor(is_visual)[None]
        short["deepstack_visual_embeds"] = [
            torch.stack([f[members].float().mean(0).to(f.dtype) for members in deepstack_rows])
            for f in features
        ]
    with torch.no_grad():
        stock = model.lm_head(get_adapter(model).text_model(**short).last_hidden_state)[0]
    src = [t for t, _ in text_rows]
    dst = [r for _, r in text_rows]
    torch.testing.assert_close(reduced[src], stock[dst], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# both methods: decoding and batches


CONFIGS = {"evs": {"evs_pruning_rate": 0.5}, "holitom": HOLITOM}


def greedy(model: Any, x: Any, **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(**x, max_new_tokens=3, min_new_tokens=3, do_sample=False, **kw)
    return out[:, x["input_ids"].shape[1] :]


def kept_lists(model: Any) -> list[list[int]]:
    return [r.kept.tolist() if r is not None else [] for r in pact.api.stats(model).records[0]]


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("family", TIMESTAMPED)
def test_cached_equals_uncached_and_batch_equals_each_alone(family, name, attn):
    model, _ = model_for(family, attn)
    samples = mixed_samples(family)
    batch = build(family, samples)
    assert bool((batch["attention_mask"] == 0).any()), "the batch is not padded"
    pact.api.apply(model, pact.load_config(name, **CONFIGS[name]))
    cached = greedy(model, batch)
    batched = kept_lists(model)
    assert torch.equal(greedy(model, batch, use_cache=False), cached)
    st = pact.api.stats(model)
    with_video = [bool((row == 2).any()) for row in batch["mm_token_type_ids"]]
    assert st.visual_before == [int((row != 0).sum()) for row in batch["mm_token_type_ids"]]
    first_step = [len(kept) for kept in kept_lists(model)]  # (HoliTom's inner merge takes images too)
    for after, before, video_in in zip(first_step, st.visual_before, with_video, strict=True):
        assert after < before if video_in else after == before  # images and text untouched
    for i, sample in enumerate(samples):
        alone = build(family, [sample])
        assert torch.equal(greedy(model, alone), cached[i : i + 1]), f"sample {i} differs in a batch"
        if alone["mm_token_type_ids"].any():
            assert kept_lists(model)[0] == batched[i]


# ---------------------------------------------------------------------------------------------------
# still refused


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("family", ["internvl", "smolvlm"])
def test_frames_that_are_images_stay_refused(family, name):
    model, _ = model_for(family)
    assert get_adapter(model).video_frames_as_images
    with pytest.raises(ValueError, match="nothing in the call tells apart from images"):
        pact.api.apply(model, pact.load_config(name, **CONFIGS[name]))
