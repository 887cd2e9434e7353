"""Bad input ends in one clear paragraph and exit code 2 (3 for a failed gate), and loses nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from pipeline.orchestration.cli import main
from pipeline.orchestration.runner import load_config as load
from tests.conftest import DIGITS, run_args


def write_yaml(folder: Path, data: dict) -> Path:
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def base(folder: Path) -> dict:
    return yaml.safe_load((folder / "pipeline.yaml").read_text())


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["steps"]["calibrate"].update(methd="entropy"), "steps.calibrate: unknown key 'methd'"),
        (lambda d: d["steps"]["calibrate"].update(method="kl"), "steps.calibrate.method: expected one of"),
        (lambda d: d["steps"]["calibrate"].update(batch_size="big"), "steps.calibrate.batch_size: expected an integer"),
        (lambda d: d["steps"].update(calibrat={}), "steps.calibrat: unknown step"),
        (lambda d: d["model"].update(onnx="missing.onnx"), "model.onnx: file not found"),
        (lambda d: d["model"].update(mlflow="models:/x/1"), "model: give exactly one of onnx, mlflow, pytorch"),
        (lambda d: d["data"]["calibration"].update(npz="nope.npz"), "data.calibration.npz: file not found"),
        (lambda d: d.pop("name"), "name: required key is missing"),
        (lambda d: d["steps"].pop("validate"), "steps.promote.alias is set only when the accuracy gate passes"),
        (lambda d: d["data"].pop("validation"), "steps.validate needs data.validation"),
        (lambda d: d["steps"].pop("quantize"), "steps.validate needs steps.quantize"),
        (lambda d: d["steps"].pop("export"), "needs steps.export"),
        (lambda d: d["steps"]["promote"].pop("registered_model"), "steps.promote.registered_model: required key"),
        (
            lambda d: d["steps"]["quantize"].update(target="tensorrt", activations="asymmetric"),
            "steps.quantize.activations: asymmetric needs target: onnxruntime",
        ),
        (
            lambda d: d["steps"]["quantize"].update(target="onnxruntime", cpu_fleet=["avx2", "avx3"]),
            "steps.quantize.cpu_fleet: unknown ISA 'avx3'; expected a list of avx2, avx512bw, avx_vnni",
        ),
        (
            lambda d: d["steps"]["quantize"].update(target="onnxruntime", cpu_fleet=[]),
            "steps.quantize.cpu_fleet: the list is empty",
        ),
        (
            lambda d: d["steps"]["quantize"].update(cpu_fleet=["avx2"]),
            "steps.quantize.cpu_fleet: names the CPUs that run the model through ONNX Runtime",
        ),
        (
            lambda d: d["steps"]["quantize"].update(target="onnxruntime", precision="fp8"),
            "steps.quantize.precision: fp8 needs target: tensorrt",
        ),
        (
            lambda d: d["steps"]["quantize"].update(target="onnxruntime", float_precision="fp16"),
            "steps.quantize.float_precision: fp16 float regions are for target: tensorrt",
        ),
        (
            lambda d: d["steps"]["quantize"].update(precision="fp8", weight_rounding="gptq"),
            "steps.quantize.weight_rounding: gptq rounds weights onto the INT8 grid, but precision is fp8",
        ),
        (
            lambda d: d["steps"]["quantize"].update(precision="fp8", shift_activations=True),
            "steps.quantize.shift_activations: shifts inputs onto the symmetric INT8 grid; precision fp8",
        ),
    ],
)
def test_config_errors_name_the_key(
    digits_copy: Path, capsys: pytest.CaptureFixture[str], mutate, expected: str
) -> None:  # type: ignore[no-untyped-def]
    data = base(digits_copy)
    mutate(data)
    path = write_yaml(digits_copy, data)
    store = digits_copy.parent / "mlflow.db"
    code, err = run_cli(["run", str(path), "--tracking-uri", f"sqlite:///{store}"], capsys)
    assert code == 2
    assert expected in err
    assert "Traceback" not in err
    assert not store.exists()  # nothing ran: not even the store was created


def test_set_overrides_and_bad_override(digits_copy: Path) -> None:
    cfg = load(digits_copy / "pipeline.yaml", ["steps.calibrate.method=percentile", "steps.calibrate.percentile=99.9"])
    assert cfg.steps["calibrate"].method == "percentile" and cfg.steps["calibrate"].percentile == 99.9
    assert cfg.steps["export"].opset == 17 and cfg.experiment == "int8-digits"
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load(digits_copy / "pipeline.yaml", ["steps.calibrate.method"])
    with pytest.raises(ConfigError, match=r"steps.calibrate.nbins|unknown key 'nbins'"):
        load(digits_copy / "pipeline.yaml", ["steps.calibrate.nbins=10"])


def test_invalid_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("name: [unclosed\n")
    code, err = run_cli(["run", str(path)], capsys)
    assert code == 2 and "not valid YAML" in err


def _calibration_with(folder: Path, **arrays: np.ndarray) -> None:
    np.savez(folder / "data" / "calibration.npz", **arrays)


def _good_input(folder: Path) -> np.ndarray:
    return np.load(folder / "data" / "validation.npz")["input"]


@pytest.mark.parametrize(
    ("arrays", "expected"),
    [
        (lambda x: {"image": x}, "do not match the model's inputs ['input']"),
        (lambda x: {"input": x.astype(np.float64)}, "has dtype float64, the model expects float32"),
        (lambda x: {"input": x[:, :, :8, :8]}, "has shape [360, 1, 8, 8], the model expects"),
        (
            lambda x: {"input": np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x).astype(np.float32)},
            "contains 1 NaN/Inf values",
        ),
        (lambda x: {"input": x[:0]}, "is empty"),
    ],
)
def test_data_errors_are_found_before_any_run(
    digits_copy: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str], arrays, expected: str
) -> None:  # type: ignore[no-untyped-def]
    """Names, dtypes and shapes come from the npz's headers before any run is created; what only the
    values can show (NaN) fails the calibrate step and keeps the earlier runs."""
    _calibration_with(digits_copy, **arrays(_good_input(digits_copy)))
    summary = digits_copy / "s.json"
    code, err = run_cli(
        ["run", str(digits_copy / "pipeline.yaml"), "--tracking-uri", tracking_uri, "--summary-json", str(summary)],
        capsys,
    )
    assert code == 2, err
    assert expected in err and "Traceback" not in err
    client = MlflowClient(tracking_uri)
    if "NaN" not in expected:
        assert not summary.exists()
        assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
        return
    s = json.loads(summary.read_text())
    assert client.get_run(s["steps"]["export"]).info.status == "FINISHED"
    assert client.get_run(s["steps"]["calibrate"]).info.status == "FAILED"
    assert client.get_run(s["run_id"]).info.status == "FAILED"
    assert "quantize" not in s["steps"]
    exported = [a.path for a in client.list_artifacts(s["steps"]["export"], "model")]
    assert "model/model.onnx" in exported


def test_corrupt_model(digits_copy: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    (digits_copy / "model.onnx").write_bytes(b"\x08\x07garbage" * 50)
    code, err = run_cli(["run", str(digits_copy / "pipeline.yaml"), "--tracking-uri", tracking_uri], capsys)
    assert code == 2 and "Traceback" not in err
    assert "model.onnx" in err and ("not a readable ONNX model" in err or "empty graph" in err or "checker" in err)


@pytest.mark.slow
def test_failed_gate(digits_copy: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A 50th-percentile range clips half of every activation: the gate must stop the pipeline."""
    summary = digits_copy / "s.json"
    args = run_args(
        digits_copy / "pipeline.yaml",
        tracking_uri,
        summary,
        "steps.calibrate.method=percentile",
        "steps.calibrate.percentile=50",
        "steps.calibrate.minmax_inputs=false",
    )
    code, err = run_cli(args, capsys)
    assert code == 3, err
    assert "accuracy gate failed" in err and "FP32 0.99" in err and "max_drop=0.01" in err
    s = json.loads(summary.read_text())
    assert s["gate"] == "failed" and s["registered_model"] is None
    client = MlflowClient(tracking_uri)
    statuses = {step: client.get_run(rid).info.status for step, rid in s["steps"].items()}
    assert statuses == {"export": "FINISHED", "calibrate": "FINISHED", "quantize": "FINISHED", "validate": "FAILED"}
    validate = client.get_run(s["steps"]["validate"])
    assert validate.data.metrics["accuracy_drop"] > 0.01  # the numbers are kept on the failed run
    assert client.get_run(s["run_id"]).info.status == "FAILED"
    assert client.search_registered_models() == []


@pytest.mark.slow
def test_only_runs_one_step_on_reused_earlier_runs(
    digits_copy: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """What each MLproject step entry point does: one step, earlier steps taken from finished runs."""
    path = str(digits_copy / "pipeline.yaml")
    quick = ["--set", "steps.calibrate.method=minmax"]
    code, err = run_cli(["run", path, "--tracking-uri", tracking_uri, "--only", "calibrate", *quick], capsys)
    assert code == 2 and "run the pipeline up to 'export' first" in err
    first = digits_copy / "first.json"
    args = ["run", path, "--tracking-uri", tracking_uri, "--summary-json", str(first), *quick]
    assert main([*args, "--only", "export"]) == 0
    summary = digits_copy / "s.json"
    assert (
        main(
            ["run", path, "--tracking-uri", tracking_uri, "--only", "calibrate", "--summary-json", str(summary), *quick]
        )
        == 0
    )
    s = json.loads(summary.read_text())
    assert list(s["steps"]) == ["export", "calibrate"]
    client = MlflowClient(tracking_uri)
    exported = json.loads(first.read_text())
    # the export run is the one `--only export` made, in the same pipeline run (see test_only_parent.py)
    assert s["steps"]["export"] == exported["steps"]["export"] and s["run_id"] == exported["run_id"]
    assert client.get_run(s["steps"]["calibrate"]).data.tags.get("int8pipe.reused") is None


@pytest.mark.parametrize(
    ("prepare", "overrides", "expected"),
    [
        (None, ["--only", "nothing"], "--only nothing: that step is not in this pipeline"),
        ("no_labels", [], "steps.validate.metric top1 needs labels"),
        (None, ["--set", "steps.validate.output=probs"], "steps.validate.output: the model has no output 'probs'"),
        (
            None,
            ["--set", "steps.benchmark.batch_sizes=[0]"],
            "steps.benchmark.batch_sizes: expected a list of positive sizes",
        ),
        ("python_list", [], "yielded a list as batch 0"),
        ("empty_images", [], "no images"),
    ],
)
def test_more_user_errors(
    digits_copy: Path,
    tracking_uri: str,
    capsys: pytest.CaptureFixture[str],
    prepare: str | None,
    overrides: list[str],
    expected: str,
) -> None:
    data = base(digits_copy)
    if prepare == "no_labels":
        np.savez(digits_copy / "data" / "validation.npz", input=_good_input(digits_copy))
    elif prepare == "python_list":
        (digits_copy / "src.py").write_text("def batches():\n    yield [1, 2, 3]\n")
        data["data"]["calibration"] = {"python": "src:batches"}
    elif prepare == "empty_images":
        (digits_copy / "imgs").mkdir()
        data["data"]["calibration"] = {
            "images": {"dir": "imgs", "size": [16, 16], "mean": [0.0], "std": [1.0], "channels": "L"}
        }
    path = write_yaml(digits_copy, data)
    quick = ["--set", "steps.calibrate.method=minmax", "--set", "steps.benchmark.iterations=2"]
    code, err = run_cli(["run", str(path), "--tracking-uri", tracking_uri, *quick, *overrides], capsys)
    assert code == 2, err
    assert expected in err and "Traceback" not in err


def test_malformed_ranges_file(tmp_path: Path) -> None:
    from pipeline.calibration.ranges import Ranges
    from pipeline.errors import CalibrationError

    bad = tmp_path / "ranges.json"
    bad.write_text('{"format": "something else"}')
    with pytest.raises(CalibrationError, match="not an int8pipe ranges.json"):
        Ranges.read(bad)
    bad.write_text("{not json")
    with pytest.raises(CalibrationError, match="not a readable ranges.json"):
        Ranges.read(bad)


def test_a_step_is_dropped_from_the_command_line_and_a_top_level_typo_is_named(digits_copy: Path) -> None:
    from pipeline.errors import ConfigError

    cfg = load(digits_copy / "pipeline.yaml", ["steps.promote=null", "steps.benchmark=null"])
    assert "promote" not in cfg.steps and "benchmark" not in cfg.steps and "validate" in cfg.steps
    assert "promote" in load(digits_copy / "pipeline.yaml", ["steps.promote={registered_model: x}"]).steps
    data = base(digits_copy)
    data["step"] = {}
    with pytest.raises(ConfigError, match=r"^unknown top-level key 'step'; allowed keys: name, model"):
        load(write_yaml(digits_copy, data), [])


def test_a_ray_sweep_hands_its_trials_the_cluster_for_sharded_calibration(monkeypatch: pytest.MonkeyPatch) -> None:
    """steps.calibrate.ray.address defaults to $RAY_ADDRESS, which a Ray sweep sets for each trial process:
    the combination is valid without naming the cluster twice (checked without starting Ray)."""
    pytest.importorskip("ray", reason='Ray is not installed (pip install -e ".[ray]")')
    from pipeline.errors import ConfigError

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yaml_file = DIGITS / "pipeline.yaml"
    sweep = "sweep={grid: {steps.calibrate.method: [minmax, mse]}, executor: %s, ray: {address: '127.0.0.1:1'}}"
    cfg = load(yaml_file, [sweep % "ray", "steps.calibrate.workers=2"])
    trials = [trial for _, trial in cfg.trials]
    assert [t.steps["calibrate"].workers for t in trials] == [2, 2]
    # what a trial process loads on its Ray node, where the sweep has set RAY_ADDRESS
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert load(yaml_file, trials[0].overrides).steps["calibrate"].workers == 2
    monkeypatch.delenv("RAY_ADDRESS")
    # without a Ray sweep nobody sets it: the cluster must be named
    for overrides in (["steps.calibrate.workers=2"], [sweep % "local", "steps.calibrate.workers=2"]):
        with pytest.raises(ConfigError, match=r"steps\.calibrate\.ray\.address: no Ray cluster given"):
            load(yaml_file, overrides)
