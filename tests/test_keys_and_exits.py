"""Fast unit tests of what reuse and exit codes hinge on: each would catch a one-line regression."""

from __future__ import annotations

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


def test_a_bug_in_user_code_keeps_its_traceback(digits_copy: Path, tracking_uri: str) -> None:
    """Only Int8PipeError is a one-paragraph exit 2; anything else propagates with its traceback."""
    (digits_copy / "broken.py").write_text("def batches():\n    yield {'input': 1 / 0}\n")
    path = digits_copy / "pipeline.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["calibration"] = {"python": "broken:batches"}
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ZeroDivisionError):
        main(["run", str(path), "--tracking-uri", tracking_uri])


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
