"""Pipelines that write models for TensorRT 11: FP16 float regions by default, FP8 on request, the
strongly typed lint on what is written, and FP16 overflow named by validate instead of NaN scores."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import mlflow.onnx
import numpy as np
import onnx
import pytest
from mlflow import MlflowClient

from pipeline.graph.model import tensor_types
from pipeline.orchestration.cli import main
from tests.conftest import npz_pipeline, run_args, run_pipeline
from tests.models import build

pytestmark = pytest.mark.slow


def artifact(tracking_uri: str, run_id: str, path: str, dst: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst),
                                                    tracking_uri=tracking_uri))  # fmt: skip


def test_digits_for_tensorrt_has_fp16_regions_by_default_and_fp8_on_request(
    digits_copy: Path, tracking_uri: str, tmp_path: Path
) -> None:
    client = MlflowClient(tracking_uri)
    for precision, dtype in [("int8", onnx.TensorProto.INT8), ("fp8", onnx.TensorProto.FLOAT8E4M3FN)]:
        folder = tmp_path / precision
        folder.mkdir()
        summary = run_pipeline(digits_copy / "pipeline.yaml", tracking_uri, folder,
                               f"steps.quantize.precision={precision}")  # fmt: skip
        quantize = summary["steps"]["quantize"]
        assert summary["gate"] == "passed" and summary["metrics"]["accuracy_drop"] <= 0.01
        model = onnx.load(artifact(tracking_uri, quantize, "model/model_int8.onnx", folder))
        onnx.checker.check_model(model, full_check=True)
        zero_points = {i.data_type for i in model.graph.initializer if "zero_point" in i.name}
        assert zero_points == {dtype}
        types = tensor_types(model)
        convs = [n for n in model.graph.node if n.op_type == "Conv"]
        assert convs and all(types[n.output[0]] == onnx.TensorProto.FLOAT16 for n in convs)
        regions = json.loads(artifact(tracking_uri, quantize, "quantize/float_regions.json", folder).read_text())
        assert regions["precision"] == "fp16" and regions["low_nodes"]
        lint = artifact(tracking_uri, quantize, "quantize/strongly_typed_lint.json", folder)
        assert json.loads(lint.read_text()) == []
        rows = json.loads(artifact(tracking_uri, quantize, "quantize/nodes_table.json", folder).read_text())
        table = dict(zip(rows["columns"], zip(*rows["data"])))
        assert precision in table["precision"] and "fp16" in table["precision"]
        assert client.get_run(quantize).data.metrics["strongly_typed_breaks"] == 0
        registered = summary["registered_model"]
        version = client.get_model_version(registered["name"], registered["version"])
        assert version.tags["int8pipe.precision"] == precision
        loaded = mlflow.onnx.load_model(f"models:/{registered['name']}/{registered['version']}")
        onnx.checker.check_model(loaded, full_check=True)


def test_fp16_overflow_on_validation_data_names_the_tensor(
    tmp_path: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """outlier_channel_matmul multiplies channel 0 by 40 in a float region: calibration sees |h| ~ 160,
    validation data 3,000 times larger pushes h past FP16's 65504, and the INT8 quantizer reading h would
    saturate the inf into a finite, wrong number."""
    rng = np.random.default_rng(0)
    cal = {"x": rng.normal(size=(64, 8)).astype(np.float32)}
    val = {"x": (rng.normal(size=(32, 8)) * 3e3).astype(np.float32)}
    steps = {"export": {}, "calibrate": {"method": "minmax"}, "quantize": {},
             "validate": {"metric": "cosine", "max_drop": 0.05}}  # fmt: skip
    config = npz_pipeline(tmp_path, build("outlier_channel_matmul"), cal, val, steps, name="overflow")
    code = main(run_args(config, tracking_uri, tmp_path / "s.json"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "FP16 float regions overflow on the validation data (inf or NaN first in h, on validation samples 0-3)" in (
        " ".join(err.split())
    )
    assert "steps.quantize.keep_fp32_nodes: [outlier]" in err and "Traceback" not in err
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("overflow").experiment_id])
    statuses = {r.data.tags.get("int8pipe.step"): r.info.status for r in runs}
    assert statuses["validate"] == "FAILED" and statuses["quantize"] == "FINISHED"
    _keeping_fp32_ends_the_overflow(config, tracking_uri, tmp_path, capsys, "outlier")  # the node writing h


def _keeping_fp32_ends_the_overflow(
    config: Path, tracking_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], node: str
) -> None:
    """The way out the overflow message names works: ``node`` kept FP32, the pipeline runs through."""
    code = main(run_args(config, tracking_uri, tmp_path / "s2.json", f"steps.quantize.keep_fp32_nodes=[{node}]"))
    err = capsys.readouterr().err
    assert code in (0, 3) and "float regions overflow" not in err, err


def test_fp16_overflow_on_a_later_validation_sample_names_the_tensor_and_the_node(
    tmp_path: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first 40 validation samples stay in range and the last 24 overflow an FP16 region whose inf
    reaches the output: y = (x W) / scale, the scale a second input (as PaddleDetection's scale_factor)
    that turns tiny on the later samples, and the Div computes in FP16. The probe of the first samples
    finds nothing; the outputs point at sample 40, whose FP16 tensors are read to name the tensor and
    the node."""
    rng = np.random.default_rng(4)
    w = rng.normal(size=(8, 4)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
         onnx.helper.make_node("Div", ["h", "scale"], ["y"], name="rescale")],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8]),
         onnx.helper.make_tensor_value_info("scale", onnx.TensorProto.FLOAT, ["batch", 1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])],
        [onnx.numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    cal = {"x": rng.normal(size=(64, 8)).astype(np.float32),
           "scale": rng.uniform(0.5, 2.0, size=(64, 1)).astype(np.float32)}  # fmt: skip
    scale = rng.uniform(0.5, 2.0, size=(64, 1)).astype(np.float32)
    scale[40:] = 1e-5  # |x W| of a few units / 1e-5 passes 65504
    val = {"x": rng.normal(size=(64, 8)).astype(np.float32), "scale": scale}
    steps = {"export": {}, "calibrate": {"method": "minmax"}, "quantize": {},
             "validate": {"metric": "cosine", "max_drop": 0.05, "batch_size": 16}}  # fmt: skip
    config = npz_pipeline(tmp_path, model, cal, val, steps, name="late-overflow")
    summary = tmp_path / "s.json"
    code = main(run_args(config, tracking_uri, summary))
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2, err
    assert "Traceback" not in err and "RuntimeWarning" not in err
    assert ("the model's FP16 float regions overflow on the validation data (inf or NaN first in y_fp16, on "
            "validation samples 40-43)") in err  # fmt: skip
    assert "steps.quantize.keep_fp32_nodes: [rescale]" in err and "float_precision: bf16" in err
    s = json.loads(summary.read_text())
    client = MlflowClient(tracking_uri)
    statuses = {step: client.get_run(rid).info.status for step, rid in s["steps"].items()}
    assert statuses == {"export": "FINISHED", "calibrate": "FINISHED", "quantize": "FINISHED", "validate": "FAILED"}
    _keeping_fp32_ends_the_overflow(config, tracking_uri, tmp_path, capsys, "rescale")


def test_a_model_the_version_converter_refuses_fails_quantize_with_the_way_out(
    tmp_path: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """FP16 regions need opset 19; conv_bn_training_outputs (opset 13, a BatchNormalization with its
    training outputs) cannot be converted past 13. Quantize fails with a ModelError, not the converter's
    traceback, and keeps what export and calibrate logged; float_precision: fp32, the way out it names,
    quantizes the same model at its own opset."""
    rng = np.random.default_rng(2)
    cal = {"x": rng.normal(size=(16, 3, 8, 8)).astype(np.float32)}
    val = {"x": rng.normal(size=(16, 3, 8, 8)).astype(np.float32)}
    steps = {"export": {}, "calibrate": {"method": "minmax"}, "quantize": {}}
    config = npz_pipeline(tmp_path, build("conv_bn_training_outputs"), cal, val, steps, name="converter")
    summary = tmp_path / "s.json"
    code = main(run_args(config, tracking_uri, summary))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "Assertion" not in err
    assert ("FP16 float regions (steps.quantize.float_precision: fp16) need ONNX opset 19, and ONNX's version "
            "converter cannot bring this model from opset 13 to 19: BatchNormalization outputs 4 and 5 are not "
            "supported in Opset 14.") in " ".join(err.split())  # fmt: skip
    assert "steps.quantize.float_precision: fp32" in err and "opset 19 or later" in err
    s = json.loads(summary.read_text())
    client = MlflowClient(tracking_uri)
    statuses = {step: client.get_run(rid).info.status for step, rid in s["steps"].items()}
    assert statuses == {"export": "FINISHED", "calibrate": "FINISHED", "quantize": "FAILED"}
    assert client.get_run(s["run_id"]).info.status == "FAILED"
    assert "model/model.onnx" in [a.path for a in client.list_artifacts(s["steps"]["export"], "model")]
    done = run_pipeline(config, tracking_uri, tmp_path, "steps.quantize.float_precision=fp32")
    model = onnx.load(artifact(tracking_uri, done["steps"]["quantize"], "model/model_int8.onnx", tmp_path / "fp32"))
    assert next(o.version for o in model.opset_import if o.domain == "") == 13
