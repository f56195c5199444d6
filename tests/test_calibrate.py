"""`pact calibrate`: the key-distance statistics against hand-worked values and against the keys the
model really caches, the layer rule on a model whose first layers' keys are made identical, the
cutoff calibration reaching its target through ``pact.apply``, and the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch

import pact
from pact import calibrate as cal
from pact import testing
from pact.models import get_adapter

# ---------------------------------------------------------------------------------------------------
# Pure functions


def test_key_distance_stats_hand_worked():
    """e1, e2, -e1: distances 1 (e1, e2), 2 (e1, -e1), 1 (e2, -e1); the scale of a row is irrelevant."""
    keys = torch.tensor([[1.0, 0.0], [0.0, 3.0], [-2.0, 0.0]])
    st = cal.key_distance_stats(keys, percentiles=(5, 50, 99))
    assert st["pairs"] == 3
    assert st["max"] == pytest.approx(2.0) and st["mean"] == pytest.approx(4 / 3)
    step = 2.0 / cal.HIST_BINS  # percentiles are upper histogram edges
    assert 1.0 <= st["p5"] <= 1.0 + step and 1.0 <= st["p50"] <= 1.0 + step
    assert st["p99"] == pytest.approx(2.0)
    one = cal.key_distance_stats(keys[:1])
    assert one["max"] == 0.0 and one["pairs"] == 0


def test_key_distance_stats_blocks_and_percentiles_match_exact_values():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(37, 8, generator=g)
    x = keys / keys.norm(dim=1, keepdim=True)
    iu = torch.triu_indices(37, 37, offset=1)
    exact = (1 - x @ x.T).clamp(min=0)[iu[0], iu[1]]
    whole = cal.key_distance_stats(keys)
    blocked = cal.key_distance_stats(keys, block_rows=5)  # uneven blocks, last one partial
    assert whole == pytest.approx(blocked, abs=1e-6)
    assert whole["max"] == pytest.approx(float(exact.max()), abs=1e-6)
    assert whole["mean"] == pytest.approx(float(exact.mean()), abs=1e-6)
    ranked = exact.sort().values
    for q in cal.PERCENTILES:
        nearest_rank = ranked[max(1, math.ceil(q / 100 * exact.numel())) - 1]
        assert float(nearest_rank) <= whole[f"p{q}"] <= float(nearest_rank) + 2.0 / cal.HIST_BINS + 1e-6
    with pytest.raises(ValueError, match="NaN"):
        cal.key_distance_stats(torch.full((3, 2), float("nan")))


def test_choose_layer_rule():
    values = [0.01, 0.02, 0.30, 0.90, 1.00, 0.95, 1.5, 1.6]
    # relative: half of the largest candidate (layers 0..4, the first half) = 0.5 -> layer 3
    assert cal.choose_layer(values) == (3, pytest.approx(0.5))
    assert cal.choose_layer(values, threshold=0.25)[0] == 2
    assert cal.choose_layer(values, rule="absolute", threshold=0.25)[0] == 2
    assert cal.choose_layer(values, min_layer=4)[0] == 4
    assert cal.choose_layer(values, max_layer=7)[0] == 3  # 0.5 * 1.6 = 0.8
    with pytest.raises(ValueError, match=r"absolute threshold 1\.2"):
        cal.choose_layer(values, rule="absolute", threshold=1.2)
    with pytest.raises(ValueError, match="identical"):
        cal.choose_layer([0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        cal.choose_layer(values, threshold=1.5)
    with pytest.raises(ValueError, match="candidate layers"):
        cal.choose_layer(values, min_layer=6, max_layer=3)


def test_keep_ratio_for_reproduces_the_paper_point():
    assert cal.keep_ratio_for(0.713) == pytest.approx(0.55)


# ---------------------------------------------------------------------------------------------------
# Against the model


def _samples(n: int = 2) -> list[dict]:
    return [{"question": "What is this?", "images": [testing.sample_image(seed)]} for seed in range(n)]


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_post_rope_keys_are_the_keys_the_model_caches(family):
    """The default features are the post-RoPE keys attention uses: the statistics equal those of the
    keys in the stock model's KV cache at the visual patch positions (M-RoPE for Qwen2-VL; LLaVA-
    OneVision's image-newline slots excluded)."""
    model, processor = testing.tiny_pair(family)
    sample = _samples(1)
    stats = cal.layer_key_stats(model, processor, sample)
    inputs = cal.build_inputs(processor, sample[0], "cpu", None)
    visual = get_adapter(model).candidate_mask(inputs["input_ids"], dict(inputs))[0]
    assert int(visual.sum()) < int(testing.placeholder_mask(family, inputs).sum()) or family == "qwen2_vl"
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).past_key_values
    assert len(stats) == len(cache.layers)
    for i, layer_cache in enumerate(cache.layers):
        keys = layer_cache.keys[0].transpose(0, 1)[visual]  # (N, H_kv, d)
        expected = cal.key_distance_stats(keys.reshape(keys.shape[0], -1))
        assert stats[i].values == pytest.approx({k: v for k, v in expected.items() if k != "pairs"}, abs=1e-5)


def _collapsed_model(collapsed: int):
    """A tiny Qwen2-VL whose first ``collapsed`` decoder layers give every token the same key
    (k_proj weight 0, a shared non-zero bias), so their pre-RoPE keys cannot be told apart."""
    model, processor = testing.tiny_pair("qwen2_vl", num_hidden_layers=6)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.language_model.layers[:collapsed]:
            k = layer.self_attn.k_proj
            k.weight.zero_()
            k.bias.copy_(torch.randn(k.bias.shape, generator=g))
    return model, processor


def test_rule_picks_the_first_layer_after_collapsed_keys(tmp_path):
    model, processor = _collapsed_model(collapsed=2)
    result = cal.calibrate(model, processor, _samples(2), features="keys", max_layer=5)
    maxima = [s.values["max"] for s in result.layers]
    assert max(maxima[:2]) < 1e-5 < min(maxima[2:])
    assert result.layer == 2 and result.config.layer == 2
    # the written config loads and applies
    result.config.to_json(tmp_path / "config.json")
    cfg = pact.load_config(tmp_path / "config.json")
    assert cfg == result.config
    pact.apply(model, cfg)
    try:
        inputs = cal.build_inputs(processor, _samples(1)[0], "cpu", None)
        with torch.no_grad():
            model(**inputs)
        assert pact.stats(model).layers == [2] and pact.stats(model).reduction_ratio > 0
    finally:
        pact.remove(model)
    deeper = cal.calibrate(model, processor, _samples(1), features="keys", min_layer=3, max_layer=5)
    assert deeper.layer == 3


def test_cutoff_calibration_reaches_the_target_through_pact_apply():
    """The calibrated config, applied with ``pact.apply`` to the same inputs, removes exactly the share
    of visual tokens the calibration reports, and that share is the target up to token granularity."""
    model, processor = _collapsed_model(collapsed=1)
    samples = _samples(3)
    target = 0.6
    result = cal.calibrate(model, processor, samples, target_ratio=target, max_layer=4)
    cut = result.cutoff
    assert result.config.cutoff == cut.cutoff and result.config.layer == result.layer == 1
    assert result.config.keep_ratio == pytest.approx(cal.keep_ratio_for(target))
    before = after = 0
    pact.apply(model, result.config)
    try:
        for sample in samples:
            with torch.no_grad():
                model(**cal.build_inputs(processor, sample, "cpu", None))
            st = pact.stats(model)
            before, after = before + st.visual_before[0], after + st.visual_after[0]
    finally:
        pact.remove(model)
    achieved = 1 - after / before
    assert achieved == pytest.approx(cut.reduction_ratio, abs=1e-12)
    assert abs(achieved - target) <= 0.03, (achieved, cut.steps)
    # a fixed keep ratio is honoured; an unreachable target is a clear error
    fixed = cal.calibrate(model, processor, samples[:1], target_ratio=0.7, keep_ratio=0.5, max_layer=4)
    assert fixed.config.keep_ratio == 0.5 and fixed.cutoff.reduction_ratio >= 0.5
    with pytest.raises(ValueError, match="outside what the cutoff reaches"):
        cal.calibrate(model, processor, samples[:1], target_ratio=0.2, keep_ratio=0.5, max_layer=4)


def test_refuses_a_model_with_pact_applied():
    model, processor = testing.tiny_pair("qwen2_vl")
    pact.apply(model, "pact", layer=1)
    with pytest.raises(ValueError, match="stock model"):
        cal.layer_key_stats(model, processor, _samples(1))


# ---------------------------------------------------------------------------------------------------
# Command line


def test_cli_end_to_end_with_images_and_a_video(tmp_path, capsys):
    images = []
    for seed in range(2):
        images.append(tmp_path / f"im{seed}.png")
        testing.sample_image(seed, size=(112, 84)).save(images[-1])
    frames = tmp_path / "clip"
    frames.mkdir()
    for i, frame in enumerate(testing.sample_video(0, num_frames=4)):
        frame.save(frames / f"{i:03d}.png")
    out = tmp_path / "out"
    argv = [
        "--tiny",
        "qwen2_vl",
        "--tiny-layers",
        "4",
        "--images",
        *map(str, images),
        "--videos",
        str(frames),
    ]
    argv += ["--frames", "4", "--target-ratio", "0.5", "--out", str(out), "--dtype", "bfloat16"]
    assert cal.main(argv) == 0
    report = json.loads((out / "calibration.json").read_text())
    assert report["inputs"] == 3 and report["features"] == "keys_rope" and len(report["layers"]) == 4
    cfg = pact.load_config(out / "config.json")
    assert cfg.layer == report["layer"] and cfg.cutoff == report["cutoff"]["cutoff"]
    assert (out / "key_distances.png").stat().st_size > 10_000
    printed = capsys.readouterr()
    assert "chosen layer L =" in printed.out and "[calibrate] input 3/3" in printed.err


def test_cli_with_a_local_checkpoint(tmp_path):
    ckpt = testing.save_tiny("llava_onevision", tmp_path / "ckpt")
    out = tmp_path / "out"
    assert cal.main(["--model", str(ckpt), "--out", str(out), "--images", str(_png(tmp_path))]) == 0
    report = json.loads((out / "calibration.json").read_text())
    assert report["family"] == "llava_onevision" and report["cutoff"] is None
    assert pact.load_config(out / "config.json").layer == report["layer"]


def _png(tmp_path):
    path = tmp_path / "x.png"
    testing.sample_image(3).save(path)
    return path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tiny", "nope"], "--tiny: invalid choice"),
        (["--model", "/no/such/dir"], "--model /no/such/dir: no such directory"),
        (["--threshold", "1.5"], "--threshold 1.5"),
        (["--rule", "absolute", "--threshold", "3"], "--threshold 3.0"),
        (["--target-ratio", "1.2"], "--target-ratio 1.2"),
        (["--keep-ratio", "0.5"], "--keep-ratio 0.5: needs --target-ratio"),
        (["--config", "fastv", "--target-ratio", "0.5"], "clustering='none'"),
        (["--config", "no_such_config"], "--config no_such_config"),
        (["--images", "/no/such.png"], "--images /no/such.png: no such file"),
        (["--tiny", "llava", "--videos", "/tmp"], "--videos: llava models take no videos"),
        (["--tiny-layers", "4", "--max-layer", "4"], "--max-layer 4"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--frames", "0"], "--"),
    ],
)
def test_cli_user_mistakes_are_one_line_and_exit_2_before_any_model(argv, message, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were validated")

    monkeypatch.setattr(cal, "_load_model", no_model)
    assert cal.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pact calibrate: error:") and message in err, err


def test_cli_is_a_pact_subcommand(capsys):
    from pact import cli

    assert "calibrate" in cli.usage()
    assert cli.main(["calibrate", "--threshold", "0"]) == 2


def test_videos_from_a_file_and_from_a_frame_folder(tmp_path):
    """Video inputs: frames sampled uniformly (first and last included) from a video file (PyAV) or
    a folder of frame images sorted by name."""
    av = pytest.importorskip("av")
    frames = testing.sample_video(0, num_frames=6, size=(64, 48))
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=6)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())
    decoded = cal.load_video(path, 3)
    assert len(decoded) == 3 and all(f.size == (64, 48) for f in decoded)
    assert cal._uniform(6, 3) == [0, 2, 5] and cal._uniform(2, 5) == [0, 1] and cal._uniform(9, 1) == [0]
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames):
        frame.save(folder / f"f{i:02d}.png")
    picked = cal.load_video(folder, 3)
    assert [f.tobytes() for f in picked] == [frames[i].tobytes() for i in (0, 2, 5)]
    with pytest.raises(ValueError, match="no image files"):
        cal.load_video(tmp_path, 3)  # holds a video and a folder, no frame images
