"""Activation smoothing: exact in float, known per-channel statistics, and the INT8 error it removes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from pipeline.calibration.calibrator import calibrate
from pipeline.execution import runtime
from pipeline.transforms import smoothing
from pipeline.transforms.quantization import QuantizeOptions, quantize
from tests.models import build


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return runtime.run(runtime.session(model.SerializeToString(), optimize=False), feeds)[0]


def test_factors_are_smoothquants() -> None:
    x_max, w_max = np.array([16.0, 1.0, 0.0, 4.0]), np.array([1.0, 4.0, 2.0, 0.0])
    # s = x^a / w^(1-a); a silent channel on either side keeps s = 1
    np.testing.assert_allclose(smoothing.factors(x_max, w_max, 0.5), [4.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(smoothing.factors(x_max, w_max, 1.0), [16.0, 1.0, 1.0, 1.0])


@pytest.mark.parametrize(("name", "shape"), [("outlier_channel_matmul", (8,)), ("tiny_detector", (3, 8, 8))])
def test_smoothing_is_exact_in_float_and_measures_channel_maxima(name: str, shape: tuple[int, ...]) -> None:
    from pipeline.calibration.collect import expose

    fp32 = build(name)
    x = np.random.default_rng(2).normal(size=(24, *shape)).astype(np.float32)
    items = smoothing.candidates(fp32, ["Conv", "MatMul", "Gemm"])
    assert len(items) == 1  # the MatMul's input "h", the head Conv's input "r1" (conv1 reads the graph input)
    maxima = smoothing.channel_max(fp32, items, [{"x": x[:10]}, {"x": x[10:]}], samples=24)
    (value,) = runtime.run(runtime.session(expose(fp32, [items[0].tensor])), {"x": x})
    axes = tuple(a for a in range(value.ndim) if a != (1 if value.ndim == 4 else value.ndim - 1))
    np.testing.assert_allclose(maxima[0], np.abs(value).max(axis=axes), rtol=1e-6)
    smoothed, new = smoothing.smooth(fp32, items, maxima, 0.5)
    onnx.checker.check_model(smoothed, full_check=True)
    assert new == [f"{items[0].tensor}_smoothed"]
    # the smoothed weights replace the originals instead of joining them
    assert sum(i.name.endswith("_smoothed_weight") for i in smoothed.graph.initializer) == 1
    assert len(smoothed.graph.initializer) == len(fp32.graph.initializer) + 1  # + the Mul's factors
    for a, b in zip(runtime.run(runtime.session(smoothed.SerializeToString()), {"x": x}),
                    runtime.run(runtime.session(fp32.SerializeToString()), {"x": x})):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_smoothing_removes_the_outlier_channels_int8_error(tmp_path: Path) -> None:
    fp32 = build("outlier_channel_matmul")
    x = np.random.default_rng(3).normal(size=(256, 8)).astype(np.float32)
    ref = run(fp32, {"x": x})

    def int8_error(model: onnx.ModelProto, tensor: str) -> float:
        onnx.save(model, str(tmp_path / "m.onnx"))
        cal = calibrate(tmp_path / "m.onnx", lambda: iter([{"x": x}]), "minmax")
        out = run(quantize(model, cal.ranges.amax(), QuantizeOptions(target="tensorrt")), {"x": x})
        return float(np.sqrt(((out - ref) ** 2).mean()) / np.sqrt((ref**2).mean()))

    items = smoothing.candidates(fp32, ["MatMul"])
    smoothed, (tensor,) = smoothing.smooth(fp32, items, smoothing.channel_max(fp32, items, [{"x": x}], 256), 0.5)
    plain, smooth = int8_error(fp32, "h"), int8_error(smoothed, tensor)
    assert smooth < plain / 3, (plain, smooth)


def test_grouped_conv_activation_matmul_and_excluded_nodes_are_not_smoothed() -> None:
    assert smoothing.candidates(build("depthwise_conv"), ["Conv"]) == []
    assert [i.tensor for i in smoothing.candidates(build("tiny_attention"), ["MatMul"])] == ["e", "c"]
    assert smoothing.candidates(build("outlier_channel_matmul"), ["MatMul"], skip=["fc"]) == []


@pytest.mark.slow
def test_quantize_step_smooths_calibrates_and_validates(digits_copy: Path, tracking_uri: str, tmp_path: Path) -> None:
    import mlflow

    from tests.conftest import run_pipeline

    summary = run_pipeline(
        digits_copy / "pipeline.yaml", tracking_uri, tmp_path, "steps.quantize.smoothing={alpha: 0.5}",
        "steps.benchmark.iterations=5",
    )  # fmt: skip
    assert summary["gate"] == "passed"
    run = mlflow.MlflowClient(tracking_uri).get_run(summary["steps"]["quantize"])
    assert run.data.metrics["smoothed_inputs"] > 0
    path = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="model/model_int8.onnx", dst_path=str(tmp_path), tracking_uri=tracking_uri
    )
    model = onnx.load(path)
    muls = [n for n in model.graph.node if n.op_type == "Mul" and n.name.endswith("_smoothed_mul")]
    assert len(muls) == run.data.metrics["smoothed_inputs"]
    # each smoothed tensor got its own range: a QuantizeLinear reads it
    quantized = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert all(m.output[0] in quantized for m in muls)


def test_smoothing_config_errors() -> None:
    from pipeline.errors import ConfigError
    from pipeline.orchestration.runner import load_config as load

    digits = Path(__file__).parent.parent / "examples" / "digits" / "pipeline.yaml"
    with pytest.raises(ConfigError, match="smoothing.alpha"):
        load(digits, ["steps.quantize.smoothing={alpha: 1.5}"])
    with pytest.raises(ConfigError, match="smoothing.samples"):
        load(digits, ["steps.quantize.smoothing={samples: 0}"])


def test_a_reverted_smoothed_layer_is_the_fp32_layer_again() -> None:
    from pipeline.transforms.keep_float import keep_float_inputs

    fp32 = build("outlier_channel_matmul")
    x = np.random.default_rng(4).normal(size=(32, 8)).astype(np.float32)
    items = smoothing.candidates(fp32, ["MatMul"])
    smoothed, (tensor,) = smoothing.smooth(fp32, items, smoothing.channel_max(fp32, items, [{"x": x}], 32), 0.5)
    qdq = quantize(smoothed, {"x": 4.0, "h": 160.0, tensor: 8.0}, QuantizeOptions(target="tensorrt"))
    reverted = keep_float_inputs(qdq, fp32, ["fc"])
    onnx.checker.check_model(reverted, full_check=True)
    assert not any(n.op_type in ("Mul", "QuantizeLinear") and n.name != "outlier" for n in reverted.graph.node)
    np.testing.assert_array_equal(run(reverted, {"x": x}), run(fp32, {"x": x}))


def test_smoothed_tensors_get_the_smoothing_method_thresholds() -> None:
    """smooth_and_calibrate calibrates the new tensors with its own method: minmax (the step's
    default) is max |x / s| computed by hand; a clipping method gives a smaller threshold."""
    from pipeline.calibration.collect import expose

    fp32 = build("outlier_channel_matmul")
    x = np.random.default_rng(4).normal(size=(64, 8)).astype(np.float32)
    batches = lambda: iter([{"x": x[:32]}, {"x": x[32:]}])  # noqa: E731
    smoothed, new = smoothing.smooth_and_calibrate(fp32, batches, ["MatMul"], [], 0.95, 64, "minmax", 99.99, 512)
    (tensor,) = new
    (value,) = runtime.run(runtime.session(expose(smoothed, [tensor])), {"x": x})
    assert new[tensor].amax == pytest.approx(float(np.abs(value).max()), rel=1e-6)
    _, clipped = smoothing.smooth_and_calibrate(fp32, batches, ["MatMul"], [], 0.95, 64, "percentile", 99.0, 512)
    assert clipped[tensor].amax < 0.99 * new[tensor].amax
