"""The `pact` command line (issue 11): one-line errors with exit code 2 for every subcommand,
`--debug`, overrides, argument validation before any work, a lazy `import pact`, the demo.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAMILIES

from pact import cli

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``pact argv...`` in this process: (exit code, stdout, stderr); argparse exits count too."""
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, command: str) -> str:
    """The single `pact <command>: error: ...` line of stderr (no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"pact {command}: error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# dispatch, one-line errors, --debug


def test_help_lists_every_subcommand_and_debug(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "--debug" in out
    assert all(f"  {name} " in out for name in cli.SUBCOMMANDS)
    code, _, err = run_cli(capsys, "nosuch")
    assert code == 2 and "unknown command 'nosuch'" in err


def test_every_subcommand_entry_point_exists():
    import importlib

    for target, _ in cli.SUBCOMMANDS.values():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function or "main"))


def test_user_errors_of_any_subcommand_are_one_line_with_exit_2(capsys, monkeypatch):
    # Generic: whatever subcommand raises a ValueError/OSError, `pact` prints one line, exit 2.
    class Failing:
        @staticmethod
        def main(argv):
            raise ValueError("bad value\nsecond line of the message")

    monkeypatch.setitem(sys.modules, "pact_test_failing", Failing)
    monkeypatch.setitem(cli.SUBCOMMANDS, "failing", ("pact_test_failing", "test"))
    code, _, err = run_cli(capsys, "failing")
    assert code == 2
    assert one_error_line(err, "failing") == "pact failing: error: bad value second line of the message"
    with pytest.raises(ValueError, match="bad value"):  # --debug: the real exception and traceback
        cli.main(["failing", "--debug"])

    class Buggy:
        @staticmethod
        def main(argv):
            raise KeyError("a bug, not a user error")

    monkeypatch.setitem(sys.modules, "pact_test_buggy", Buggy)
    monkeypatch.setitem(cli.SUBCOMMANDS, "buggy", ("pact_test_buggy", "test"))
    with pytest.raises(KeyError):  # bugs keep their traceback
        cli.main(["buggy"])


def test_missing_file_error_names_the_file(capsys):
    code, _, err = run_cli(capsys, "config", "/nonexistent/cfg.json")
    assert code == 2 and "/nonexistent/cfg.json" in one_error_line(err, "config")


def test_help_does_not_import_torch():
    """`pact --help` must stay fast: neither torch nor transformers is imported (measured < 1 s)."""
    code = (
        "import sys; from pact.cli import main; import pact; main(['--help']); "
        "heavy = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]; "
        "assert not heavy, heavy; assert callable(pact.apply) and 'torch' in sys.modules"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------------
# overrides and `pact config`


def test_parse_overrides():
    assert cli.parse_overrides(["layer=2", "cutoff=0.1", "pruning=fastv", "target_ratio=null"]) == {
        "layer": 2,
        "cutoff": 0.1,
        "pruning": "fastv",
        "target_ratio": None,
    }
    assert cli.parse_overrides(["log_output_path=a=b"]) == {"log_output_path": "a=b"}
    for bad, message in (("layer", "not of the form key=value"), ("=2", "not of the form"), ("", "not of")):
        with pytest.raises(cli.UsageError, match=message):
            cli.parse_overrides([bad])
    with pytest.raises(cli.UsageError, match="'layer' is given twice"):
        cli.parse_overrides(["layer=1", "layer=2"])


def test_config_overrides_and_their_errors(capsys):
    code, out, _ = run_cli(capsys, "config", "pact", "layer=2", "--set", "cutoff=0.1")
    assert code == 0 and json.loads(out)["layer"] == 2 and json.loads(out)["cutoff"] == 0.1
    # a bare key=value is an override of the defaults, not a config name
    code, out, _ = run_cli(capsys, "config", "keep_ratio=0.3")
    assert code == 0 and json.loads(out)["keep_ratio"] == 0.3
    # a typo in an override is reported as such, not blamed on the JSON file
    code, _, err = run_cli(capsys, "config", "pact", "kep_ratio=0.5")
    line = one_error_line(err, "config")
    assert code == 2 and "unknown config key 'kep_ratio'" in line and "did you mean 'keep_ratio'" in line
    assert "pact.json" not in line
    code, _, err = run_cli(capsys, "config", "pact", "keep_ratio=abc")
    line = one_error_line(err, "config")
    assert code == 2 and "with overrides keep_ratio" in line and "'keep_ratio' must be a number" in line
    code, _, err = run_cli(capsys, "config", "pact", "layer")
    assert code == 2 and "'layer' is not of the form key=value" in one_error_line(err, "config")


def test_load_config_names_an_unknown_override_before_reading_the_file(tmp_path):
    import pact

    broken = tmp_path / "broken.json"
    broken.write_text('{"keep_ratio": 0.5', encoding="utf-8")
    with pytest.raises(ValueError, match=r"^unknown config key 'kep_ratio'"):
        pact.load_config(str(broken), kep_ratio=0.5)


# ---------------------------------------------------------------------------------------------------
# argument types: bad numbers and unwritable outputs fail at parse time


@pytest.mark.parametrize(
    ("parse", "text", "message"),
    [
        (cli.int_at_least(1), "0", "must be an integer >= 1, got 0"),
        (cli.int_at_least(1), "abc", "expected an integer, got 'abc'"),
        (cli.int_at_least(0), "-1", ">= 0"),
        (cli.reduction_ratio, "2", "reduction ratio in [0, 1)"),
        (cli.reduction_ratio, "1", "reduction ratio in [0, 1)"),
        (cli.reduction_ratio, "nan", "reduction ratio in [0, 1)"),
        (cli.positive_float, "0", "> 0"),
        (cli.positive_float, "inf", "> 0"),
        (cli.nonnegative_float, "-1", ">= 0"),
        (cli.int_list_at_least(1), "100,0", ">= 1, got 0"),
        (cli.int_list_at_least(1), ",", "comma-separated integers"),
        (cli.ratio_list, "0.3,1.5", "[0, 1)"),
        (cli.output_file, "/proc/no/such.json", "cannot write"),
        (cli.output_dir, "/proc/no/such", "cannot write"),
        (cli.existing_file, "/no/such/image.jpg", "no such file"),
        (cli.existing_dir, "/no/such/checkpoint", "no such directory"),
    ],
)
def test_argument_types_refuse_bad_values(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message.replace("[", r"\[").replace(")", r"\)")):
        parse(text)


def test_argument_types_accept_good_values(tmp_path):
    assert cli.int_at_least(1)("3") == 3 and cli.reduction_ratio("0") == 0.0
    assert cli.int_list_at_least(2)("64, 128") == (64, 128) and cli.ratio_list("") == ()
    target = tmp_path / "new" / "dir" / "out.json"
    assert cli.output_file(str(target)) == str(target)
    assert target.parent.is_dir() and not target.exists()  # the file itself is not created
    assert list(target.parent.iterdir()) == []  # nor left-over probes


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "ops", "--repeats", "0"], "argument --repeats: must be an integer >= 1"),
        (["bench", "ops", "--sizes", "0"], "argument --sizes: must be an integer >= 1"),
        (["bench", "ops", "--data", "blobs,cubes"], "argument --data"),
        (["bench", "ops", "--json", "/proc/x/y.json"], "argument --json: cannot write"),
        (["bench", "prefill", "--target-ratio", "2"], "argument --target-ratio: must be a reduction ratio"),
        (["bench", "prefill", "--sweep", "0.5,1.2"], "argument --sweep"),
        (["bench", "prefill", "--repeats", "0"], "argument --repeats"),
        (["bench", "prefill", "--plot", "/proc/x.png"], "argument --plot: cannot write"),
        (["bench", "methods", "--target-ratio", "-0.1"], "argument --target-ratio"),
        (["bench", "clustering", "--sizes", "1"], "argument --sizes: must be an integer >= 2"),
        (["bench", "clustering", "--keep", "1.5"], "argument --keep"),
        (["demo", "--repeats", "0"], "argument --repeats"),
        (["demo", "--image", "/no/such.jpg"], "argument --image: no such file"),
        (["demo", "--device", "bogus"], "argument --device: 'bogus' is not a device"),
        (["bench", "prefill", "--device", "gpu0"], "argument --device"),
        (["plot", "runs", "--out", "/proc/x.png"], "argument --out: cannot write"),
        (["report", "runs", "--csv", "/proc/x.csv"], "argument --csv: cannot write"),
    ],
)
def test_bad_arguments_exit_2_at_parse_time(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and message in err and out == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "prefill", "--tiny", "--set", "kep_ratio=0.5"], "unknown config key 'kep_ratio'"),
        (["bench", "prefill", "--tiny", "--config", "nosuch"], "config 'nosuch' not found"),
        (["bench", "methods", "--tiny", "--configs", "pact,nosuch"], "config 'nosuch' not found"),
        (["bench", "methods", "--tiny", "--set", "layer=x"], "'layer' must be an integer"),
        (["bench", "clustering", "--algorithms", "DBDPC,foo"], "unknown algorithm(s) ['foo']"),
        (["demo", "--config", "nosuch"], "config 'nosuch' not found"),
        (["demo", "--set", "keep_ratio=2"], "'keep_ratio'"),
    ],
)
def test_config_errors_come_before_any_model_is_built(capsys, monkeypatch, argv, message):
    from pact import testing

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(testing, "tiny_model", no_model)
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in one_error_line(err, argv[0])


# ---------------------------------------------------------------------------------------------------
# report / plot inputs


def _results(path: Path, content: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8")
    return path


@pytest.mark.parametrize("command", ["report", "plot"])
def test_report_and_plot_name_the_bad_file(capsys, tmp_path, command):
    corrupt = _results(tmp_path / "a" / "20250101_results.json", '{"results": ')
    code, _, err = run_cli(
        capsys, command, str(tmp_path / "a"), *(["--out", str(tmp_path / "f.png")] * (command == "plot"))
    )
    line = one_error_line(err, command)
    assert code == 2 and str(corrupt) in line and "invalid JSON" in line
    no_results = _results(tmp_path / "b" / "20250101_results.json", '{"config": {}}')
    code, _, err = run_cli(capsys, command, str(tmp_path / "b"))
    line = one_error_line(err, command)
    assert code == 2 and str(no_results) in line and "no 'results' object" in line
    not_a_list = _results(tmp_path / "c" / "20250101_results.json", "[1, 2]")
    code, _, err = run_cli(capsys, command, str(tmp_path / "c"))
    assert code == 2 and str(not_a_list) in one_error_line(err, command)
    other = _results(tmp_path / "notes.json", "{}")
    code, _, err = run_cli(capsys, command, str(other))
    assert code == 2 and "not an lmms-eval results file" in one_error_line(err, command)


def test_report_metrics_file_errors_name_the_file(capsys, tmp_path):
    _results(tmp_path / "r" / "20250101_results.json", '{"results": {}}')
    metrics = _results(tmp_path / "r" / "20250101_pact_metrics.json", "not json")
    code, _, err = run_cli(capsys, "report", str(tmp_path / "r"))
    assert code == 2 and str(metrics) in one_error_line(err, "report")


# ---------------------------------------------------------------------------------------------------
# lmms-eval model arguments


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("batch_size", 0, "batch_size=0: expected an integer >= 1"),
        ("batch_size", "abc", "batch_size='abc'"),
        ("batch_size", "auto", "do not search a batch size"),
        ("batch_size", 2.5, "batch_size=2.5"),
        ("frames", 0, "frames=0"),
        ("max_new_tokens", -1, "max_new_tokens=-1"),
        ("max_pixels", 0, "max_pixels=0"),
        ("dtype", "float64", "dtype='float64': expected one of auto"),
        ("use_cache", "yes", "use_cache='yes': expected true or false"),
        ("timing", 1, "timing=1"),
    ],
)
def test_model_args_are_validated(key, value, message):
    from pact.eval.models import check_loading_args

    good = dict(
        dtype="auto",
        batch_size="4",
        max_pixels=None,
        min_pixels=None,
        frames=32,
        max_new_tokens=128,
        use_cache=True,
        trust_remote_code=False,
        timing=True,
    )
    assert check_loading_args(**good)["batch_size"] == 4
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        check_loading_args(**{**good, key: value})
    with pytest.raises(ValueError, match="min_pixels=100 is larger than max_pixels=10"):
        check_loading_args(**{**good, "min_pixels": 100, "max_pixels": 10})


def test_model_args_fail_before_loading_the_checkpoint():
    from pact.eval.models import PactQwen2VL

    # The checkpoint does not exist: only an early check can produce this message.
    with pytest.raises(ValueError, match="pact_qwen2_vl: bad --model_args batch_size=0"):
        PactQwen2VL(pretrained="/no/such/checkpoint", device="cpu", batch_size=0)
    with pytest.raises(ValueError, match="frames=0"):
        PactQwen2VL(pretrained="/no/such/checkpoint", device="cpu", frames=0)


# ---------------------------------------------------------------------------------------------------
# the demo


def test_speedup_above_the_ideal_is_flagged_not_reported():
    from pact.demo import RunResult, speedup_lines

    stock = RunResult("no reduction", 100, 100, seconds=[6.0, 4.0, 5.0])
    reduced = RunResult("PACT", 100, 40, seconds=[2.0, 2.0, 2.5])
    (line,) = speedup_lines(stock, reduced, ideal=1.8)  # per-round ratios 3, 2, 2 -> median 2
    assert "ABOVE the ideal" in line and "not a result" in line and "FLOP-model ideal 1.80x" in line
    (line,) = speedup_lines(stock, reduced, ideal=2.5)
    assert line.startswith("prefill speed-up: 2.00x measured (range 2.00-3.00x over 3 rounds)")
    assert "FLOP-model ideal 2.50x" in line


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_demo_on_a_checkpoint_counts_the_stock_visual_tokens(capsys, tmp_path, family):
    """`pact demo --model DIR` on a tiny 4-layer checkpoint: `--set layer=2` is needed (default layer
    4), the "no reduction" row counts the visual tokens (was 0 for LLaVA-OneVision), no warning."""
    import warnings

    from pact import testing

    ckpt = testing.save_tiny(family, tmp_path / family)
    argv = ["demo", "--model", str(ckpt), "--device", "cpu", "--dtype", "float32", "--visual-tokens", "64"]
    argv += ["--repeats", "2", "--warmup", "1", "--max-new-tokens", "2", "--out", str(tmp_path / "out")]
    code, _, err = run_cli(capsys, *argv)  # default layer 4 on a 4-layer model: refused before timing
    assert code == 2 and "Traceback" not in err and "round" not in err
    assert err.splitlines()[-1] == "pact demo: error: layer=4 but the model has only 4 decoder layers"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning of our own making
        code, out, err = run_cli(capsys, *argv, "--set", "layer=2", "--set", "keep_ratio=0.5")
    assert code == 0, err
    rows = {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if line.startswith(("no reduction", "PACT"))
    }
    stock, reduced = rows["no"], rows["PACT"]
    assert int(stock[2]) == int(stock[3]) > 0 and int(reduced[1]) == int(stock[2]) > int(reduced[2])
    assert "FLOP-model ideal" in out and "round 2/2" in err and "warm-up 1/1" in err


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("qwen2_vl", "llava_onevision")])
def test_demo_on_every_familys_saved_checkpoint(capsys, tmp_path, family):
    """`pact demo --model DIR` on each other family's real checkpoint layout (the tiny model and its
    processor saved and reloaded offline): the stock row counts the visual tokens, PACT reduces them
    (the two families above get the full check)."""
    from pact import testing

    ckpt = testing.save_tiny(family, tmp_path / family)
    argv = ["demo", "--model", str(ckpt), "--device", "cpu", "--dtype", "float32", "--visual-tokens", "64"]
    argv += ["--repeats", "1", "--warmup", "0", "--max-new-tokens", "2", "--out", str(tmp_path / "out")]
    code, out, err = run_cli(capsys, *argv, "--set", "layer=1", "--set", "keep_ratio=0.5")
    assert code == 0, err
    rows = {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if line.startswith(("no reduction", "PACT"))
    }
    stock, reduced = rows["no"], rows["PACT"]
    assert int(stock[2]) == int(stock[3]) > 0 and int(reduced[1]) == int(stock[2]) > int(reduced[2])


def test_readme_options_exist_in_the_help(capsys):
    """Every `--option` the README's demo and command-line sections name is in some command's help."""
    import re

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## The demo") : text.index("## Evaluation and benchmarks")]
    named = set(re.findall(r"`(--[a-z-]+)", section))
    helps = {}
    for argv in (
        ["demo"],
        ["config"],
        ["report"],
        ["plot"],
        ["calibrate"],
        *(["bench", b] for b in ("ops", "prefill", "methods", "clustering", "throughput")),
    ):
        code, out, _ = run_cli(capsys, *argv, "--help")
        assert code == 0
        helps[" ".join(argv)] = set(re.findall(r"(--[a-z-]+)", out))
    _, top, _ = run_cli(capsys, "--help")
    every = set().union(*helps.values()) | set(re.findall(r"(--[a-z-]+)", top))
    assert named and named <= every, named - every
    assert {"--config", "--set"} <= helps["demo"] & helps["bench prefill"]
    assert {"--configs", "--set"} <= helps["bench methods"]
