"""Bias correction against its definition: after it, each INT8 layer's mean output per channel
equals the FP32 layer's on the samples it was measured on (single-layer models, so the layer's
output is the model's and no padding blurs the linearity)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from pipeline.execution import runtime
from pipeline.graph.model import toposort
from pipeline.transforms import bias_correction
from pipeline.transforms.keep_float import keep_float_inputs
from pipeline.transforms.quantization import QuantizeOptions, quantize
from tests.models import build

INPUTS = {
    "depthwise_conv": (4, 6, 6),
    "grouped_conv_no_bias": (4, 5, 5),
    "gemm_alpha_beta": (8,),
}


def samples(model: str, n: int = 64) -> np.ndarray:
    # a positive mean, so weight rounding moves the output mean; amax below max |x| adds clipping
    return np.random.default_rng(5).normal(1.0, 1.0, size=(n, *INPUTS[model])).astype(np.float32)


def channel_means(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    y = runtime.run(runtime.session(model.SerializeToString(), optimize=False), {"x": x})[0]
    return y.mean(axis=tuple(a for a in range(y.ndim) if a != 1))


def quantized(name: str, target: str) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    fp32 = build(name)
    opts = QuantizeOptions(target=target, activations="symmetric" if target == "tensorrt" else "asymmetric")
    # ONNX Runtime's placement also quantizes the output: a wide range, so it only rounds
    qdq = quantize(fp32, {"x": 2.0, "y": 40.0}, opts, {"x": (-2.0, 2.0), "y": (-40.0, 40.0)})
    return fp32, qdq


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
@pytest.mark.parametrize("name", list(INPUTS))
def test_corrected_layer_keeps_the_fp32_output_mean(name: str, target: str) -> None:
    fp32, qdq = quantized(name, target)
    x = samples(name)
    reference = channel_means(fp32, x)
    before = np.abs(channel_means(qdq, x) - reference).max()
    assert before > 1e-2  # there is a shift to remove (clipping at 2.0 and coarse weight rounding)

    changed, seen = bias_correction.correct(fp32, qdq, [{"x": x[:32]}, {"x": x[32:]}], samples=64)
    assert (changed, seen) == (1, 64)
    toposort(qdq)
    onnx.checker.check_model(qdq, full_check=True)
    after = np.abs(channel_means(qdq, x) - reference).max()
    # float32 sums for TensorRT's float bias; with ONNX Runtime the output's own quantizer (step 0.31)
    # rounds after the correction, which no bias can undo
    assert after < (1e-4 if target == "tensorrt" else 5e-2), (before, after)
    # a sample set it was not measured on still gains most of it
    fresh = np.random.default_rng(9).normal(1.0, 1.0, size=x.shape).astype(np.float32)
    assert np.abs(channel_means(qdq, fresh) - channel_means(fp32, fresh)).max() < before / 3


@pytest.mark.parametrize("opset", [17, 18])  # ReduceMean's axes: an attribute, then an input from 18
def test_shift_is_the_hand_computed_one(opset: int) -> None:
    fp32, qdq = quantized("gemm_alpha_beta", "tensorrt")
    fp32.opset_import[0].version = opset
    x = samples("gemm_alpha_beta")
    (layer,) = bias_correction.layers(fp32, qdq)
    w = numpy_helper.to_array(fp32.graph.initializer[0]).astype(np.float64)
    scale = np.abs(w).max(axis=0) / 127  # Gemm without transB: columns are output channels
    wq = np.clip(np.round(w / scale), -127, 127) * scale
    np.testing.assert_allclose(layer.weight_q, wq, rtol=1e-6)
    xq = np.clip(np.round(x / np.float32(2.0 / 127)), -128, 127) * np.float32(2.0 / 127)  # amax 2, symmetric
    expected = 0.5 * (xq.astype(np.float64) @ wq - x.astype(np.float64) @ w).mean(axis=0)  # alpha 0.5
    (measured,), seen = bias_correction.shifts(fp32, [layer], [{"x": x}], samples=len(x))
    assert seen == len(x)
    np.testing.assert_allclose(measured, expected, atol=2e-5)
    assert np.abs(expected).max() > 0.05


@pytest.mark.parametrize("name", ["depthwise_conv", "grouped_conv_no_bias"])
def test_a_reverted_node_gets_its_fp32_bias_back(name: str) -> None:
    fp32, qdq = quantized(name, "tensorrt")
    x = samples(name)
    bias_correction.correct(fp32, qdq, [{"x": x}])
    node = next(n for n in qdq.graph.node if n.op_type == "Conv")
    assert node.input[2].endswith("_corrected_bias")
    reverted = keep_float_inputs(qdq, fp32, [node.name])
    onnx.checker.check_model(reverted, full_check=True)
    assert not any(i.name.endswith("_corrected_bias") for i in reverted.graph.initializer)
    # the whole model is float again: FP32's outputs exactly
    fp = runtime.run(runtime.session(fp32.SerializeToString(), optimize=False), {"x": x})[0]
    back = runtime.run(runtime.session(reverted.SerializeToString(), optimize=False), {"x": x})[0]
    np.testing.assert_array_equal(back, fp)


def test_nothing_to_correct_without_int8_layers() -> None:
    fp32 = build("depthwise_conv")
    qdq = quantize(fp32, {"x": 2.0}, QuantizeOptions(target="tensorrt", exclude_nodes=("dw",)))
    assert bias_correction.correct(fp32, qdq, [{"x": samples("depthwise_conv")}]) == (0, 0)


@pytest.mark.slow
def test_quantize_step_corrects_biases_unless_told_not_to(digits_copy: Path, tracking_uri: str, tmp_path: Path) -> None:
    import mlflow
    import yaml

    from tests.conftest import run_pipeline

    config = digits_copy / "pipeline.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["steps"] = {k: v for k, v in cfg["steps"].items() if k in ("export", "calibrate", "quantize", "validate")}
    config.write_text(yaml.safe_dump(cfg))
    client = mlflow.MlflowClient(tracking_uri)

    def quantize_run(*overrides: str) -> tuple[dict[str, float], onnx.ModelProto, float]:
        summary = run_pipeline(config, tracking_uri, tmp_path, *overrides)
        run = client.get_run(summary["steps"]["quantize"])
        path = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="model/model_int8.onnx", dst_path=str(tmp_path / run.info.run_id),
            tracking_uri=tracking_uri,
        )  # fmt: skip
        return run.data.metrics, onnx.load(path), summary["metrics"]["accuracy_drop"]

    on, corrected, drop_on = quantize_run()
    off, plain, drop_off = quantize_run("steps.quantize.bias_correction=false")
    # every Conv and Gemm of the digits CNN runs in INT8 and is corrected; none when switched off
    layers = [n for n in corrected.graph.node if n.op_type in ("Conv", "Gemm")]
    assert on["bias_corrected_nodes"] == len(layers) > 0
    assert all("_corrected_bias" in n.input[2] for n in layers)  # "_fp16" follows in FP16 regions
    assert off["bias_corrected_nodes"] == 0
    assert not any("_corrected_bias" in i.name for i in plain.graph.initializer)
    assert drop_on <= drop_off + 1 / 360  # not worse than one test image


def test_shifts_do_not_depend_on_the_memory_budget_and_stop_at_samples() -> None:
    fp32, qdq = quantized("depthwise_conv", "tensorrt")
    x = samples("depthwise_conv", 64)
    todo = bias_correction.layers(fp32, qdq)
    batches = [{"x": x[:40]}, {"x": x[40:]}]
    # a budget below one sample's activations: one sample per ONNX Runtime call
    (small,), seen_small = bias_correction.shifts(fp32, todo, batches, samples=50, memory_mb=0)
    (large,), seen_large = bias_correction.shifts(fp32, todo, batches, samples=50, memory_mb=512)
    assert seen_small == seen_large == 50  # the second batch is cut, not taken whole
    np.testing.assert_allclose(small, large, rtol=1e-5, atol=1e-7)
    (first50,), _ = bias_correction.shifts(fp32, todo, [{"x": x[:50]}], samples=50)
    np.testing.assert_allclose(large, first50, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("value", [0, -5])
def test_bias_correction_samples_must_be_positive(value: int) -> None:
    from pipeline.errors import ConfigError
    from pipeline.orchestration.runner import load_config as load

    digits = Path(__file__).parent.parent / "examples" / "digits" / "pipeline.yaml"
    with pytest.raises(ConfigError, match="bias_correction_samples: expected a positive number"):
        load(digits, [f"steps.quantize.bias_correction_samples={value}"])
