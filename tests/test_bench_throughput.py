"""`pact bench throughput`: the real shapes (configs only, never a 7B model in memory), the
checkpoint processors' visual-token counts against hand arithmetic, the generation FLOP model, the
argument checks, and the command end to end on the tiny shape (behaviour only; timings are never
asserted)."""

from __future__ import annotations

import json
import types

import pytest
import torch

from pact import bench, testing
from pact.bench import prefill as bp
from pact.bench import throughput as bt

# hidden 8, 2 layers, 2 query heads and 1 KV head of width 4, MLP 16, vocabulary 10 (as test_bench)
SHAPE = bp.DecoderShape(hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10)


def test_7b_configs_have_the_checkpoints_dimensions():
    ov = bt.build_config("llava_onevision", "7b")
    text, vision = ov.text_config, ov.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (3584, 18944, 28)
    assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (28, 4, 152128)
    assert text.rope_parameters["rope_theta"] == 1e6 and not ov.tie_word_embeddings
    assert (vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers) == (1152, 4304, 26)
    assert (vision.num_attention_heads, vision.image_size, vision.patch_size) == (16, 384, 14)
    assert ov.vision_aspect_ratio == "anyres_max_9"
    assert ov.image_grid_pinpoints[0] == [384, 384] and ov.image_grid_pinpoints[-1] == [2304, 2304]
    assert len(ov.image_grid_pinpoints) == 36

    qw = bt.build_config("qwen2_vl", "7b")
    text, vision = qw.text_config, qw.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (3584, 18944, 28)
    assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (28, 4, 152064)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (vision.depth, vision.embed_dim, vision.num_heads, vision.mlp_ratio) == (32, 1280, 16, 4)
    assert (vision.patch_size, vision.spatial_merge_size, vision.hidden_size) == (14, 2, 3584)


@pytest.mark.parametrize(
    ("family", "shape", "billions"),
    [
        # the parameter counts the model cards state: 8.03B, 0.894B, 8.29B, 2.21B
        ("llava_onevision", "7b", 8.03),
        ("llava_onevision", "0.5b", 0.894),
        ("qwen2_vl", "7b", 8.29),
        ("qwen2_vl", "2b", 2.21),
    ],
)
def test_real_shapes_have_the_published_parameter_counts(family, shape, billions):
    count, size = bt.parameter_bytes(bt.build_config(family, shape), family, torch.bfloat16)  # meta device
    assert count / 1e9 == pytest.approx(billions, abs=0.006)
    assert size == 2 * count


def test_layers_cut_depth_but_keep_widths():
    cfg = bt.build_config("qwen2_vl", "7b", layers=2, vision_layers=1)
    assert cfg.text_config.num_hidden_layers == 2 and cfg.vision_config.depth == 1
    assert cfg.text_config.hidden_size == 3584 and cfg.vision_config.embed_dim == 1280
    cfg = bt.build_config("llava_onevision", "0.5b", layers=3, vision_layers=2)
    assert cfg.text_config.num_hidden_layers == 3 and cfg.vision_config.num_hidden_layers == 2
    assert cfg.text_config.hidden_size == 896 and cfg.vision_config.hidden_size == 1152


def test_random_model_is_built_on_the_requested_device_and_dtype():
    model = testing.random_model(
        "qwen2_vl", bt.build_config("qwen2_vl", "7b"), device="meta", dtype=torch.bfloat16
    )
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    a = testing.random_model("qwen2_vl", testing.tiny_config("qwen2_vl"), seed=3)
    b = testing.random_model("qwen2_vl", testing.tiny_config("qwen2_vl"), seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_checkpoint_processors_give_the_real_visual_token_counts():
    image = testing.demo_photo().resize((1024, 768))
    sample = [{"question": "What is this?", "images": [image]}]
    # Qwen2-VL: 768 x 1024 -> smart resize to 756 x 1036 (multiples of 28) -> 27 x 37 merged tokens
    inputs = testing.build_inputs("qwen2_vl", testing.checkpoint_processor("qwen2_vl"), sample)
    assert testing.expected_visual_count("qwen2_vl", inputs) == 27 * 37
    # LLaVA-OneVision: best pinpoint 768 x 1152 (2 x 3 crops of 27 x 27 -> 54 x 81 features), unpadded
    # to 54 x 73 (the 4:3 image fills 72 of 81 columns; 4 padded columns cut on each side), under the
    # anyres_max_9 cap (54 * 73 < 9 * 729); + one newline per row + the 729-token base crop
    ov = testing.build_inputs("llava_onevision", testing.checkpoint_processor("llava_onevision"), sample)
    assert testing.expected_visual_count("llava_onevision", ov) == 54 * 73 + 54 + 729
    assert list(ov["pixel_values"].shape[-2:]) == [384, 384]
    with pytest.raises(ValueError, match="family 'llava'"):
        testing.checkpoint_processor("llava")


def test_generation_flops_match_hand_computation():
    # prefill of [5, 5] tokens (test_bench: 12640), then 2 decode steps: per layer 2 x 1152 linear +
    # 4*d = 16 per head and attended key, 2 heads, (5 + 1) + (5 + 2) keys; 2 x LM head 2*8*10
    assert bt.generation_flops(SHAPE, [5, 5], 3) == 12640 + 2 * (2 * 1152 + 2 * 16 * 13) + 2 * 160
    assert bt.generation_flops(SHAPE, [5, 5], 1) == bp.prefill_flops(SHAPE, [5, 5])
    ideal = bt.ideal_figures(SHAPE, 5, layer=1, visual_before=4, visual_after=2, keep_ratio=0.5, new_tokens=3)
    # reduced: layer 1 sees 3 tokens; decode over 3 + s keys there; plus the reduction's 1024 FLOPs
    reduced = (6240 + 3648 + 160) + (2 * 1152 + 32 * 13) + (2 * 1152 + 32 * 9) + 2 * 160 + 1024
    assert ideal["generation_flops_pact"] == reduced
    assert ideal["generation_speedup"] == pytest.approx((12640 + 5440 + 320) / reduced)
    assert ideal["prefill_speedup"] == pytest.approx(12640 / (10048 + 1024))


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model gets memory: argument errors must come first (counting the
    parameters on the meta device is allowed)."""
    build = testing.random_model

    def refuse(*args, **kwargs):
        if kwargs.get("device") == "meta":
            return build(*args, **kwargs)
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(testing, "random_model", refuse)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--family", "llava"], "--family 'llava' is not benchmarked"),
        (["--shape", "3b"], "--shape '3b' does not exist for llava_onevision"),
        (["--shape", "2b"], "--shape '2b' does not exist for llava_onevision"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--new-tokens", "0"], "--new-tokens must be >= 1, got 0"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--warmup", "-1"], "--warmup must be >= 0"),
        (["--layers", "40"], "--layers must be in 1..28"),
        (["--vision-layers", "0"], "--vision-layers must be in 1..26"),
        (["--target-ratio", "1.5"], "--target-ratio must be in (0, 1)"),
        (["--attn", "flash"], "--attn 'flash' is not one of"),
        (["--dtype", "int8"], "--dtype 'int8' is not one of"),
        (["--device", "cpu", "--attn", "flash_attention_2"], "flash_attention_2 needs --device cuda"),
        (["--image", "/nonexistent.png"], "--image '/nonexistent.png' is not a file"),
        (["--config", "nonexistent_method"], "--config 'nonexistent_method'"),
        (["--config", "kmeans"], "calibrated for DBDPC"),
        (["--shape", "tiny", "--layers", "4"], "reduces before layer 4, but the model has 4 layers"),
    ],
)
def test_argument_errors_come_before_any_model(no_model, argv, message, capsys):
    argv = ["throughput", "--device", "cpu", *argv]
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    text = str(e.value)
    assert text.startswith("pact bench throughput: ") and message in text
    assert "\n" not in text


def test_weights_that_do_not_fit_are_refused_before_building(no_model, monkeypatch):
    monkeypatch.setattr(bt, "free_memory_bytes", lambda device: 2**30)
    with pytest.raises(
        SystemExit, match=r"weights alone take 15\.\d GiB in bfloat16, more than the 1\.0 GiB"
    ):
        bench.main(["throughput", "--device", "cpu", "--shape", "7b", "--family", "qwen2_vl"])


def test_flash_attention_runs_pact_without_proportional_attention(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bt.importlib.util, "find_spec", lambda name: object())
    args = types.SimpleNamespace(
        family="llava_onevision",
        shape="7b",
        layers=None,
        vision_layers=None,
        batch_size=1,
        new_tokens=1,
        repeats=1,
        warmup=0,
        target_ratio=0.713,
        attn="flash_attention_2",
        dtype="bfloat16",
        device="cuda",
        image=None,
        config="pact",
        set=[],
    )
    _, cfg, notes = bt.validate(args)
    assert cfg.proportional_attention is False
    assert len(notes) == 1 and notes[0].startswith("proportional_attention=false")
    args.attn = "sdpa"
    _, cfg, notes = bt.validate(args)
    assert cfg.proportional_attention is True and notes == []


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "throughput.json"
    argv = ["throughput", "--shape", "tiny", "--family", "qwen2_vl", "--batch-size", "2", "--new-tokens", "3"]
    argv += ["--repeats", "2", "--warmup", "0", "--dtype", "float32", "--device", "cpu", "--json", str(path)]
    assert bench.main(argv) == 0
    return json.loads(path.read_text(encoding="utf-8"))


def test_tiny_run_writes_every_figure(tiny_result):
    r = tiny_result
    assert r["benchmark"] == "throughput" and r["command"].startswith("pact bench throughput --shape tiny")
    assert r["input"]["batch_size"] == 2 and r["input"]["new_tokens"] == 3
    for side in ("stock", "pact"):
        x = r[side]
        assert len(x["raw"]["seconds_per_batch"]) == 2
        assert x["samples_per_second"] > 0
        assert x["generated_tokens_per_second"] == pytest.approx(3 * x["samples_per_second"])
        assert 0 < x["ttft_seconds"] <= x["spread"]["seconds_per_batch"]["max"]
        assert x["peak_memory_bytes"] > 0 and "CPU proxy" in x["peak_memory_kind"]
        assert len(x["visual_before"]) == 2
    assert r["throughput_ratio"] == pytest.approx(
        r["pact"]["samples_per_second"] / r["stock"]["samples_per_second"]
    )
    assert r["peak_memory_ratio"] == pytest.approx(
        r["pact"]["peak_memory_bytes"] / r["stock"]["peak_memory_bytes"]
    )
    assert r["paper"]["throughput_ratio"] == 2.25 and r["paper"]["peak_memory_gb_pact"] == 19.05
    assert r["ideal"]["generation_speedup"] > 1 and r["ideal"]["prefill_speedup"] > 1
    assert r["config_notes"] == [] and r["config"]["proportional_attention"] is True


def test_tiny_run_reaches_the_papers_ratio_and_shrinks_the_kv_cache(tiny_result):
    r = tiny_result
    n = r["input"]["visual_tokens_per_sample"]
    assert r["stock"]["visual_before"] == r["stock"]["visual_after"] == [n, n]
    # calibrated: floor(N * (1 - 0.713)) visual tokens kept per sample
    kept = int(n * (1 - 0.713))
    assert r["pact"]["visual_after"] == [kept, kept] and r["pact"]["visual_before"] == [n, n]
    # KV bytes by hand: 2 (k, v) x B x H_kv x d x 4 bytes per token and layer; PACT's layers >= 4 hold
    # the tokens left after the reduction
    shape = r["model"]["decoder_shape"]
    per_token = 2 * 2 * shape["kv_heads"] * shape["head_dim"] * 4
    tokens, layers, layer = r["input"]["tokens_per_sample"], shape["layers"], r["config"]["layer"]
    assert r["stock"]["kv_cache_bytes"] == layers * tokens * per_token
    removed = n - kept
    assert r["pact"]["kv_cache_bytes"] == (layers * tokens - (layers - layer) * removed) * per_token
