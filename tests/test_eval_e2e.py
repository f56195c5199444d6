"""Offline end to end: tiny random Qwen2-VL and LLaVA-OneVision saved with their processors, the local
parquet task (tests/eval_tasks), the lmms-eval command line with pact models at batch size 2; the
evaluation scripts (syntax, commands, configurations); data parallel under ``accelerate launch``."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

REPO = Path(__file__).resolve().parent.parent
TASKS_DIR = REPO / "tests" / "eval_tasks"
SCRIPTS = sorted((REPO / "scripts").glob("*.sh"))


# ---------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    from pact import testing

    root = tmp_path_factory.mktemp("eval_e2e_models")
    return {f: testing.save_tiny(f, root / f) for f in ("qwen2_vl", "llava_onevision")}


@pytest.fixture(scope="module")
def lmms_env(tmp_path_factory) -> dict[str, str]:
    """Environment of the lmms-eval subprocesses: offline, and with the ``lmms_eval.models`` entry
    points even before the installed pact declares them (a throwaway dist-info on PYTHONPATH)."""
    from pact.eval.manifest import ENTRY_POINTS

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf_datasets"))
    installed = {ep.name for ep in entry_points(group="lmms_eval.models")}
    if not set(ENTRY_POINTS) <= installed:
        site = tmp_path_factory.mktemp("entry_points")
        info = site / "pact_eval_entry_points-0.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pact-eval-entry-points\nVersion: 0.0\n")
        lines = "".join(f"{k} = {v}\n" for k, v in ENTRY_POINTS.items())
        (info / "entry_points.txt").write_text("[lmms_eval.models]\n" + lines)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    return env


def _run(cmd: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def _run_files(out: Path) -> tuple[dict, dict, Path]:
    """The (results, pact metrics, folder) of the single run under ``out``."""
    results = sorted(out.rglob("*_results.json"))
    assert len(results) == 1, results
    date = results[0].name[: -len("_results.json")]
    metrics = results[0].with_name(f"{date}_pact_metrics.json")
    assert metrics.exists(), "the metrics JSON must sit next to lmms-eval's results, with the same date id"
    return json.loads(results[0].read_text()), json.loads(metrics.read_text()), results[0].parent


# ---------------------------------------------------------------------------------------------------
# The lmms-eval command line


def test_lmms_eval_cli_end_to_end(tiny_dirs, lmms_env, tmp_path):
    """Two runs in one lmms-eval process (``--config`` with a list, to pay the lmms-eval import
    once): PACT on Qwen2-VL and on LLaVA-OneVision, each on a generation task and a multiple-choice
    (log-likelihood) task at batch size 2. (``--device cpu`` is given twice on purpose: the
    wrapper lets --model_args win instead of failing.)"""
    runs = {
        "qwen": ("pact_qwen2_vl", f"pretrained={tiny_dirs['qwen2_vl']},layer=2,device=cpu"),
        "ov": ("pact_llava_onevision", f"pretrained={tiny_dirs['llava_onevision']},pact_config=pact,layer=2"),
    }
    config = [
        {
            "model": model,
            "model_args": args,
            "tasks": "pact_tiny_vqa,pact_tiny_mc",
            "include_path": str(TASKS_DIR),
            "batch_size": 2,
            "device": "cpu",
            "output_path": str(tmp_path / name),
            "log_samples": True,
            "limit": 4,  # documents 0-3 (the third is text-only): keeps the test quick
            "verbosity": "WARNING",
        }
        for name, (model, args) in runs.items()
    ]
    cfg_path = tmp_path / "runs.yaml"
    cfg_path.write_text(json.dumps(config))  # JSON is YAML
    proc = _run([sys.executable, "-m", "lmms_eval", "--config", str(cfg_path)], lmms_env)
    assert proc.stdout.count("pact metrics: pact_") == 2  # the table printed at the end of each run

    for name in ("qwen", "ov"):
        results, metrics, folder = _run_files(tmp_path / name)
        for task in ("pact_tiny_vqa", "pact_tiny_mc"):
            samples = list(folder.glob(f"*_samples_{task}.jsonl"))
            assert len(samples) == 1 and len(samples[0].read_text().splitlines()) == 4
            assert task in results["results"]
        summary = metrics["summary"]
        assert 0 < summary["reduction_ratio"] < 1, summary
        assert summary["num_requests"] == 4 + 10  # 4 generations + 10 choices (3+2+2+3)
        assert metrics["batch_size"] == 2 and metrics["label"] == "pact" and metrics["config"]["layer"] == 2
        assert summary["prefill_seconds_mean"] > 0 and summary["decode_tokens_per_second"] > 0
        assert summary["peak_memory_gb_max"] > 0 and metrics["memory_kind"].startswith("cpu_peak_rss")
        reqs = metrics["requests"]
        before, after = sum(r["visual_before"] for r in reqs), sum(r["visual_after"] for r in reqs)
        assert summary["reduction_ratio"] == pytest.approx(1 - after / before)
        assert results["throughput"]["avg_pact_reduction_ratio"] == pytest.approx(summary["reduction_ratio"])
        assert results["results"]["pact_tiny_mc"]["acc,none"] >= 0  # log-likelihood scoring ran

    _agrees_with_pact_stats(tiny_dirs["qwen2_vl"], tmp_path / "qwen")


def _agrees_with_pact_stats(model_dir: Path, out: Path) -> None:
    """Per generation request, the metrics file's visual tokens before/after are what pact.stats
    reports when the same prompt runs alone in this process."""
    import importlib.util

    from datasets import load_dataset
    from lmms_eval.api.instance import Instance

    import pact.api
    from pact.eval.models import PactQwen2VL

    spec = importlib.util.spec_from_file_location("pact_tiny_task_utils", TASKS_DIR / "utils.py")
    task_utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task_utils)

    docs = load_dataset("parquet", data_files={"test": str(task_utils.PARQUET)})["test"]
    _, metrics, folder = _run_files(out)
    logged = {r["doc_id"]: r for r in metrics["requests"] if r["task"] == "pact_tiny_vqa"}
    lm = PactQwen2VL(pretrained=str(model_dir), layer=2, device="cpu", batch_size=1)
    lm.task_dict = {"pact_tiny_vqa": {"test": docs}}
    samples = [json.loads(line) for line in next(folder.glob("*_samples_pact_tiny_vqa.jsonl")).open()]
    assert len(samples) == len(logged) == 4
    for sample in samples:
        doc_id = sample["doc_id"]
        req = Instance(
            request_type="generate_until",
            arguments=(
                sample["input"],
                {"max_new_tokens": 1},
                task_utils.doc_to_visual,
                doc_id,
                "pact_tiny_vqa",
                "test",
            ),
            idx=0,
            metadata={"task": "pact_tiny_vqa", "doc_id": doc_id, "repeats": 1},
        )
        lm.generate_until([req])
        st = pact.api.stats(lm.model)
        assert (logged[doc_id]["visual_before"], logged[doc_id]["visual_after"]) == (
            st.visual_before[0],
            st.visual_after[0],
        ), doc_id


def _report_and_plot(root: Path, tasks: set[str]) -> None:
    """`pact report` / `pact plot` on real runs: a PACT run and its no-reduction reference."""
    from pact.eval import plot, report

    rows = report.build_rows(report.find_runs([root]))
    pact_rows = [r for r in rows if r.method == "pact"]
    assert {r.task for r in pact_rows} == tasks
    assert all(r.reference is not None and 0 < r.reduction_ratio < 1 for r in pact_rows)
    ref = next(r for r in rows if r.method == "no_reduction")
    assert ref.visual_before > 0 and ref.reduction_ratio == 0
    md = root / "report.md"
    assert (
        report.main([str(root / "pact"), "--baseline", str(root / "no_reduction"), "--markdown", str(md)])
        == 0
    )
    assert all(t in md.read_text() for t in tasks)
    points = report.summarize_points(rows)
    if any(p.metric_ratio is not None and p.method == "pact" for p in points):  # a random model may score 0
        assert plot.main([str(root), "--out", str(root / "fig.png")]) == 0
        assert (root / "fig.png").stat().st_size > 0


def test_pyproject_declares_the_entry_points():
    """`--model pact_*` resolves through pyproject's [project.entry-points."lmms_eval.models"]."""
    import tomllib

    from pact.eval.manifest import ENTRY_POINTS

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = project.get("entry-points", {}).get("lmms_eval.models", {})
    assert declared == ENTRY_POINTS, "add the lines of pact.eval.manifest.ENTRY_POINTS to pyproject.toml"


# ---------------------------------------------------------------------------------------------------
# Scripts


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def _dry_run(script: str, **env: str) -> list[list[str]]:
    full = dict(os.environ, DRY_RUN="1", **env)
    out = subprocess.run(
        ["bash", f"scripts/{script}"], cwd=REPO, env=full, capture_output=True, text=True, check=True
    )
    return [shlex.split(line) for line in out.stdout.splitlines() if line.strip()]


def _model_args(cmd: list[str]) -> dict:
    from lmms_eval.utils import simple_parse_args_string

    return simple_parse_args_string(cmd[cmd.index("--model_args") + 1])


def _check_commands(cmds: list[list[str]]) -> list:
    """Every command names a registered pact model and a valid configuration; returns the configs."""
    from pact.config import load_config
    from pact.eval.manifest import MANIFESTS
    from pact.eval.models import LOADING_OPTIONS, parse_value

    configs = []
    for cmd in cmds:
        assert cmd[cmd.index("--model") + 1] in {m.model_id for m in MANIFESTS}
        kwargs = _model_args(cmd)
        overrides = {k: parse_value(v) for k, v in kwargs.items() if k not in LOADING_OPTIONS}
        configs.append(load_config(kwargs.get("pact_config"), **overrides))
    return configs


def test_paper_scripts_are_faithful():
    ov = _dry_run("pact_llava-onevision7b.sh")
    qwen = _dry_run("pact_qwen2-vl-7b.sh")
    assert len(ov) == 2 * 16 and len(qwen) == 2 * 12  # PACT + the no-reduction reference per task
    ov_pact = [c for c, cmd in zip(_check_commands(ov), ov, strict=True) if c.reduction]
    assert {(c.layer, c.keep_ratio, c.cutoff, c.retrieval_coef) for c in ov_pact} == {(4, 0.55, 0.21, 1.5)}
    q_pact = [c for c in _check_commands(qwen) if c.reduction]
    assert {(c.layer, c.keep_ratio, c.cutoff, c.pruning, c.clustering) for c in q_pact} == {
        (4, 0.8, 0.1, "euti", "dbdpc")
    }
    assert {cmd[cmd.index("--tasks") + 1] for cmd in qwen} >= {"mmmu_val", "egoschema", "textvqa_val"}
    assert all(cmd[cmd.index("--model") + 1] == "pact_qwen2_vl" for cmd in qwen)


def test_method_scripts_give_valid_configs():
    from pact.eval.metrics import method_label

    methods = _dry_run("test_different_methods_llava-onevision7b.sh")
    configs = _check_commands(methods)
    labels = [method_label(c.to_dict()) for c in configs]
    # The reference's comparison points (report section 3.3).
    by_label = dict(zip(labels, configs, strict=True))
    assert (by_label["pact"].keep_ratio, by_label["pact"].cutoff, by_label["dbdpc"].cutoff) == (
        0.55,
        0.21,
        0.21,
    )
    assert (by_label["euti"].keep_ratio, by_label["fastv"].keep_ratio) == (0.4, 0.353)
    assert (by_label["tome"].tome_keep_ratio, by_label["vtw"].vtw_keep_ratio) == (0.353, 0.353)
    assert {by_label[k].cluster_ratio for k in ("dpc", "kmeans", "agglomerative_single")} == {0.4}
    assert by_label["dbscan"].dbscan_eps == 0.7
    assert labels == [
        "pact", "dbdpc", "euti", "fastv", "tome", "vtw", "dpc", "kmeans", "agglomerative_single", "dbscan",
        "no_reduction",
    ]  # fmt: skip
    custom = _check_commands(_dry_run("test_custom.sh"))
    assert [(c.pruning, c.clustering) for c in custom[:3]] == [
        ("none", "custom"),
        ("custom", "none"),
        ("custom", "custom"),
    ]
    assert [c.keep_ratio for c in custom[1:3]] == [0.353, 0.7] and not custom[3].reduction
    sweep = _dry_run("sweep.sh", TASKS="a,b", RATIOS="0.5 0.7", METHODS="pact fastv vtw")
    assert len(sweep) == 2 * (1 + 3 * 2)
    ratios = sorted({c.target_ratio for c in _check_commands(sweep) if c.reduction})
    assert ratios == [0.5, 0.7]


def test_ablation_scripts_give_valid_configs():
    """The three ablation scripts (paper Fig. 8, 9, 10): every run is a valid configuration at the
    requested target ratio, variants carry distinct labels, and each task has its no-reduction run."""
    from pact.eval.metrics import method_label

    def labelled(script: str, **env: str) -> list[tuple[str, object]]:
        cmds = [c for c in _dry_run(script, **{"TASKS": "a", "RATIOS": "0.5 0.7", **env}) if "--model" in c]
        configs = _check_commands(cmds)
        return [
            (_model_args(cmd).get("label") or method_label(cfg.to_dict()), cfg)
            for cmd, cfg in zip(cmds, configs, strict=True)
        ]

    clustering = labelled("ablation_clustering.sh")
    assert [label for label, _ in clustering] == ["no_reduction"] + [
        m for m in ("dbdpc", "agglomerative_single", "kmeans", "dpc", "dbscan") for _ in (0.5, 0.7)
    ]
    assert all(c.pruning == "none" and c.target_ratio in (0.5, 0.7) for _, c in clustering[1:])

    euti = dict(labelled("ablation_euti.sh", RATIOS="0.5"))
    assert set(euti) == {"no_reduction", "euti", "euti_global_query", "euti_norm"}
    assert (euti["euti"].pruning, euti["euti"].multiply_by_norm) == ("euti", True)
    assert (euti["euti_global_query"].pruning, euti["euti_global_query"].multiply_by_norm) == ("euti", False)
    assert euti["euti_norm"].pruning == "norm" and euti["euti_norm"].norm_order == euti["euti"].norm_order
    assert not euti.pop("no_reduction").reduction
    assert {c.clustering for c in euti.values()} == {"none"} and {c.target_ratio for c in euti.values()} == {
        0.5
    }

    runs = dict(labelled("ablation_pact.sh", RATIOS="0.5", OTHER_LAYERS="2 4 8"))
    assert set(runs) == {"no_reduction", "pact", "pact_no_retrieval", "pact_layer2", "pact_layer8"}
    assert (runs["pact"].layer, runs["pact"].retrieval) == (4, True)  # the chosen layer is not repeated
    assert (runs["pact_no_retrieval"].layer, runs["pact_no_retrieval"].retrieval) == (4, False)
    assert (runs["pact_layer2"].layer, runs["pact_layer8"].layer) == (2, 8)
    assert all(c.target_ratio == 0.5 for label, c in runs.items() if label != "no_reduction")
    auto = _dry_run("ablation_pact.sh", TASKS="a", RATIOS="0.5", CHOSEN_LAYER="auto", MODEL="/m")
    calibrate = auto[0]  # CHOSEN_LAYER=auto: `pact calibrate` on the model first
    assert calibrate[1:6] == ["-m", "pact", "calibrate", "--model", "/m"]
    assert calibrate[calibrate.index("--out") + 1] == "runs/ablation_pact/calibrate"
    assert all("--model_args" in cmd for cmd in auto[1:])


def test_scripts_take_overrides():
    cmds = _dry_run(
        "pact_qwen2-vl-7b.sh",
        MODEL="/m",
        TASKS="x, y",
        OUTPUT="/o",
        INCLUDE_PATH="tests/eval_tasks",
        MODEL_ARGS="layer=2,dtype=float32",
        BATCH_SIZE="3",
        LIMIT="2",
        BASELINE="0",
    )
    assert len(cmds) == 2
    for cmd, task in zip(cmds, ("x", "y"), strict=True):
        args = _model_args(cmd)
        assert args["pretrained"] == "/m" and args["layer"] == 2 and args["dtype"] == "float32"
        assert cmd[cmd.index("--tasks") + 1] == task and cmd[cmd.index("--batch_size") + 1] == "3"
        assert cmd[cmd.index("--include_path") + 1] == "tests/eval_tasks" and "--limit" in cmd
        assert cmd[cmd.index("--output_path") + 1] == "/o/pact"


@pytest.mark.parametrize(
    ("script", "names"),
    [
        ("ablation_clustering.sh", {"METHODS": "dbdpc bogus"}),
        ("ablation_euti.sh", {"VARIANTS": "euti bogus"}),
        ("ablation_pact.sh", {"VARIANTS": "pact bogus"}),
        ("sweep.sh", {"METHODS": "pact bogus"}),
    ],
)
def test_sweep_scripts_refuse_an_unknown_name_before_running_anything(script, names):
    """run_at_ratios resolves every name first: a typo costs no run (not the first N runs)."""
    env = dict(os.environ, DRY_RUN="1", TASKS="a b", **names)
    proc = subprocess.run(["bash", f"scripts/{script}"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stdout == "" and "bogus" in proc.stderr


def test_scripts_detect_failed_runs(tmp_path):
    """lmms-eval exits 0 after a failed run; the scripts judge a run by its new results file."""
    fake = tmp_path / "fake_lmms_eval.sh"
    fake.write_text(
        'while [ $# -gt 0 ]; do if [ "$1" = --output_path ]; then out=$2; fi; shift; done\n'
        "case $out in *no_reduction*) exit 0 ;; esac\n"  # the reference "fails" silently
        'mkdir -p "$out/m" && touch "$out/m/${RANDOM}${RANDOM}_results.json"\n'
    )
    env = dict(os.environ, LAUNCHER=f"bash {fake}", OUTPUT=str(tmp_path / "o"), TASKS="a b")
    proc = subprocess.run(
        ["bash", "scripts/pact_qwen2-vl-7b.sh"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert "failed runs: no_reduction_a no_reduction_b" in proc.stderr
    env["BASELINE"] = "0"
    proc = subprocess.run(
        ["bash", "scripts/pact_qwen2-vl-7b.sh"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_script_runs_end_to_end_on_a_tiny_model(tiny_dirs, lmms_env, tmp_path):
    """`bash scripts/pact_qwen2-vl-7b.sh` against a tiny local model and the local multiple-choice
    task (two lmms-eval processes: PACT and its reference), then report and plot from them."""
    env = dict(
        lmms_env,
        MODEL=str(tiny_dirs["qwen2_vl"]),
        TASKS="pact_tiny_mc",
        LIMIT="4",
        INCLUDE_PATH="tests/eval_tasks",
        MODEL_ARGS="layer=2,dtype=float32,device=cpu",
        OUTPUT=str(tmp_path / "out"),
        PYTHON=sys.executable,
        BATCH_SIZE="2",
    )
    _run(["bash", "scripts/pact_qwen2-vl-7b.sh"], env)
    _report_and_plot(tmp_path / "out", {"pact_tiny_mc"})


# Smallest end-to-end set per ablation script: its no-reduction run plus one variant (every
# variant's configuration is checked by test_ablation_scripts_give_valid_configs; each lmms-eval
# process costs tens of seconds here). The PACT one chooses its layer with `pact calibrate` first.
_ABLATION_SMOKE = {
    "ablation_clustering.sh": (
        {"METHODS": "kmeans", "MODEL_ARGS": "layer=2,dtype=float32,device=cpu"},
        "kmeans",
    ),
    "ablation_euti.sh": ({"VARIANTS": "norm", "MODEL_ARGS": "layer=2,dtype=float32,device=cpu"}, "euti_norm"),
    "ablation_pact.sh": (
        {
            "VARIANTS": "no_retrieval",
            "CHOSEN_LAYER": "auto",
            "DTYPE": "float32",
            "CALIBRATE_ARGS": "--max-layer 2",
            "MODEL_ARGS": "device=cpu",
        },
        "pact_no_retrieval",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(_ABLATION_SMOKE))
def test_ablation_script_runs_end_to_end_on_a_tiny_model(script, tiny_dirs, lmms_env, tmp_path):
    """Each ablation script against a tiny local Qwen2-VL and the local multiple-choice task, at one
    target ratio; the report pairs the variant with its no-reduction run at that ratio."""
    from pact.eval import plot, report

    extra, label = _ABLATION_SMOKE[script]
    out = tmp_path / "out"
    env = dict(
        lmms_env,
        MODEL=str(tiny_dirs["qwen2_vl"]),
        LMMS_MODEL="pact_qwen2_vl",
        TASKS="pact_tiny_mc",
        LIMIT="4",
        INCLUDE_PATH="tests/eval_tasks",
        RATIOS="0.5",
        OUTPUT=str(out),
        PYTHON=sys.executable,
        **extra,
    )
    _run(["bash", f"scripts/{script}"], env)
    runs = report.find_runs([out])
    rows = report.build_rows(runs)
    variant = [r for r in rows if r.method == label]
    assert len(variant) == 1 and variant[0].reference is not None
    assert variant[0].reduction_ratio == pytest.approx(0.5, abs=0.1)
    if script == "ablation_pact.sh":
        chosen = json.loads((out / "calibrate" / "calibration.json").read_text())["layer"]
        config = next(r.config for r in runs if r.label == label)
        assert 0 <= chosen <= 2 and config["layer"] == chosen and config["retrieval"] is False
    points = report.summarize_points(rows)
    if any(p.metric_ratio is not None and p.method == label for p in points):  # a random model may score 0
        assert plot.main([str(out), "--out", str(out / "fig.png")]) == 0


# ---------------------------------------------------------------------------------------------------
# Data parallel


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tiny_dirs, lmms_env, tmp_path):
    """Two data-parallel processes (``accelerate launch --multi_gpu`` falls back to CPU + gloo when
    there is no GPU): both ranks' requests end up in one metrics file written by rank 0."""
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(29500 + os.getpid() % 1000),
        "-m", "lmms_eval", "--model", "pact_qwen2_vl",
        "--model_args", f"pretrained={tiny_dirs['qwen2_vl']},layer=2",
        "--tasks", "pact_tiny_vqa,pact_tiny_mc", "--include_path", str(TASKS_DIR),
        "--batch_size", "2", "--output_path", str(tmp_path / "dp"), "--log_samples",
        "--limit", "7",  # 7 documents: uneven ranks, so lmms-eval adds padding requests
    ]  # fmt: skip
    _run(cmd, lmms_env)
    results, metrics, _ = _run_files(tmp_path / "dp")
    assert metrics["world_size"] == 2
    # Both ranks' requests (7 generations + 3+2+2+3+3+2+2 choices), padding duplicates left out.
    assert metrics["summary"]["num_requests"] == 7 + 17
    assert any(r["padding"] for r in metrics["requests"])
    docs = {(r["task"], r["doc_id"]) for r in metrics["requests"] if not r["padding"]}
    assert len({d for d in docs if d[0] == "pact_tiny_vqa"}) == 7
    assert 0 < metrics["summary"]["reduction_ratio"] < 1
    assert results["n-samples"]["pact_tiny_vqa"]["effective"] == 7


def test_qwen3_vl_script_is_the_qwen2_vl_run_on_qwen3_vl():
    """pact_qwen3-vl-8b.sh: the paper's 12 Qwen2-VL tasks, its PACT point, Qwen3-VL-8B-Instruct on
    pact_qwen3_vl (the MoE checkpoints through LMMS_MODEL)."""
    qwen2 = _dry_run("pact_qwen2-vl-7b.sh")
    qwen3 = _dry_run("pact_qwen3-vl-8b.sh")
    assert len(qwen3) == len(qwen2) == 2 * 12
    tasks = [cmd[cmd.index("--tasks") + 1] for cmd in qwen3]
    assert tasks == [cmd[cmd.index("--tasks") + 1] for cmd in qwen2]
    assert {
        (c.layer, c.keep_ratio, c.cutoff, c.pruning, c.clustering)
        for c in _check_commands(qwen3)
        if c.reduction
    } == {(4, 0.8, 0.1, "euti", "dbdpc")}
    assert all(cmd[cmd.index("--model") + 1] == "pact_qwen3_vl" for cmd in qwen3)
    assert {_model_args(cmd)["pretrained"] for cmd in qwen3} == {"Qwen/Qwen3-VL-8B-Instruct"}
    moe = _dry_run("pact_qwen3-vl-8b.sh", LMMS_MODEL="pact_qwen3_vl_moe", TASKS="mme")
    assert [cmd[cmd.index("--model") + 1] for cmd in moe] == ["pact_qwen3_vl_moe"] * 2


def test_gemma3_script_is_the_onevision_run_on_the_image_tasks():
    """pact_gemma3-4b.sh: the paper's LLaVA-OneVision tasks without the four video ones, its PACT
    point, gemma-3-4b-it on pact_gemma3; PAN_AND_SCAN=1 adds the processor option to both runs and any
    other value stops the script before a run."""
    ov = _dry_run("pact_llava-onevision7b.sh")
    gemma = _dry_run("pact_gemma3-4b.sh")
    video = {"videomme", "mlvu_dev", "perceptiontest_test_mc", "egoschema"}
    ov_tasks = [cmd[cmd.index("--tasks") + 1] for cmd in ov]
    assert [cmd[cmd.index("--tasks") + 1] for cmd in gemma] == [t for t in ov_tasks if t not in video]
    assert len(gemma) == 2 * 12
    assert {
        (c.layer, c.keep_ratio, c.cutoff, c.retrieval_coef, c.pruning, c.clustering)
        for c in _check_commands(gemma)
        if c.reduction
    } == {(4, 0.55, 0.21, 1.5, "euti", "dbdpc")}
    assert all(cmd[cmd.index("--model") + 1] == "pact_gemma3" for cmd in gemma)
    assert {_model_args(cmd)["pretrained"] for cmd in gemma} == {"google/gemma-3-4b-it"}
    assert not any("do_pan_and_scan" in _model_args(cmd) for cmd in gemma)
    scan = _dry_run("pact_gemma3-4b.sh", PAN_AND_SCAN="1", TASKS="docvqa_val")
    assert [_model_args(cmd)["do_pan_and_scan"] for cmd in scan] == [True, True]
    bad = subprocess.run(
        ["bash", "scripts/pact_gemma3-4b.sh"],
        cwd=REPO,
        env=dict(os.environ, DRY_RUN="1", PAN_AND_SCAN="yes"),
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stdout == "" and "PAN_AND_SCAN=yes: expected 0 or 1" in bad.stderr
