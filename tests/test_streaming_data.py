"""The data contract of stateful and streaming models: ``batch_axes`` and ``constants``.

A real recurrent cell built in code (examples/data_sources/streaming.py): x [B, 16], a state
[2, B, 8] whose samples are on axis 1, and a scalar sample rate ``sr`` read by a Mul. Real npz files,
a real sqlite MLflow store, ONNX Runtime sessions throughout.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import mlflow
import numpy as np
import pytest
import yaml

from pipeline.calibration.calibrator import calibrate
from pipeline.errors import ConfigError, DataError
from pipeline.execution import runtime
from pipeline.graph import model as onnx_model
from pipeline.graph.layout import Layout
from pipeline.orchestration.cli import main
from pipeline.orchestration.runner import load_config as load
from pipeline.sources import data
from pipeline.sources.spec import DataSource
from tests.conftest import ROOT, run_args, run_pipeline

LAYOUT = {"batch_axes": {"state": 1}, "constants": ["sr"]}


def _streaming() -> ModuleType:
    spec = importlib.util.spec_from_file_location("streaming_example", ROOT / "examples/data_sources/streaming.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pipeline(folder: Path, declare: dict[str, Any] | None = LAYOUT, **steps: Any) -> Path:
    """The streaming model, 64 calibration and 48 validation samples, and a pipeline YAML over them."""
    s = _streaming()
    s.write(folder)
    raw = {
        "name": "streaming",
        "model": {"onnx": "model.onnx"},
        "data": {
            "calibration": {"npz": "calibration.npz", **(declare or {})},
            "validation": {"npz": "validation.npz", **(declare or {})},
        },
        "steps": steps
        or {
            "export": {},
            "calibrate": {"batch_size": 5},  # batches that do not divide the 64 samples
            "quantize": {},
            "validate": {"metric": "cosine", "max_drop": 0.02, "batch_size": 7},
            "benchmark": {"batch_sizes": [1, 3], "iterations": 5, "warmup": 1},
        },
    }
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _artifact(uri: str, run_id: str, path: str, dst: Path) -> Path:
    return Path(
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=uri, dst_path=str(dst))
    )


@pytest.mark.slow
def test_streaming_model_through_the_whole_pipeline(tmp_path: Path, tracking_uri: str) -> None:
    config = _pipeline(tmp_path / "m")
    s = run_pipeline(config, tracking_uri, tmp_path)
    m = s["metrics"]
    assert s["gate"] == "passed" and m["num_samples"] == 64 and m["int8_nodes"] > 0
    assert m["int8_cosine"] > 0.999 and m["cosine_min"] > 0.99
    cal = np.load(tmp_path / "m" / "calibration.npz")
    val = np.load(tmp_path / "m" / "validation.npz")

    # calibration saw every state sample (axis 1) and the constant as it is
    ranges = json.loads(
        _artifact(tracking_uri, s["steps"]["calibrate"], "calibration/ranges.json", tmp_path).read_text()
    )
    assert ranges["num_samples"] == 64
    assert ranges["tensors"]["state"]["min"] == pytest.approx(float(cal["state"].min()))
    assert ranges["tensors"]["state"]["max"] == pytest.approx(float(cal["state"].max()))
    assert ranges["tensors"]["sr"]["min"] == ranges["tensors"]["sr"]["max"] == pytest.approx(0.5)

    # validation: inputs kept in the model's layout, outputs with their samples first
    report = json.loads(_artifact(tracking_uri, s["steps"]["validate"], "validation/report.json", tmp_path).read_text())
    assert report["samples"] == 48
    kept = np.load(_artifact(tracking_uri, s["steps"]["validate"], "validation/samples.npz", tmp_path))
    np.testing.assert_array_equal(kept["input.state"], val["state"][:, :8])
    assert kept["input.sr"].shape == () and float(kept["input.sr"]) == 0.5
    assert kept["fp32.state_out"].shape == (8, 2, 8) and kept["fp32.y"].shape == (8, 8)
    # the kept FP32 outputs are what the model computes on those samples, sample by sample
    sess = runtime.session(config.parent / "model.onnx")
    y, state_out = sess.run(None, {"x": val["x"][:8], "state": val["state"][:, :8], "sr": val["sr"]})
    np.testing.assert_allclose(kept["fp32.y"], y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kept["fp32.state_out"], np.moveaxis(state_out, 1, 0), rtol=1e-5, atol=1e-6)

    # benchmark: the batch size goes on the state's axis 1; sr keeps its shape
    bench = json.loads(_artifact(tracking_uri, s["steps"]["benchmark"], "benchmark/report.json", tmp_path).read_text())
    assert bench["inputs"]["state"]["shape"] == [2, "batch", 8] and bench["inputs"]["sr"]["shape"] == []
    shapes = {(r["precision"], r["batch_size"]): r["shapes"] for r in bench["providers"]["cpu"]["results"]}
    assert shapes[("int8", 3)] == {"x": [3, 16], "state": [2, 3, 8], "sr": []}
    assert shapes[("fp32", 1)] == {"x": [1, 16], "state": [2, 1, 8], "sr": []}
    assert m["cpu.int8.bs3.latency_p50_ms"] > 0


def _cli_error(config: Path, tracking_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    code = main(run_args(config, tracking_uri, tmp_path / "s.json"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


def test_undeclared_scalar_names_the_input_and_the_key(
    tmp_path: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _cli_error(_pipeline(tmp_path / "m", declare=None), tracking_uri, tmp_path, capsys)
    assert "'sr'" in err and "constants: [sr]" in err and "data.calibration" in err


def test_undeclared_state_axis_names_the_input_and_the_key(
    tmp_path: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _cli_error(_pipeline(tmp_path / "m", declare={"constants": ["sr"]}), tracking_uri, tmp_path, capsys)
    assert "differ in number of samples" in err and "batch_axes: {state: 1}" in err
    assert "data.calibration" in err


def test_batches_cut_the_state_on_its_axis_and_pass_constants_unchanged(tmp_path: Path) -> None:
    s = _streaming()
    s.write(tmp_path)
    specs = onnx_model.input_specs(s.build_model())
    src = DataSource(npz=str(tmp_path / "calibration.npz"), limit=10, **LAYOUT)  # type: ignore[arg-type]
    got = list(data.batches(src, 4, specs, [], "data.calibration"))
    assert [b["state"].shape for b in got] == [(2, 4, 8), (2, 4, 8), (2, 2, 8)]
    assert [b["x"].shape for b in got] == [(4, 16), (4, 16), (2, 16)]
    assert all(b["sr"].shape == () and float(b["sr"]) == 0.5 for b in got)
    whole = np.load(tmp_path / "calibration.npz")
    np.testing.assert_array_equal(np.concatenate([b["state"] for b in got], axis=1), whole["state"][:, :10])
    chunks = list(data.rechunk(got, 3, Layout.of(src)))
    assert [c["state"].shape[1] for c in chunks] == [3, 1, 3, 1, 2]
    assert all(c["sr"].shape == () for c in chunks)
    # the declaration is part of the data digest (step reuse): the same bytes cut otherwise are other samples
    plain = DataSource(npz=src.npz, limit=10)
    assert data.source_digest(src, []) != data.source_digest(plain, [])


def test_calibration_ranges_do_not_depend_on_the_batch_size(tmp_path: Path) -> None:
    s = _streaming()
    s.write(tmp_path)
    path = tmp_path / "model.onnx"
    specs = onnx_model.input_specs(s.build_model())
    src = DataSource(npz=str(tmp_path / "calibration.npz"), **LAYOUT)  # type: ignore[arg-type]
    layout = Layout.of(src)

    def run(size: int) -> Any:
        return calibrate(path, lambda: data.batches(src, size, specs, [], "data.calibration"), "minmax", layout=layout)

    small, whole = run(3), run(64)
    assert small.ranges.num_samples == whole.ranges.num_samples == 64
    for name, r in whole.ranges.tensors.items():
        assert (small.ranges.tensors[name].min, small.ranges.tensors[name].max) == pytest.approx((r.min, r.max)), name
    # h0 is state[0]: its range is the range of the first layer's states over all 64 samples
    state = np.load(tmp_path / "calibration.npz")["state"]
    assert whole.ranges.tensors["h0"].max == pytest.approx(float(state[0].max()))


@pytest.mark.parametrize(
    ("declare", "expected"),
    [
        ({"batch_axes": {"nope": 1}}, r"data.calibration.batch_axes: the model has no input 'nope'"),
        ({"constants": ["nope"]}, r"data.calibration.constants: the model has no input 'nope'"),
        (
            {"batch_axes": {"state": 3}, "constants": ["sr"]},
            r"data.calibration.batch_axes.state: axis 3 does not exist",
        ),
        ({"constants": ["x", "state", "sr"]}, r"every model input is declared constant"),
    ],
)
def test_declarations_that_do_not_fit_the_model_are_config_errors(
    tmp_path: Path, declare: dict[str, Any], expected: str
) -> None:
    s = _streaming()
    s.write(tmp_path)
    specs = onnx_model.input_specs(s.build_model())
    src = DataSource(npz=str(tmp_path / "calibration.npz"), **declare)
    with pytest.raises(ConfigError, match=expected):
        data.preflight(src, specs, [], "data.calibration")


@pytest.mark.parametrize(
    ("declare", "expected"),
    [
        ({"batch_axes": {"state": -1}}, r"data.calibration.batch_axes.state: expected the axis index"),
        ({"batch_axes": {"sr": 1}, "constants": ["sr"]}, r"input 'sr' is both in batch_axes and in constants"),
    ],
)
def test_bad_declarations_are_refused_when_the_yaml_loads(
    tmp_path: Path, declare: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        load(_pipeline(tmp_path, declare=declare))


def test_a_state_without_its_axis_is_a_data_error(tmp_path: Path) -> None:
    s = _streaming()
    specs = onnx_model.input_specs(s.build_model())
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((4, 16), np.float32), state=np.zeros((2, 4, 8), np.float32), sr=np.float32(1))
    src = DataSource(npz=str(path), batch_axes={"state": 2}, constants=["sr"])
    with pytest.raises(DataError, match=r"arrays differ in number of samples.*'state': 8"):
        list(data.batches(src, 4, specs, [], "data.calibration"))
