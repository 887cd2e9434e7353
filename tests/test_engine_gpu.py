"""Building and timing TensorRT engines: these run where ``tensorrt`` imports and a CUDA GPU is present,
and are skipped with the reason elsewhere (the reason is what the engine step would tag its run with)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from pipeline.analysis import engine_layers, latency
from pipeline.execution import tensorrt_engine
from pipeline.tag_names import ENGINE_DEVICE_TAG, ENGINE_TAG, ENGINE_TENSORRT_TAG
from tests.conftest import run_pipeline
from tests.models import build

HERE = tensorrt_engine.availability()
pytestmark = pytest.mark.skipif(not HERE.ok, reason=f"needs TensorRT and a CUDA GPU: {HERE.reason}")


def test_a_float_model_builds_strongly_typed_and_times() -> None:
    model = build("conv_relu_gemm")  # FP32, batch dynamic: built for exactly batch 4
    built = tensorrt_engine.build(model.SerializeToString(), {"x": (4, 2, 4, 4)})
    assert built.plan and built.tensorrt == HERE.tensorrt
    info = engine_layers.parse(built.inspector_json, {n.name for n in model.graph.node})
    assert info.detailed and info.schema in (engine_layers.BINDINGS, engine_layers.IO_TENSORS)
    # strongly typed: an FP32 model runs in FP32, nothing lowered behind its back
    assert info.counts()["fp32"] >= 1 and info.counts()["fp16"] == info.counts()["int8"] == 0
    assert "conv" in info.node_precisions()
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 2, 4, 4)).astype(np.float32)}
    times = tensorrt_engine.time_engine(built.plan, feeds, iterations=20, warmup=5, repeats=3)
    assert len(times) == 3 and all(t.shape == (20,) and (t > 0).all() for t in times)
    assert latency.summarize(times, batch=4).p50_ms > 0


def test_a_qdq_model_runs_its_quantized_nodes_in_int8() -> None:
    from pipeline.transforms.quantization import QuantizeOptions, node_table, quantize

    fp32 = build("conv_relu_gemm")
    qdq = quantize(fp32, {"x": 3.0, "flat": 2.0}, QuantizeOptions(target="tensorrt"))
    built = tensorrt_engine.build(qdq.SerializeToString(), {"x": (4, 2, 4, 4)})
    info = engine_layers.parse(built.inspector_json, {n.name for n in qdq.graph.node})
    quantized = [r["node"] for r in node_table(fp32, qdq) if r["precision"] == "int8"]
    # TensorRT fuses a DequantizeLinear into its consumer where it can and may leave a tiny layer float
    # (strongly typed, DQ -> float Gemm is legal): at least one quantized node runs INT8, and the rest
    # are reported, not hidden
    assert quantized and info.counts()["int8"] >= 1, info.table()
    assert set(info.not_int8(quantized)) < set(quantized)


@pytest.mark.slow  # runs the digits pipeline
def test_digits_pipeline_builds_and_times_both_engines(digits_copy: Path, tracking_uri: str, tmp_path: Path) -> None:
    config = digits_copy / "pipeline.yaml"
    doc = yaml.safe_load(config.read_text())
    doc["steps"] = {
        "export": {},
        "calibrate": {"method": "minmax"},
        "quantize": {"target": "tensorrt"},
        "validate": {"metric": "top1", "max_drop": 0.01},
        "engine": {"iterations": 50, "warmup": 10, "repeats": 3},
        "promote": {"registered_model": "digits-int8", "alias": "candidate"},
    }
    config.write_text(yaml.safe_dump(doc))
    summary = run_pipeline(config, tracking_uri, tmp_path)
    client = MlflowClient(tracking_uri)
    run = client.get_run(summary["steps"]["engine"])
    assert run.data.tags[ENGINE_TAG] == "built" and run.data.tags[ENGINE_TENSORRT_TAG] == HERE.tensorrt
    assert run.data.tags[ENGINE_DEVICE_TAG] == HERE.device
    metrics = run.data.metrics
    assert metrics["engine.int8.layers_int8"] >= 1  # the Q/DQ model quantizes the 6 Convs and the Gemm
    assert metrics["engine.int8.quantized_nodes_not_int8"] < 7  # those no INT8 layer runs are counted
    assert metrics["engine.fp16.layers_int8"] == 0 and metrics["engine.fp16.layers_fp16"] >= 1
    for which in ("int8", "fp16"):
        assert metrics[f"engine.{which}.latency_p50_ms"] > 0 and metrics[f"engine.{which}.repeat_spread"] >= 0
    assert metrics["engine.int8_vs_fp16_speedup"] == pytest.approx(
        metrics["engine.fp16.latency_p50_ms"] / metrics["engine.int8.latency_p50_ms"]
    )
    names = {a.path for a in client.list_artifacts(run.info.run_id, "engine")}
    assert {
        "engine/report.json",
        "engine/layers_table.json",
        "engine/model_fp16.onnx",
        "engine/model_int8.plan",
        "engine/model_fp16.plan",
        "engine/inspector_int8.json",
        "engine/inspector_fp16.json",
    } <= names
    table = json.loads(
        Path(client.download_artifacts(run.info.run_id, "engine/layers_table.json", str(tmp_path))).read_text()
    )
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert {r["engine"] for r in rows} == {"int8", "fp16"}
    assert any(r["precision"] == "int8" and r["onnx_nodes"] for r in rows if r["engine"] == "int8")
