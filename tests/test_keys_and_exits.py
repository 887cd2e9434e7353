"""Fast unit tests of what reuse and exit codes hinge on: each would catch a one-line regression."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.orchestration.cli import main
from pipeline.orchestration.runner import cache_key
from steps.calibrate import CalibrateConfig


def test_cache_key_holds_config_inputs_and_extra(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"first")
    base = cache_key("quantize", CalibrateConfig(), {"fp32_model": model}, {"data": "d1"})
    assert base == cache_key("quantize", CalibrateConfig(), {"fp32_model": model}, {"data": "d1"})  # stable
    assert base != cache_key("quantize", CalibrateConfig(batch_size=8), {"fp32_model": model}, {"data": "d1"})
    assert base != cache_key("calibrate", CalibrateConfig(), {"fp32_model": model}, {"data": "d1"})
    assert base != cache_key("quantize", CalibrateConfig(), {"fp32_model": model}, {"data": "d2"})
    model.write_bytes(b"second")  # same path, other bytes: an input file is hashed, not named
    assert base != cache_key("quantize", CalibrateConfig(), {"fp32_model": model}, {"data": "d1"})


def test_a_bug_in_user_code_keeps_its_traceback_under_one_paragraph(
    digits_copy: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The user's code raising is exit 2: its own traceback (from its file on, none of int8pipe's
    frames), then one int8pipe paragraph naming the code. A bug of int8pipe's keeps propagating."""
    (digits_copy / "broken.py").write_text("def batches():\n    yield {'input': 1 / 0}\n")
    path = digits_copy / "pipeline.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["calibration"] = {"python": "broken:batches"}
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--tracking-uri", tracking_uri]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    err = lines[lines.index("Traceback (most recent call last):") :]
    assert 'broken.py", line 2, in batches' in err[1]
    assert err[-2] == "ZeroDivisionError: division by zero" and not any("pipeline/" in line for line in err)
    assert err[-1].startswith("int8pipe: error: data.calibration.python: broken:batches raised ZeroDivisionError")


@pytest.mark.slow
def test_exit_codes(digits_copy: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = digits_copy / "pipeline.yaml"
    args = ["run", str(path), "--tracking-uri", tracking_uri]
    assert main([*args, "--set", "steps.calibrate.method=kl"]) == 2  # a user error
    # percentile 10 clips nearly everything: the gate fails, exit 3, and nothing is registered
    assert main([*args, "--set", "steps.calibrate.method=percentile", "--set", "steps.calibrate.percentile=10"]) == 3
    err = capsys.readouterr().err
    assert "accuracy gate failed" in err and "Traceback" not in err


def test_version_names_the_int8_kernels_and_help_lists_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.execution import cpu_kernels

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("int8pipe ") and cpu_kernels.this_machine()["isa"] in out and "onnxruntime" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "exit codes: 0 success, 2 a user error" in capsys.readouterr().out


def test_the_code_digest_covers_int8pipes_own_source() -> None:
    """It hashed no file at all (the sha256 of nothing) once the runner moved a folder down, so an
    edited checkout reused step runs of the old code."""
    import hashlib

    from pipeline.orchestration.runner import code_digest

    assert code_digest() != hashlib.sha256().hexdigest()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("steps.validate.max_drop=.nan", "steps.validate.max_drop: expected a number >= 0, got nan"),
        ("steps.benchmark.iterations=0", "steps.benchmark.iterations: expected >= 1"),
        ("steps.benchmark.warmup=-1", "steps.benchmark.warmup: expected >= 0"),
    ],
)
def test_counts_that_cannot_work_are_refused_before_anything_runs(
    digits_copy: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str], override: str, expected: str
) -> None:
    """max_drop: .nan passed every gate (no comparison with NaN is true); iterations: 0 was refused
    only after export, calibrate, quantize and validate had run."""
    from mlflow import MlflowClient

    path = digits_copy / "pipeline.yaml"
    assert main(["run", str(path), "--tracking-uri", tracking_uri, "--set", override]) == 2
    assert expected in capsys.readouterr().err
    client = MlflowClient(tracking_uri)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


@pytest.mark.slow
def test_a_pipeline_without_validate_says_its_gate_was_not_run(
    digits_copy: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: "gate passed" and "gate": "passed", which an orchestrator would promote unvalidated."""
    path = digits_copy / "pipeline.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["steps"] = {"export": {}, "calibrate": {"method": "minmax"}, "quantize": {}}
    path.write_text(yaml.safe_dump(cfg))
    summary = digits_copy / "s.json"
    assert main(["run", str(path), "--tracking-uri", tracking_uri, "--summary-json", str(summary)]) == 0
    assert ": gate not run (no validate step)" in capsys.readouterr().out
    assert json.loads(summary.read_text())["gate"] == "not run"


def test_a_trial_process_counts_by_what_its_summary_says() -> None:
    """Exit 0 without a summary was "passed" (and could be selected with an empty run id); an
    errored trial's reason was left out of the trials table."""
    from pipeline.orchestration.trials import Trial, select_best

    vanished, errored, ungated, passed = (Trial({"k": i}) for i in range(4))
    vanished.record(0, {}, ["[int8pipe] INFO calibrate: running"])
    assert vanished.gate == "error" and "exited 0 without writing its summary" in vanished.error
    errored.record(2, {"run_id": "e" * 32}, ["Traceback ...", "ValueError: x", "int8pipe: error: data.x: bad"])
    assert errored.gate == "error" and errored.error == "int8pipe: error: data.x: bad"
    ungated.record(0, {"run_id": "u" * 32, "gate": "not run", "metrics": {"int8_nodes": 9.0}})
    passed.record(0, {"run_id": "p" * 32, "gate": "passed", "metrics": {"int8_nodes": 1.0}})
    assert (ungated.gate, passed.gate) == ("not run", "passed") and not ungated.error
    assert select_best([vanished, errored, ungated, passed]) is passed  # a gated pass beats any ungated trial
    assert select_best([vanished, errored, ungated]) is ungated  # a sweep without validate still picks one


# Each child sends itself a real SIGINT at the moment named: while the command line's modules import
# (before any handler of int8pipe's exists), and while its arguments parse.
CTRL_C_WHILE_LOADING = """
import builtins, os, signal
signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal: a background job ignores it
real = builtins.__import__
def hooked(name, *args, **kwargs):
    if name == "pipeline.orchestration.cli":
        os.kill(os.getpid(), signal.SIGINT)
    return real(name, *args, **kwargs)
builtins.__import__ = hooked
from pipeline.orchestration.entry import main
raise SystemExit(main())
"""
CTRL_C_WHILE_PARSING = """
import os, signal
signal.signal(signal.SIGINT, signal.default_int_handler)
from pipeline.orchestration import cli
build = cli._parser
def parser():
    p = build()
    parse = p.parse_args
    p.parse_args = lambda argv=None: (os.kill(os.getpid(), signal.SIGINT), parse(argv))[1]
    return p
cli._parser = parser
raise SystemExit(cli.main(["reference"]))
"""


@pytest.mark.parametrize(
    ("code", "said"),
    [
        (CTRL_C_WHILE_LOADING, "int8pipe: interrupted by SIGINT while starting; nothing ran"),
        (CTRL_C_WHILE_PARSING, "int8pipe: interrupted by SIGINT; open runs marked KILLED, temporary files removed"),
    ],
)
def test_ctrl_c_while_the_command_starts_is_one_line_and_exit_130(code: str, said: str) -> None:
    """Before: a KeyboardInterrupt traceback (the handlers were installed after the imports and parsing)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1] == said, proc.stderr[-2000:]
