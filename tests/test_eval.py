"""pact.eval: metric helpers, the lmms-eval wrapper in process (log-likelihood and generation under
reduction), reports and plots from synthetic runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pact.eval import metrics as M

# ---------------------------------------------------------------------------------------------------
# Metric helpers (pure)


def test_layer_mean_visual_one_step_and_progressive():
    # 100 tokens, 10 layers, one step before layer 4 leaving 30: layers 0-3 see 100, 4-9 see 30.
    assert M.layer_mean_visual(100, [(4, 30)], 10) == pytest.approx((4 * 100 + 6 * 30) / 10)
    # Progressive: steps before layers 2 and 5 (unsorted input).
    assert M.layer_mean_visual(100, [(5, 20), (2, 60)], 10) == pytest.approx((2 * 100 + 3 * 60 + 5 * 20) / 10)
    assert M.layer_mean_visual(100, [], 10) == 100
    # VTW-like: everything withdrawn before layer 8.
    assert M.layer_mean_visual(50, [(8, 0)], 10) == pytest.approx(8 * 50 / 10)


def test_equivalent_ratio_equals_plain_ratio_for_one_step_methods():
    before, left, n, layer = 200, 50, 28, 4
    layer_mean_ratio = 1 - M.layer_mean_visual(before, [(layer, left)], n) / before
    assert M.equivalent_reduction_ratio(layer_mean_ratio, n, layer) == pytest.approx(1 - left / before)


def test_summarize_token_weighted_and_skips_padding():
    samples = [
        M.SampleRecord("a", 0, "generate_until", 100, 10, 55.0, 0),
        M.SampleRecord("a", 1, "generate_until", 300, 150, 225.0, 0),
        M.SampleRecord("b", 0, "loglikelihood", 0, 0, 0.0, 1),
        M.SampleRecord("b", 0, "loglikelihood", 1000, 0, 0.0, 1, padding=True),
    ]
    batches = [
        M.BatchRecord("generate_until", 2, 0.1, 0.5, 1.0, 1.6, 0.2, 10, 8, 0.05, 2.0),
        M.BatchRecord("loglikelihood", 2, 0.1, 0.3, 0.0, 0.4, None, 0, 0, 0.0, 3.0),
    ]
    s = M.summarize(samples, batches, n_layers=4, reference_layer=2)
    assert s["num_requests"] == 3
    assert s["reduction_ratio"] == pytest.approx(1 - 160 / 400)  # not the per-sample mean (0.7)
    assert s["layer_mean_reduction_ratio"] == pytest.approx(1 - 280 / 400)
    assert s["equivalent_reduction_ratio"] == pytest.approx((1 - 280 / 400) * 4 / 2)
    assert s["decode_tokens_per_second"] == pytest.approx(8 / 1.0)
    assert s["end_to_end_seconds_total"] == pytest.approx(2.0)
    assert s["samples_per_second"] == pytest.approx(3 / 2.0)
    assert s["peak_memory_gb_max"] == 3.0 and s["peak_memory_gb_mean"] == 2.5
    per_task = M.summarize_tasks(samples, n_layers=4, reference_layer=2)
    assert per_task["a"]["reduction_ratio"] == pytest.approx(1 - 160 / 400)
    assert per_task["b"] == {
        "num_requests": 1,
        "visual_tokens_before": 0,
        "visual_tokens_after": 0,
        "reduction_ratio": 0.0,
        "layer_mean_reduction_ratio": 0.0,
        "equivalent_reduction_ratio": 0.0,
    }
    table = M.format_table(s, title="t", memory_kind="cpu_peak_rss")
    assert "reduction ratio" in table and "0.6000" in table and "[cpu_peak_rss]" in table


def test_recorder_merge_offsets_batches():
    a, b = M.RunRecorder(), M.RunRecorder()
    batch = M.BatchRecord("generate_until", 1, 0, 0, 0, 0, None, 0, 0, 0, None)
    a.add_batch(batch, [M.SampleRecord("t", 0, "generate_until", 1, 1, 1.0, -1)])
    b.add_batch(batch, [M.SampleRecord("t", 1, "generate_until", 1, 1, 1.0, -1)])
    b.add_batch(batch, [M.SampleRecord("t", 2, "generate_until", 1, 1, 1.0, -1)])
    merged = M.RunRecorder.merge([a, b])
    assert [s.batch for s in merged.samples] == [0, 1, 2] and len(merged.batches) == 3


@pytest.mark.parametrize(
    ("config", "label"),
    [
        ({"reduction": False}, "no_reduction"),
        ({"pruning": "euti", "clustering": "dbdpc"}, "pact"),
        ({"pruning": "none", "clustering": "dbdpc"}, "dbdpc"),
        ({"pruning": "withdraw", "clustering": "none"}, "vtw"),
        ({"pruning": "fastv", "clustering": "none"}, "fastv"),
        ({"pruning": "none", "clustering": "agglomerative", "linkage": "average"}, "agglomerative_average"),
        ({"pruning": "fastv", "clustering": "tome"}, "fastv+tome"),
    ],
)
def test_method_label(config, label):
    assert M.method_label(config) == label


def test_reference_layer():
    assert M.reference_layer({"layer": 3, "pruning": "euti"}) == 3
    assert M.reference_layer({"layer": 0, "pruning": "withdraw", "vtw_equivalent_layer": 4}) == 4
    assert M.reference_layer({"layer": 0, "clustering": "tome", "tome_equivalent_layer": 4}) == 4
    # Stage schedules: the first stage, scaled to the model's depth as the method runs it.
    from pact.config import load_config
    from pact.methods.pdrop import PyramidDrop
    from pact.methods.v2drop import V2Drop

    v2drop, pdrop = load_config("v2drop"), load_config("pdrop")
    for n_layers in (8, 28, 32):
        assert M.reference_layer(v2drop.to_dict(), n_layers) == V2Drop(v2drop).stages(n_layers)[0]
        assert M.reference_layer(pdrop.to_dict(), n_layers) == PyramidDrop(pdrop).layers(n_layers)[0]
    assert M.reference_layer(pdrop.to_dict(), 32) == 8 and M.reference_layer(v2drop.to_dict(), 32) == 3


def test_memory_meter_cpu_reports_reset_peak():
    meter = M.MemoryMeter(torch.device("cpu"))
    assert meter.kind.startswith("cpu_peak_rss")
    meter.reset()
    base = meter.peak_gb()
    block = bytearray(200 * 1024 * 1024)  # touch 200 MB
    block[::4096] = b"x" * len(block[::4096])
    high = meter.peak_gb()
    del block
    assert high > base
    if meter.kind == "cpu_peak_rss":  # the counter really resets
        meter.reset()
        assert meter.peak_gb() < high - 0.1


# ---------------------------------------------------------------------------------------------------
# The lmms-eval wrapper, in process

lmms_eval = pytest.importorskip("lmms_eval")


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    from pact import testing

    return testing.save_tiny("qwen2_vl", tmp_path_factory.mktemp("eval_tiny") / "qwen2_vl")


def _docs() -> list[dict]:
    from pact.testing import sample_image

    return [
        {"question": "What is in the picture?", "image": sample_image(0, (96, 64))},
        {"question": "Describe it.", "image": sample_image(1, (128, 96))},
        {"question": "Is the sky green?", "image": None},
        {"question": "What color is the largest shape in this image?", "image": sample_image(3, (64, 112))},
    ]


def doc_to_visual(doc: dict) -> list:
    return [] if doc["image"] is None else [doc["image"]]


def _requests(kind: str, docs: list[dict], second: list) -> list:
    from lmms_eval.api.instance import Instance

    return [
        Instance(
            request_type=kind,
            arguments=(doc["question"], second[i], doc_to_visual, i, "t", "test"),
            idx=0,
            metadata={"task": "t", "doc_id": i, "repeats": 1},
        )
        for i, doc in enumerate(docs)
    ]


def _wrapper(path: Path, **kwargs):
    from pact.eval.models import PactQwen2VL

    lm = PactQwen2VL(pretrained=str(path), device="cpu", dtype="float32", **kwargs)
    lm.task_dict = {"t": {"test": _docs()}}
    return lm


def test_loglikelihood_under_reduction_matches_manual_computation(tiny_qwen):
    """Batched (2), left-padded log-likelihoods under PACT equal a by-hand single-sample computation
    from the full-length logits, and the reduction really ran."""
    from lmms_eval.api.instance import GenerationResult

    import pact.api

    lm = _wrapper(tiny_qwen, layer=2, batch_size=2)
    docs = lm.task_dict["t"]["test"]
    conts = [" red", " a small blue square on the left", "yes", " no it is not"]
    reqs = _requests("loglikelihood", docs, conts)
    values = lm.loglikelihood_values(reqs)
    wrapped = lm.loglikelihood(reqs)  # what lmms-eval 0.7.3 receives
    assert all(isinstance(w, GenerationResult) for w in wrapped)
    assert [w.text for w in wrapped] == values

    for i, doc in enumerate(docs):
        images = doc_to_visual(doc)
        prompt = lm._prompt(doc["question"], len(images), 0)
        extra = {"images": [images]} if images else {}
        enc = lm.processor(text=[prompt], return_tensors="pt", **extra)
        cont = torch.tensor(lm.tokenizer(conts[i], add_special_tokens=False)["input_ids"])
        inputs = dict(enc)
        inputs["input_ids"] = torch.cat([enc["input_ids"][0], cont])[None]
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"][0], torch.zeros_like(cont)])[None]
        with torch.no_grad():
            logits = lm.model(**inputs).logits[0]
        T, n = inputs["input_ids"].shape[1], cont.numel()
        assert logits.shape[0] == T  # the engine keeps the input length
        logp = torch.log_softmax(logits[T - n - 1 : T - 1].float(), -1)
        manual = float(logp.gather(-1, cont[:, None]).sum())
        assert values[i][0] == pytest.approx(manual, abs=2e-4), i
        st = pact.api.stats(lm.model)
        if images:
            assert st.visual_after[0] < st.visual_before[0]
    recs = [s for s in lm.recorder.samples if s.kind == "loglikelihood"][:4]  # first of the two calls
    assert len(recs) == 4 and sum(s.visual_after for s in recs) < sum(s.visual_before for s in recs)


def test_generate_until_batched_equals_one_by_one(tiny_qwen):
    lm = _wrapper(tiny_qwen, layer=2, batch_size=2)
    docs = lm.task_dict["t"]["test"]
    reqs = _requests(
        "generate_until", docs, [{"max_new_tokens": 5, "do_sample": False, "until": ["\n\n"]}] * 4
    )
    batched = lm.generate_until(reqs)
    first = {(s.doc_id): (s.visual_before, s.visual_after) for s in lm.recorder.samples}
    lm.batch_size_per_gpu = 1
    single = lm.generate_until(reqs)
    second = {(s.doc_id): (s.visual_before, s.visual_after) for s in lm.recorder.samples[4:]}
    assert batched == single and all(isinstance(t, str) for t in batched)
    assert first == second
    assert first[2] == (0, 0) and all(b > a for d, (b, a) in first.items() if d != 2)
    kinds = [b.kind for b in lm.recorder.batches]
    assert kinds == ["generate_until"] * 6 and lm.recorder.batches[0].size == 2
    assert all(b.generated_tokens > 0 and b.prefill_s > 0 for b in lm.recorder.batches)
    doc = lm.finalize_metrics()  # no lmms-eval run around us: summary only, nothing written
    assert doc["summary"]["num_requests"] == 8 and doc["written_to"] == []
    assert 0 < doc["summary"]["reduction_ratio"] < 1


def test_multi_round_follows_doc_to_text_and_reduces_every_round(tiny_qwen):
    """lmms-eval's multi-round protocol: round 0 answers the context, later rounds come from
    doc_to_text (which sees the earlier answers) until it signals the end; each round is a reduced
    prefill and equals a plain generate_until of the same context and visuals."""
    from lmms_eval.api.instance import Instance

    lm = _wrapper(tiny_qwen, layer=2, batch_size=1)
    docs = lm.task_dict["t"]["test"]
    seen: list[tuple[int, list[str]]] = []

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        seen.append((round_idx, list(previous_output)))
        context = f"Earlier you said: {previous_output[-1]!r}. Say more."
        info = {"rounds": round_idx}
        return doc_to_visual(doc), context, round_idx >= 2, previous_output, info

    gen = {"max_new_tokens": 4, "do_sample": False, "until": ["\n\n"]}
    req = Instance(
        request_type="generate_until_multi_round",
        arguments=(docs[0]["question"], gen, doc_to_visual, doc_to_text, 0, "t", "test"),
        idx=0,
        metadata={"task": "t", "doc_id": 0, "repeats": 1},
    )
    (answers,) = lm.generate_until_multi_round([req])
    assert len(answers) == 2 and [r for r, _ in seen] == [1, 2]
    assert seen[0][1] == [answers[0]] and seen[1][1] == list(answers)
    second = f"Earlier you said: {answers[0]!r}. Say more."
    follow_up = Instance(
        request_type="generate_until",
        arguments=(second, gen, doc_to_visual, 0, "t", "test"),
        idx=0,
        metadata={"task": "t", "doc_id": 0, "repeats": 1},
    )
    plain = lm.generate_until([*_requests("generate_until", docs[:1], [gen]), follow_up])
    assert tuple(plain) == answers
    rounds = [s for s in lm.recorder.samples if s.kind == "generate_until_multi_round"]
    assert len(rounds) == 2 and all(s.visual_after < s.visual_before for s in rounds)


@pytest.mark.parametrize(
    "family",
    ["qwen2_5_vl", "llava_onevision", "llava_next", "llava", "internvl", "smolvlm", "glm4v", "gemma3"],
)
def test_every_family_generates_and_scores_under_reduction(family, tmp_path):
    """Each registered model: generation and log-likelihoods at batch size 2 equal batch size 1,
    with a reduction on every image prompt (Qwen2-VL is covered in depth above)."""
    from pact import testing
    from pact.eval.models import FAMILY_CLASSES

    path = testing.save_tiny(family, tmp_path / family)
    lm = FAMILY_CLASSES[family](pretrained=str(path), device="cpu", dtype="float32", layer=2, batch_size=2)
    lm.task_dict = {"t": {"test": _docs()}}
    docs = lm.task_dict["t"]["test"]
    gen = _requests("generate_until", docs, [{"max_new_tokens": 3}] * 4)
    ll = _requests("loglikelihood", docs, [" red", " a blue square", "yes", " no"])
    batched = (lm.generate_until(gen), lm.loglikelihood_values(ll))
    lm.batch_size_per_gpu = 1
    single = (lm.generate_until(gen), lm.loglikelihood_values(ll))
    assert batched[0] == single[0]
    for (a, ga), (b, gb) in zip(batched[1], single[1], strict=True):
        assert a == pytest.approx(b, abs=2e-4) and ga == gb
    for s in lm.recorder.samples:
        assert (s.visual_before == 0) == (s.doc_id == 2)
        assert s.visual_after < s.visual_before or s.visual_before == 0


def test_videos_from_files_and_frame_lists(tiny_qwen, tmp_path):
    """A video file (decoded with PyAV, ``frames`` sampled) and a list of frames in one batch."""
    import av
    from lmms_eval.api.instance import Instance

    from pact.testing import sample_video

    clip = tmp_path / "clip.mp4"
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("mpeg4", rate=6)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for frame in sample_video(0, num_frames=6, size=(64, 48)):
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())
    lm = _wrapper(tiny_qwen, layer=2, batch_size=2, frames=4)
    lm.task_dict = {"v": {"test": [{"video": str(clip)}, {"video": sample_video(1, 8, (64, 48))}]}}
    args = [
        ("What happens?", {"max_new_tokens": 2}, lambda d: [d["video"]], i, "v", "test") for i in range(2)
    ]
    reqs = [Instance("generate_until", a, 0, {"task": "v", "doc_id": a[3], "repeats": 1}) for a in args]
    assert all(isinstance(t, str) for t in lm.generate_until(reqs))
    # 4 frames of 48 x 64 pixels: 2 temporal patches x 4 merged 28-pixel tokens each.
    assert [s.visual_before for s in lm.recorder.samples] == [8, 8]
    assert all(s.visual_after < s.visual_before for s in lm.recorder.samples)


def test_load_video_samples_frames_uniformly(tmp_path):
    """Frames are sampled uniformly over the file (first and last included) and decoded as RGB."""
    import av

    from pact.eval.models import load_video

    clip = tmp_path / "ramp.mp4"
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for level in range(0, 250, 25):  # 10 frames, frame i has grey level 25 * i
            frame = np.full((32, 32, 3), level, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    video = load_video(str(clip), 4)  # frames 0, 3, 6, 9
    assert video.shape == (4, 32, 32, 3) and video.dtype == np.uint8
    assert np.abs(video.reshape(4, -1).mean(1) - [0, 75, 150, 225]).max() < 6
    assert load_video(str(clip), 50).shape[0] == 10  # never more frames than the file has


def test_gemma3_pan_and_scan_option(tmp_path):
    """`do_pan_and_scan=true` reaches Gemma 3's processor: a wide image becomes the original plus
    crops (more visual tokens, all reduced), generation at batch size 2 equals batch size 1; the
    option is refused on other families and with a non-boolean value, naming the key."""
    from pact import testing
    from pact.eval.models import PactGemma3, PactQwen2VL

    path = testing.save_tiny("gemma3", tmp_path / "gemma3")
    docs = [
        {"question": "What is in the picture?", "image": testing.sample_image(0, (1200, 300))},
        {"question": "Is the sky green?", "image": None},
        {"question": "Describe it.", "image": testing.sample_image(1, (96, 96))},
    ]
    counts = {}
    for flag in (False, True):
        lm = PactGemma3(pretrained=str(path), device="cpu", dtype="float32", layer=2, do_pan_and_scan=flag)
        lm.task_dict = {"t": {"test": docs}}
        gen = _requests("generate_until", docs, [{"max_new_tokens": 3}] * 3)
        batched = lm.generate_until(gen)
        lm.batch_size_per_gpu = 2
        assert lm.generate_until(gen) == batched
        counts[flag] = [s.visual_before for s in lm.recorder.samples[:3]]
        assert all(s.visual_after < s.visual_before for s in lm.recorder.samples if s.visual_before)
    assert counts[False] == [16, 0, 16]
    assert counts[True][0] > 16 and counts[True][0] % 16 == 0 and counts[True][1:] == [0, 16]
    with pytest.raises(ValueError, match="do_pan_and_scan=true: pan-and-scan is an option of Gemma 3"):
        PactQwen2VL(pretrained=str(path), device="cpu", do_pan_and_scan=True)
    with pytest.raises(ValueError, match="do_pan_and_scan"):
        PactGemma3(pretrained=str(path), device="cpu", do_pan_and_scan="maybe")


def test_bad_model_args_name_the_key(tiny_qwen):
    from pact.eval.models import PactLlavaOnevision, PactQwen2VL

    with pytest.raises(ValueError, match="kep_ratio"):
        PactQwen2VL(pretrained=str(tiny_qwen), device="cpu", kep_ratio=0.5)
    with pytest.raises(ValueError, match="pact_qwen2_vl"):
        PactLlavaOnevision(pretrained=str(tiny_qwen), device="cpu")


def test_helpers():
    from pact.eval.models import (
        batches,
        continuation_logprob,
        cut_at_stop,
        group_by_kwargs,
        merge_model_args,
        parse_value,
    )

    assert cut_at_stop("yes.\n\nmore", ["\n\n", "."]) == "yes"
    assert cut_at_stop("abc", ["", "z"]) == "abc"
    assert batches([5, 6, 7], 2) == [[5, 6], [7]]
    groups = group_by_kwargs([{"a": 1}, {"a": 2}, {"a": 1}], [3, 9, 7])
    assert groups == [[2, 0], [1]]
    logits = torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    ll, greedy = continuation_logprob(logits, torch.tensor([1, 0]))
    expected = float(torch.log_softmax(logits, -1)[0, 1] + torch.log_softmax(logits, -1)[1, 0])
    assert ll == pytest.approx(expected) and greedy
    assert continuation_logprob(logits, torch.tensor([0, 0]))[1] is False
    assert merge_model_args(
        {"device": "cpu"}, {"device": "cuda", "batch_size": 2, "max_batch_size": None}
    ) == {
        "device": "cpu",
        "batch_size": 2,
    }
    assert parse_value("null") is None and parse_value("none") == "none" and parse_value(0.5) == 0.5


def test_manifests_and_entry_point_table():
    from pact.eval.manifest import ENTRY_POINTS, MANIFESTS
    from pact.eval.models import FAMILY_CLASSES
    from pact.testing import FAMILIES

    assert [m.model_id for m in MANIFESTS] == [f"pact_{f}" for f in FAMILIES]
    for m in MANIFESTS:
        cls_name = m.simple_class_path.rsplit(".", 1)[1]
        assert FAMILY_CLASSES[m.model_id[len("pact_") :]].__name__ == cls_name
        assert FAMILY_CLASSES[m.model_id[len("pact_") :]].is_simple
    assert ENTRY_POINTS == {"pact": "pact.eval.manifest:MANIFESTS"}


def test_family_tables_are_derived_from_the_adapters():
    """Every family list (lmms-eval classes and manifests, entry points, `pact methods`, the tiny
    models) is the adapter table: one entry per adapter, its class names, checkpoint and video flag."""
    import importlib

    from pact import testing
    from pact.eval.manifest import ENTRY_POINTS
    from pact.eval.models import FAMILIES, FAMILY_CLASSES
    from pact.methods.listing import FAMILIES as LISTED
    from pact.models import ADAPTERS

    assert tuple(ADAPTERS) == testing.FAMILIES == LISTED == tuple(FAMILIES) == tuple(FAMILY_CLASSES)
    assert tuple(f for f, adapter in ADAPTERS.items() if adapter.has_video) == testing.VIDEO_FAMILIES
    assert testing.VIDEO_FAMILIES[:4] == ("qwen2_vl", "qwen2_5_vl", "llava_onevision", "internvl")
    assert {"qwen3_vl", "qwen3_5", "smolvlm", "glm4v"} <= set(testing.VIDEO_FAMILIES)
    for family, adapter in ADAPTERS.items():
        class_name, model_types, checkpoint, video = FAMILIES[family]
        assert (class_name, model_types, video) == (
            adapter.class_names[0],
            adapter.model_types,
            adapter.has_video,
        )
        assert checkpoint and checkpoint == adapter.default_checkpoint
        assert testing.model_class(family).__name__ == class_name
        module, attr = ENTRY_POINTS["pact"].split(":")
        (manifest,) = [
            m for m in getattr(importlib.import_module(module), attr) if m.model_id == f"pact_{family}"
        ]
        path, name = manifest.simple_class_path.rsplit(".", 1)
        cls = getattr(importlib.import_module(path), name)
        assert cls is FAMILY_CLASSES[family] and cls.family == family


# ---------------------------------------------------------------------------------------------------
# Reports and plots from synthetic runs


def _write_run(root: Path, date: str, label_cfg: dict, scores: dict, per_task: dict, summary: dict) -> None:
    d = root / "org__model"
    d.mkdir(parents=True, exist_ok=True)
    results = {
        "results": {t: {"alias": t, **{f"{m},none": v for m, v in ms.items()}} for t, ms in scores.items()},
        "configs": {t: {} for t in scores},
        "higher_is_better": {t: {m: m != "wer" for m in ms} for t, ms in scores.items()},
        "config": {"model": "pact_qwen2_vl", "model_args": "pretrained=org/model"},
    }
    (d / f"{date}_results.json").write_text(json.dumps(results))
    metrics = {"pretrained": "org/model", "config": label_cfg, "summary": summary, "per_task": per_task}
    (d / f"{date}_pact_metrics.json").write_text(json.dumps(metrics))


def _synthetic_runs(root: Path) -> None:
    ref = {"reduction": False}
    pact_cfg = {"reduction": True, "pruning": "euti", "clustering": "dbdpc", "keep_ratio": 0.55}
    fastv = {"reduction": True, "pruning": "fastv", "clustering": "none", "keep_ratio": 0.5}
    speed = {"samples_per_second": 1.0, "peak_memory_gb_max": 27.4}
    _write_run(
        root / "ref",
        "20250101_000000",
        ref,
        {"a": {"acc": 0.8}, "b": {"wer": 0.2, "bleu": 0.5}},
        {
            "a": {"reduction_ratio": 0.0, "visual_tokens_before": 100, "visual_tokens_after": 100},
            "b": {"reduction_ratio": 0.0, "visual_tokens_before": 300, "visual_tokens_after": 300},
        },
        speed,
    )
    for date, cfg, sa, sb, ra, rb in [
        ("20250102_000000", pact_cfg, 0.79, (0.21, 0.49), 0.7, 0.71),
        ("20250103_000000", fastv, 0.76, (0.25, 0.45), 0.5, 0.5),
        ("20250104_000000", {**fastv, "keep_ratio": 0.3}, 0.7, (0.3, 0.4), 0.7, 0.7),
    ]:
        per_task = {
            "a": {
                "reduction_ratio": ra,
                "visual_tokens_before": 100,
                "visual_tokens_after": round(100 * (1 - ra)),
            },
            "b": {
                "reduction_ratio": rb,
                "visual_tokens_before": 300,
                "visual_tokens_after": round(300 * (1 - rb)),
            },
        }
        _write_run(
            root / cfg["pruning"],
            date,
            cfg,
            {"a": {"acc": sa}, "b": {"wer": sb[0], "bleu": sb[1]}},
            per_task,
            {"samples_per_second": 2.25, "peak_memory_gb_max": 19.05},
        )


def test_report_pairs_reference_and_averages(tmp_path):
    from pact.eval import report

    _synthetic_runs(tmp_path)
    rows = report.build_rows(report.find_runs([tmp_path]))
    assert len(rows) == 8
    row = next(r for r in rows if r.method == "pact" and r.task == "b")
    # wer is lower-is-better (ref/score), bleu higher-is-better (score/ref); the task averages both.
    assert row.ratio == pytest.approx((0.2 / 0.21 + 0.49 / 0.5) / 2)
    assert row.throughput_ratio == pytest.approx(2.25) and row.peak_memory_gb == 19.05
    assert row.reference_peak_memory_gb == 27.4
    points = {(p.method, round(p.reduction_ratio, 3)): p for p in report.summarize_points(rows)}
    pact_point = points[("pact", round(1 - (30 + 87) / 400, 3))]  # token-weighted over a and b
    assert pact_point.benchmarks == 2
    assert pact_point.metric_ratio == pytest.approx((0.79 / 0.8 + row.ratio) / 2)
    assert points[("no_reduction", 0.0)].metric_ratio == pytest.approx(1.0)
    assert len([p for p in points if p[0] == "fastv"]) == 2

    csv_path, md_path = tmp_path / "r.csv", tmp_path / "r.md"
    assert report.main([str(tmp_path), "--csv", str(csv_path), "--markdown", str(md_path)]) == 0
    assert csv_path.read_text().count("\n") == 9 and "| pact |" in md_path.read_text()


def test_plot_writes_png(tmp_path):
    from pact.eval import plot

    _synthetic_runs(tmp_path / "runs")
    out = tmp_path / "fig.png"
    assert plot.main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    # Nothing to plot without a reference run: a clear message, exit code 1.
    empty = tmp_path / "noref"
    _synthetic_runs(empty)
    for f in (empty / "ref").rglob("*.json"):
        f.unlink()
    assert plot.main([str(empty), "--out", str(tmp_path / "x.png")]) == 1


def test_plot_legend_names_the_ablation_runs():
    from pact.eval.plot import display_name

    assert display_name("pact_layer8") == "PACT at layer 8"
    assert display_name("pact_no_retrieval") == "PACT (no retrieval)"
    assert display_name("euti_global_query") == "EUTI (global query only)"
    assert display_name("my_method") == "my_method"
