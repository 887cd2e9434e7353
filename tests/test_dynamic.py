"""quantize.mode: dynamic against ONNX Runtime's integer arithmetic computed independently, its
quantization roles on an attention block, and the pipeline around it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from pipeline.errors import ConfigError
from pipeline.execution import cpu_kernels, runtime
from pipeline.transforms import dynamic
from tests.models import build


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return runtime.run(runtime.session(model.SerializeToString(), optimize=False), feeds)[0]


@pytest.mark.parametrize("per_channel", [True, False])
def test_dynamic_matmul_is_the_integer_arithmetic(per_channel: bool) -> None:
    fp32 = build("single_matmul")
    int8 = dynamic.quantize_dynamic(fp32, per_channel, (), ())
    onnx.checker.check_model(int8, full_check=True)
    x = np.random.default_rng(3).normal(0.3, 1.0, size=(16, 4)).astype(np.float32)
    w = onnx.numpy_helper.to_array(fp32.graph.initializer[0]).astype(np.float64)
    # DynamicQuantizeLinear: uint8 over [min(0, x), max(0, x)] of this very batch
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = np.float32((hi - lo) / 255)
    zero = np.clip(np.round(-lo / scale), 0, 255)
    xq = np.clip(np.round(x / scale) + zero, 0, 255)
    # weights: INT8, symmetric, per output column (MatMul's B is [K, N]) or one scale
    w_scale = np.abs(w).max(axis=0) / 127 if per_channel else np.abs(w).max() / 127
    wq = np.round(w / w_scale)
    expected = ((xq - zero) @ wq) * scale * w_scale
    np.testing.assert_allclose(run(int8, {"x": x}), expected, rtol=1e-5, atol=1e-5)
    assert dynamic.node_table(fp32, int8, per_channel)[0]["precision"] == "int8"


def test_attention_roles() -> None:
    fp32 = build("tiny_attention")
    # the step's default fleet (every CPU): weights that cannot saturate ORT's MatMulInteger without VNNI
    int8 = dynamic.quantize_dynamic(fp32, True, (), (), scheme=cpu_kernels.choose(None))
    onnx.checker.check_model(int8, full_check=True)
    rows = {r["node"]: r["precision"] for r in dynamic.node_table(fp32, int8, True)}
    assert {n for n, p in rows.items() if p == "int8"} == {"wq", "wk", "wv", "wo"}  # the weight MatMuls
    assert rows["scores"] == rows["context"] == "fp32"  # activation x activation stays float
    assert rows["embed"] == "int8-weights"  # the table is stored in 8 bits, looked up, dequantized
    ids = np.random.default_rng(4).integers(0, 20, size=(32, 5))
    ref, out = run(fp32, {"ids": ids}), run(int8, {"ids": ids})
    cos = (ref * out).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(out, axis=1)
    assert cos.min() > 0.99
    assert not np.array_equal(ref, out)  # it did quantize

    def weight_bytes(m: onnx.ModelProto) -> int:
        return sum(onnx.numpy_helper.to_array(i).nbytes for i in m.graph.initializer)

    assert weight_bytes(int8) < weight_bytes(fp32) * 0.4  # 8-bit weights and table, plus their scales


def test_excluded_node_stays_float() -> None:
    fp32 = build("tiny_attention")
    rows = dynamic.node_table(fp32, dynamic.quantize_dynamic(fp32, True, ("wo",), ("Gather",)), True)
    precision = {r["node"]: r["precision"] for r in rows}
    assert precision["wo"] == "fp32" and precision["embed"] == "fp32" and precision["wq"] == "int8"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["steps.quantize.mode=dynamic"], "mode: dynamic needs target: onnxruntime"),
        (
            ["steps.quantize.mode=dynamic", "steps.quantize.target=onnxruntime", "steps.validate.recover={}"],
            "recover works on Q/DQ models",
        ),
    ],
)
def test_dynamic_config_errors(overrides: list[str], expected: str) -> None:
    from pipeline.orchestration.runner import load_config

    with pytest.raises(ConfigError, match=expected):
        load_config(Path(__file__).parent.parent / "examples" / "digits" / "pipeline.yaml", overrides)


@pytest.mark.slow
def test_dynamic_pipeline_needs_no_calibration(digits_copy: Path, tracking_uri: str, tmp_path: Path) -> None:
    import mlflow
    import yaml

    from tests.conftest import run_pipeline

    config = digits_copy / "pipeline.yaml"
    cfg = yaml.safe_load(config.read_text())
    del cfg["steps"]["calibrate"]  # nothing to calibrate: activation ranges come per batch at run time
    cfg["steps"]["quantize"] = {"mode": "dynamic", "target": "onnxruntime"}
    cfg["steps"]["benchmark"] = {**(cfg["steps"].get("benchmark") or {}), "iterations": 10}
    config.write_text(yaml.safe_dump(cfg))
    summary = run_pipeline(config, tracking_uri, tmp_path)
    assert summary["gate"] == "passed" and "calibrate" not in summary["steps"]
    client = mlflow.MlflowClient(tracking_uri)
    metrics = client.get_run(summary["steps"]["quantize"]).data.metrics
    assert metrics["int8_nodes"] == 1  # the Gemm; Conv stays float in dynamic mode
    assert metrics["bias_corrected_nodes"] == 0
    assert "cpu.int8.latency_p50_ms" in summary["metrics"]
    assert "onnxruntime dynamic" in client.get_run(summary["run_id"]).info.run_name
    name, version = summary["registered_model"]["name"], summary["registered_model"]["version"]
    model = mlflow.onnx.load_model(f"models:/{name}/{version}")
    assert any(n.op_type == "MatMulInteger" for n in model.graph.node)
    mv = client.get_model_version(name, version)
    assert mv.tags["int8pipe.calibration_method"].startswith("dynamic")
    assert "calibration_cache" not in mv.description  # no calibration, nothing to link


def test_static_mode_still_needs_calibrate(digits_copy: Path) -> None:
    import yaml

    from pipeline.orchestration.runner import load_config as load
    from pipeline.orchestration.runner import pipeline_label

    config = digits_copy / "pipeline.yaml"
    cfg = yaml.safe_load(config.read_text())
    del cfg["steps"]["calibrate"]
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="needs steps.calibrate"):
        load(config)
    dynamic = load(config, ["steps.quantize.mode=dynamic", "steps.quantize.target=onnxruntime"])
    assert "dynamic" in pipeline_label(dynamic)


def test_dynamic_exclude_of_an_unknown_node_names_it() -> None:
    from pipeline.errors import ModelError

    with pytest.raises(ModelError, match="no node named 'nope'"):
        dynamic.quantize_dynamic(build("tiny_attention"), True, ("nope",), ())


def test_an_invalid_model_from_ort_is_a_clear_error() -> None:
    """ORT's dynamic quantizer puts DynamicQuantizeLinear (float32 only) before a float16 MatMul and
    returns the broken model without complaint; the step must say so, not write it."""
    from onnx import TensorProto, helper, numpy_helper

    from pipeline.errors import ModelError

    weight = numpy_helper.from_array(np.linspace(-1, 1, 12, dtype=np.float16).reshape(4, 3), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="half_matmul")],
        "half",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 3])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    with pytest.raises(ModelError, match="dynamic quantizer wrote an invalid model.*float32"):
        dynamic.quantize_dynamic(model, True, (), ())
