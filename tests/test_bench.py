"""`pact bench prefill` / `pact bench methods`: the FLOP model against hand arithmetic, and the
commands end to end on the tiny model (behaviour only; timings are never asserted)."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from pact import bench
from pact.bench import prefill as bp

# hidden 8, 2 layers, 2 query heads and 1 KV head of width 4, MLP 16, vocabulary 10
SHAPE = bp.DecoderShape(hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10)


def test_flop_model_matches_hand_computation():
    # per token and layer: q 2*8*8=128, k and v 2*8*4=64 each, o 2*8*8=128, MLP 3*2*8*16=768 -> 1152
    assert SHAPE.linear_flops_per_token == 128 + 64 + 64 + 128 + 768
    # 5 tokens, causal: 15 (query, key) pairs; per pair and head 2*d (q.k) + 2*d (sum of values)
    assert bp.attention_pairs(5) == 15 and bp.attention_pairs(5, causal=False) == 25
    assert bp.layer_flops(SHAPE, 5) == 5 * 1152 + 15 * 2 * (2 * 4 + 2 * 4)
    # two full layers + the LM head for one token (2*8*10)
    assert bp.prefill_flops(SHAPE, [5, 5]) == 2 * 6240 + 160
    # removing 2 tokens before layer 1: layer 1 sees 3 tokens (6 causal pairs)
    assert bp.tokens_per_layer(2, 5, {1: 2}) == [5, 3]
    assert bp.prefill_flops(SHAPE, [5, 3]) == 6240 + (3 * 1152 + 6 * 16 * 2) + 160
    # reduction: q/k of 5 tokens 2*5*8*(2+1)*4 = 960; DBDPC on 2 tokens 2*2*2*4 = 32;
    # retrieval of 2 pruned tokens against 2 centers 2*2*2*4 = 32
    assert bp.reduction_flops(SHAPE, 5, clustered=2, pruned=2, centers=2) == 960 + 32 + 32
    ideal = bp.ideal_speedup(SHAPE, 5, layer=1, visual_before=4, visual_after=2, keep_ratio=0.5)
    assert ideal["flops_baseline"] == 12640
    assert ideal["flops_reduced"] == 6240 + 3648 + 160
    assert ideal["flops_reduction"] == 1024
    assert ideal["ideal_speedup"] == pytest.approx(12640 / (10048 + 1024))


def test_ideal_curve_grows_with_the_reduction_ratio():
    shape = bp.DecoderShape(
        hidden=896, layers=24, heads=14, kv_heads=2, head_dim=64, intermediate=4864, vocab=151936
    )
    curve = bp.ideal_curve(shape, 3095, layer=4, visual=3060, keep_ratio=0.55)
    ys = [y for _, y in curve]
    assert ys[0] < 1.0  # removing nothing still pays for the reduction
    assert all(b > a for a, b in itertools.pairwise(ys[1:]))
    assert bp.calibration_keep_ratio(0.55, 0.7) == 0.55
    assert bp.calibration_keep_ratio(0.55, 0.3) == pytest.approx(0.85)


@pytest.fixture(scope="module")
def prefill_result(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "prefill.json"
    argv = [
        "--tiny",
        "--json",
        str(path),
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--decode-tokens",
        "2",
        "--threads",
        "1",
        "--sweep",
        "0.5",
    ]
    assert bench.main(["prefill", *argv]) == 0
    text = path.read_text()
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_prefill_json_has_the_figures(prefill_result):
    r = prefill_result
    for key in (
        "speedup",
        "ideal_speedup",
        "reduction_ratio",
        "reduction_overhead",
        "prefill_seconds",
        "prefill_seconds_baseline",
        "decode_tokens_per_second",
        "peak_memory_bytes",
        "kv_cache_bytes",
        "kv_cache_bytes_baseline",
        "targets",
        "ideal_curve",
        "machine",
        "runs",
    ):
        assert key in r, key
    assert r["speedup"] > 0 and r["ideal_speedup"] > 0
    n = r["input"]["visual_tokens"]
    main, sweep = r["runs"]
    assert main["measured"]["visual_after"] == math.floor(n * 0.3 + 1e-9)  # the calibrated budget
    assert sweep["figures"]["reduction_ratio"] == pytest.approx(0.5, abs=1.5 / n)
    assert set(r["targets"]) == {
        "speedup_at_least_90pct_of_ideal",
        "reduction_overhead_at_most_3pct",
        "kv_cache_bytes_proportional",
    }


def test_kv_cache_bytes_follow_the_kept_tokens(prefill_result):
    r = prefill_result
    for run in r["runs"]:
        fig, measured = run["figures"], run["measured"]
        # every cached layer holds exactly the tokens the FLOP model says it sees
        assert measured["kv_cache_lengths"] == fig["kv_cache_lengths_expected"]
        assert fig["kv_cache_ratio"] == pytest.approx(fig["kv_cache_ratio_expected"], rel=1e-12)
        assert run["targets"]["kv_cache_bytes_proportional"]["met"]
    tokens, layers = r["input"]["tokens"], r["model"]["shape"]["layers"]
    assert r["baseline"]["kv_cache_lengths"] == [tokens] * layers


def test_methods_lists_unsupported_and_times_the_rest(tmp_path):
    from pact.config import load_config
    from pact.methods import REGISTRY
    from pact.methods.listing import families_of

    path = tmp_path / "methods.json"
    argv = [
        "--tiny",
        "--configs",
        "fastv,hired",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--visual-tokens",
        "32",
        "--threads",
        "1",
        "--json",
        str(path),
    ]
    assert bench.main(["methods", *argv]) == 0
    rows = {row["config"]: row for row in json.loads(path.read_text())["rows"]}
    hired = load_config("hired")
    if "qwen2_vl" not in families_of(REGISTRY[(hired.pruning, hired.clustering)]):
        assert rows["hired"]["status"] == "unsupported" and "qwen2_vl" in rows["hired"]["reason"]
    fastv = rows["fastv"]
    assert fastv["status"] == "ok"
    assert fastv["visual_after"] == math.floor(fastv["visual_before"] * 0.3 + 1e-9)
    assert fastv["reduction_seconds"] >= 0


def test_clustering_bench_times_and_skips(tmp_path):

    path = tmp_path / "clustering.json"
    argv = [
        "--sizes",
        "64,128",
        "--dim",
        "16",
        "--algorithms",
        "x @ x.T (floor),DBDPC,DBSCAN (scikit-learn)",
        "--repeats",
        "1",
        "--max-seconds",
        "0",
        "--json",
        str(path),
        "--plot",
        str(tmp_path / "c.png"),
    ]
    assert bench.main(["clustering", *argv]) == 0
    rows = json.loads(path.read_text())["rows"]
    first = [r for r in rows if r["n"] == 64]
    assert [r["algorithm"] for r in first] == ["x @ x.T (floor)", "DBDPC", "DBSCAN (scikit-learn)"]
    assert all(r["seconds"] >= 0 and r["clusters"] >= 1 for r in first)
    # any predicted time exceeds --max-seconds 0: the larger size is skipped, with the reason
    assert all("skipped" in r for r in rows if r["n"] == 128)
    assert (tmp_path / "c.png").stat().st_size > 0
