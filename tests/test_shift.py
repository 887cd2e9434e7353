"""Shifted activations: the arithmetic checked against a model built by hand, and what is left alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from pipeline.analysis import recovery
from pipeline.calibration.calibrator import calibrate
from pipeline.execution import runtime
from pipeline.orchestration.cli import main
from pipeline.transforms import bias_correction, shift
from pipeline.transforms.quantization import QuantizeOptions, quantize
from tests.conftest import run_args
from tests.models import build


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return runtime.run(runtime.session(model.SerializeToString(), optimize=False), {"x": x})[0]


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def quantized(model: onnx.ModelProto, x: np.ndarray, tmp: Path) -> tuple[onnx.ModelProto, dict]:
    onnx.save(model, str(tmp / "m.onnx"))
    ranges = calibrate(tmp / "m.onnx", lambda: iter([{"x": x}]), "minmax").ranges
    return quantize(model, ranges.amax(), QuantizeOptions(target="tensorrt")), ranges.tensors


def by_hand(fp32: onnx.ModelProto, qdq: onnx.ModelProto, grids: dict[str, tuple[float, float]]) -> onnx.ModelProto:
    """``fp32`` with every Conv on its INT8 weights (as ``qdq`` holds them) and its input replaced by
    c + step * clip(round((x - c) / step), ±127): (c, step) from ``grids`` (tensor -> (c, step)) for
    the shifted inputs, (0, the input quantizer's scale) for the others."""
    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    q_inits, producer = inits(qdq), {o: n for n in qdq.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        dq = producer[next(n for n in qdq.graph.node if n.name == node.name).input[1]]
        scale = q_inits[dq.input[1]].reshape(-1, *[1] * (q_inits[dq.input[0]].ndim - 1))
        w = (q_inits[dq.input[0]].astype(np.float32) * scale).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(w, f"{node.name}_wq"))
        node.input[1] = f"{node.name}_wq"
        x_dq = producer[next(n for n in qdq.graph.node if n.name == node.name).input[0]]
        c, step = grids.get(node.input[0], (0.0, float(q_inits[x_dq.input[1]])))
        p = f"{node.name}_hand"
        model.graph.initializer.extend(
            numpy_helper.from_array(np.array(v, np.float32), f"{p}_{k}")
            for k, v in (("c", c), ("step", step), ("lo", -127.0), ("hi", 127.0))
        )
        model.graph.node.extend(
            [
                helper.make_node("Sub", [node.input[0], f"{p}_c"], [f"{p}_s"]),
                helper.make_node("Div", [f"{p}_s", f"{p}_step"], [f"{p}_d"]),
                helper.make_node("Round", [f"{p}_d"], [f"{p}_r"]),
                helper.make_node("Clip", [f"{p}_r", f"{p}_lo", f"{p}_hi"], [f"{p}_k"]),
                helper.make_node("Mul", [f"{p}_k", f"{p}_step"], [f"{p}_m"]),
                helper.make_node("Add", [f"{p}_m", f"{p}_c"], [f"{p}_x"]),
            ]
        )
        node.input[0] = f"{p}_x"
    from pipeline.graph.model import toposort

    toposort(model)
    return model


def test_shifted_convs_compute_the_finer_grid_exactly_and_halve_the_step(tmp_path: Path) -> None:
    fp32 = build("mobile_block")
    x = np.random.default_rng(0).normal(size=(32, 3, 6, 6)).astype(np.float32) * 2
    qdq, tensors = quantized(fp32, x, tmp_path)
    done = shift.shift_inputs(qdq, {k: (v.min, v.max) for k, v in tensors.items()})
    onnx.checker.check_model(qdq, full_check=True)
    # ReLU6 and Relu outputs (min 0) feed "dw" (padded) and "project"; the signed graph input is left alone
    assert sorted((d.node, d.tensor) for d in done) == [("dw", "e6"), ("project", "dr")]
    for d in done:
        lo, hi = 0.0, tensors[d.tensor].max  # minmax: amax = max |x| = max, the tensor never negative
        assert tensors[d.tensor].min == 0.0
        assert d.shift == pytest.approx(hi / 2, rel=1e-6) and d.amax == pytest.approx((hi - lo) / 2, rel=1e-6)
    ops = {n.name: n for n in qdq.graph.node}
    assert ops["dw_shift_pad"].op_type == "Pad" and "project_shift_pad" not in ops  # a 1x1 Conv does not pad
    assert [a.ints for a in ops["dw"].attribute if a.name == "pads"] == [[0, 0, 0, 0]]
    grids = {d.tensor: (d.shift, d.amax / 127) for d in done}
    np.testing.assert_allclose(run(qdq, x), run(by_hand(fp32, qdq, grids), x), rtol=1e-4, atol=1e-4)


def test_shift_lowers_the_error_and_reverts_to_the_fp32_layer(tmp_path: Path) -> None:
    fp32 = build("mobile_block")
    x = np.random.default_rng(1).normal(size=(64, 3, 6, 6)).astype(np.float32) * 2
    ref = run(fp32, x)
    plain, tensors = quantized(fp32, x, tmp_path)
    shifted, _ = quantized(fp32, x, tmp_path)
    shift.shift_inputs(shifted, {k: (v.min, v.max) for k, v in tensors.items()})

    def error(out: np.ndarray) -> float:
        return float(np.sqrt(((out - ref) ** 2).mean() / (ref**2).mean()))

    assert error(run(shifted, x)) < 0.75 * error(run(plain, x))
    # reverted, a shifted Conv takes its padding back and reads the float input
    all_float = recovery.revert(shifted, fp32, ["expand", "dw", "project"])
    np.testing.assert_allclose(run(all_float, x), ref, rtol=1e-4, atol=1e-4)
    assert [a.ints for a in next(n for n in all_float.graph.node if n.name == "dw").attribute if a.name == "pads"] == [
        [1, 1, 1, 1]
    ]


def test_bias_correction_measures_the_shifted_grid(tmp_path: Path) -> None:
    """After shift + bias correction the INT8 layer's mean output per channel is the FP32 layer's."""
    fp32 = build("depthwise_conv")
    x = np.random.default_rng(2).uniform(0.0, 2.0, size=(64, 4, 6, 6)).astype(np.float32)
    x[:, :, 0, 0] = 2.0
    qdq = quantize(fp32, {"x": 1.5}, QuantizeOptions(target="tensorrt"))  # clips: a shift to correct
    assert [d.shift for d in shift.shift_inputs(qdq, {"x": (0.0, 2.0)})] == [pytest.approx(0.75)]  # [0, 1.5]
    assert bias_correction.layers(fp32, qdq)[0].shift == pytest.approx(0.75)
    bias_correction.correct(fp32, qdq, [{"x": x}])

    def means(model: onnx.ModelProto) -> np.ndarray:
        return run(model, x).mean(axis=(0, 2, 3))

    np.testing.assert_allclose(means(qdq), means(fp32), atol=2e-4)


def test_what_is_left_alone(tmp_path: Path) -> None:
    fp32 = build("mobile_block")
    x = np.random.default_rng(3).normal(size=(16, 3, 6, 6)).astype(np.float32)
    qdq, tensors = quantized(fp32, x, tmp_path)
    observed = {k: (v.min, v.max) for k, v in tensors.items()}
    # a range that is nearly symmetric gains less than MIN_GAIN; an unknown range is never guessed
    assert shift.shift_inputs(qdq, {**observed, "e6": (-5.0, 6.0)}, min_gain=1.25)[0].node == "project"
    asym, _ = quantized(fp32, x, tmp_path)
    assert [d.node for d in shift.shift_inputs(asym, {"dr": observed["dr"]})] == ["project"]
    # asymmetric activations (zero point != 0) are not touched
    onnx.save(fp32, str(tmp_path / "m.onnx"))
    ranges = calibrate(tmp_path / "m.onnx", lambda: iter([{"x": x}]), "minmax").ranges
    u8 = quantize(fp32, ranges.amax(), QuantizeOptions(target="onnxruntime", activations="asymmetric"), observed)
    assert shift.shift_inputs(u8, observed) == []


@pytest.mark.slow
def test_pipeline_shifts_and_refuses_asymmetric(digits_copy: Path, tracking_uri: str, tmp_path: Path) -> None:
    import mlflow
    from mlflow import MlflowClient

    summary = tmp_path / "s.json"
    config = digits_copy / "pipeline.yaml"
    assert main([*run_args(config, tracking_uri, summary), "--set", "steps.quantize.shift_activations=true"]) == 0
    s = json.loads(summary.read_text())
    client = MlflowClient(tracking_uri)
    assert client.get_run(s["steps"]["quantize"]).data.metrics["shifted_inputs"] >= 2  # the residual bodies' Relus
    folder = Path(client.download_artifacts(s["steps"]["quantize"], "model", str(tmp_path)))
    onnx.checker.check_model(onnx.load(str(folder / "model_int8.onnx")), full_check=True)
    mlflow.set_tracking_uri(tracking_uri)
    registered = s["registered_model"]
    loaded = mlflow.onnx.load_model(f"models:/{registered['name']}/{registered['version']}")
    assert any(n.name == "/features/features.3/body/body.3/Conv_shift_sub" for n in loaded.graph.node)
    bad = ["--set", "steps.quantize.shift_activations=true", "--set", "steps.quantize.target=onnxruntime"]
    assert main([*run_args(config, tracking_uri, tmp_path / "t.json"), *bad]) == 2
