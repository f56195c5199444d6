"""scripts/compare_zoo.sh: every bundled method config at equal budgets on one model, plus the
no-reduction reference, then `pact plot` -- its commands (dry run) and a tiny end-to-end run."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval")

from test_eval_e2e import REPO, _model_args, _run, lmms_env, tiny_dirs  # noqa: F401 (fixtures)

from pact.config import config_names, load_config


def dry_run(**env: str) -> tuple[list[list[str]], str]:
    full = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "TASKS": "a", "RATIOS": "0.5 0.7", **env}
    proc = subprocess.run(
        ["bash", "scripts/compare_zoo.sh"], cwd=REPO, env=full, capture_output=True, text=True, check=True
    )
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()], proc.stderr


def runs_of(cmds: list[list[str]]) -> list[tuple[str, float | None]]:
    """(label or config, target ratio) of every command, in order."""
    out = []
    for cmd in cmds:
        args = _model_args(cmd)
        out.append((args.get("label", args["pact_config"]), args.get("target_ratio")))
    return out


def test_zoo_runs_every_bundled_config_at_every_ratio_with_its_reference():
    cmds, err = dry_run()  # LLaVA-OneVision: every bundled method runs on it
    expected = [n for n in config_names() if n != "no_reduction"]
    assert runs_of(cmds) == [("no_reduction", None)] + [(n, r) for n in expected for r in (0.5, 0.7)]
    for cmd in cmds[1:]:
        args = _model_args(cmd)
        cfg = load_config(args["pact_config"], target_ratio=args["target_ratio"])
        assert cfg.reduction and args["label"] == args["pact_config"]
        assert cmd[cmd.index("--model") + 1] == "pact_llava_onevision"
        assert cmd[cmd.index("--output_path") + 1] == f"runs/compare_zoo/{args['pact_config']}"
    assert err == ""


def test_zoo_skips_configs_the_family_does_not_run_and_takes_a_subset():
    cmds, err = dry_run(LMMS_MODEL="pact_qwen2_vl", RATIOS="0.5")
    names = {label for label, _ in runs_of(cmds)}
    assert "hired" not in names and "evs" in names and "pact" in names
    assert "skipping hired: it does not run on qwen2_vl" in err
    cmds, _ = dry_run(LMMS_MODEL="pact_llava", CONFIGS="evs fastv pact", EXCLUDE="pact", BASELINE="0")
    assert runs_of(cmds) == [("fastv", 0.5), ("fastv", 0.7)]  # evs: no video on LLaVA-1.5
    bad = subprocess.run(
        ["bash", "scripts/compare_zoo.sh"],
        cwd=REPO,
        env=dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, CONFIGS="fastv nosuch"),
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "unknown config(s): nosuch" in bad.stderr


@pytest.mark.slow
def test_zoo_runs_end_to_end_on_a_tiny_model_and_plots(tiny_dirs, lmms_env, tmp_path):  # noqa: F811
    """One config and the reference on a tiny Qwen2-VL and the local multiple-choice task (every
    lmms-eval run is a process start of ~30 s; which configs are chosen is the dry-run tests' job);
    the report pairs it with the reference and `pact plot` draws them."""
    from pact.eval import report

    out = tmp_path / "out"
    env = dict(
        lmms_env,
        MODEL=str(tiny_dirs["qwen2_vl"]),
        LMMS_MODEL="pact_qwen2_vl",
        TASKS="pact_tiny_mc",
        LIMIT="4",
        INCLUDE_PATH="tests/eval_tasks",
        CONFIGS="random",
        RATIOS="0.5",
        MODEL_ARGS="dtype=float32,device=cpu",
        OUTPUT=str(out),
        PYTHON=sys.executable,
    )
    proc = _run(["bash", "scripts/compare_zoo.sh"], env)
    rows = report.build_rows(report.find_runs([out]))
    assert {r.method for r in rows} == {"random", "no_reduction"}
    assert all(r.reference is not None for r in rows if r.method != "no_reduction")
    random_row = next(r for r in rows if r.method == "random")
    assert random_row.reduction_ratio == pytest.approx(0.5, abs=0.1)
    assert (out / "figure.png").exists(), proc.stdout[-2000:]
