"""Per-channel scales for depthwise Conv inputs: exact in float, and in INT8 the per-channel quantization
of the input computed independently in numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from pipeline.calibration.calibrator import calibrate
from pipeline.execution import runtime
from pipeline.transforms import depthwise_scales, recipe
from pipeline.transforms.quantization import QuantizeOptions
from tests.models import build


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return runtime.run(runtime.session(model.SerializeToString(), optimize=False), {"x": x})


def samples(n: int = 64, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 6, 6)).astype(np.float32)


def hidden(x: np.ndarray) -> np.ndarray:
    """The depthwise Conv's input h, from the FP32 model."""
    from pipeline.calibration.collect import expose

    return runtime.run(runtime.session(expose(build("hardswish_depthwise"), ["h"])), {"x": x})[0]


def test_only_computed_inputs_of_depthwise_convs_are_candidates() -> None:
    (item,) = depthwise_scales.candidates(build("hardswish_depthwise"))
    assert (item.tensor, [c.node.name for c in item.consumers], item.channels) == ("h", ["dw"], 4)
    assert [i.tensor for i in depthwise_scales.candidates(build("mobile_block"))] == ["e6"]
    assert depthwise_scales.candidates(build("depthwise_conv")) == []  # reads the graph input
    assert depthwise_scales.candidates(build("hardswish_depthwise"), skip=["dw"]) == []  # kept float
    grouped = build("hardswish_depthwise")  # two input channels per filter: channels mix
    dw = next(n for n in grouped.graph.node if n.name == "dw")
    next(a for a in dw.attribute if a.name == "group").i = 2
    w = next(i for i in grouped.graph.initializer if i.name == "w2")
    w.CopyFrom(numpy_helper.from_array(np.ones((4, 2, 3, 3), np.float32), "w2"))
    assert depthwise_scales.candidates(grouped) == []
    assert depthwise_scales.candidates(build("dilated_grouped_conv")) == []


def test_scaling_is_exact_in_float_and_divides_each_channel_by_its_max(tmp_path: Path) -> None:
    fp32, x = build("hardswish_depthwise"), samples()
    batches = lambda: iter([{"x": x[:40]}, {"x": x[40:]}])  # noqa: E731
    scaled, ranges = depthwise_scales.scale_and_calibrate(fp32, batches, [], 64, "minmax", 99.99, 512)
    onnx.checker.check_model(scaled, full_check=True)
    (tensor,) = ranges
    assert tensor == "h" + depthwise_scales.SUFFIX
    mul = next(n for n in scaled.graph.node if n.op_type == "Mul")
    factors = numpy_helper.to_array(next(i for i in scaled.graph.initializer if i.name == mul.input[1])).ravel()
    channel_max = np.abs(hidden(x)).max(axis=(0, 2, 3))
    np.testing.assert_allclose(factors, 1.0 / channel_max, rtol=1e-6)
    assert channel_max.max() / channel_max.min() > 20  # the spread the test model is built to have
    # every channel of the divided tensor reaches 1: its minmax threshold
    assert ranges[tensor].amax == pytest.approx(1.0, rel=1e-6)
    # the second reader of h still reads h; the outputs are the FP32 model's
    assert next(n for n in scaled.graph.node if n.name == "pool").input[0] == "h"
    for a, b in zip(run(scaled, x), run(fp32, x)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def depthwise_reference(h: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """3x3 depthwise convolution with padding 1, in numpy."""
    padded = np.pad(h, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros_like(h, dtype=np.float64)
    for i in range(3):
        for j in range(3):
            out += padded[:, :, i : i + h.shape[2], j : j + h.shape[3]] * w[None, :, 0, i, j, None, None]
    return out + b[None, :, None, None]


def per_channel_int8(a: np.ndarray, amax: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * a.ndim
    shape[axis] = -1
    scale = (amax / 127.0).reshape(shape)
    return np.clip(np.round(a / scale), -127, 127) * scale


def test_the_depthwise_conv_computes_with_per_channel_input_scales(tmp_path: Path) -> None:
    """Known answer: with minmax thresholds (and the stem kept float, so h is the FP32 h) the INT8 model's
    output is the depthwise convolution of h quantized with one scale per channel (max |h[c]| / 127) and
    the weights with one per filter, computed here without the model. Without the scales the quietest
    channel is left a level or two."""
    fp32, x = build("hardswish_depthwise"), samples()
    onnx.save(fp32, str(tmp_path / "m.onnx"))
    batches = lambda: iter([{"x": x}])  # noqa: E731
    ranges = calibrate(tmp_path / "m.onnx", batches, "minmax").ranges

    def int8(on: bool) -> np.ndarray:
        r = recipe.Recipe(
            quantize=QuantizeOptions(target="tensorrt", exclude_nodes=("stem",)), depthwise_scales=on,
            bias_correction=False, shift_activations=False,
        )  # fmt: skip
        done = recipe.quantize_static(fp32, ranges, r, recipe.Samples(batches))
        onnx.checker.check_model(done.model, full_check=True)
        assert done.counts.get("depthwise_scaled_inputs", 0) == int(on)
        return run(done.model, x)[0]

    weights = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    w2, b2 = weights["w2"], weights["b2"]
    h = hidden(x)
    h_q = per_channel_int8(h, np.abs(h).max(axis=(0, 2, 3)), 1)
    w_q = per_channel_int8(w2, np.abs(w2).max(axis=(1, 2, 3)), 0)
    expected = depthwise_reference(h_q, w_q, b2)
    got = int8(True)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    ref = depthwise_reference(h, w2, b2)
    quiet = int(np.argmin(np.abs(h).max(axis=(0, 2, 3))))
    error = lambda y: float(np.abs(y - ref)[:, quiet].mean() / np.abs(ref[:, quiet]).mean())  # noqa: E731
    assert error(got) < error(int8(False)) / 5, (error(got), error(int8(False)))


@pytest.mark.slow
def test_the_quantize_step_scales_depthwise_inputs_by_default(tmp_path: Path, tracking_uri: str) -> None:
    """No option set: the step scales the depthwise input, says so in its metric and auto tag, writes the
    float model it was built from, and the validated INT8 model beats the one with depthwise_scales off."""
    import mlflow
    import yaml

    from tests.conftest import run_pipeline

    onnx.save(build("hardswish_depthwise"), str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "cal.npz", x=samples(48, 6))
    np.savez(tmp_path / "val.npz", x=samples(32, 7))
    steps = {"export": {}, "calibrate": {"method": "minmax"}, "quantize": {},
             "validate": {"metric": "cosine", "max_drop": 0.5}}  # fmt: skip
    data = {"calibration": {"npz": "cal.npz"}, "validation": {"npz": "val.npz"}}
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"name": "dw", "model": {"onnx": "model.onnx"}, "data": data, "steps": steps}))
    client = mlflow.MlflowClient(tracking_uri)
    on = run_pipeline(config, tracking_uri, tmp_path)
    run = client.get_run(on["steps"]["quantize"])
    assert run.data.metrics["depthwise_scaled_inputs"] == 1
    assert "depthwise_scales=on" in run.data.tags["int8pipe.auto_choices"]
    path = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="model/model_float.onnx", dst_path=str(tmp_path),
        tracking_uri=tracking_uri,
    )  # fmt: skip
    assert any(n.name.endswith(depthwise_scales.SUFFIX + "_mul") for n in onnx.load(path).graph.node)
    off = run_pipeline(config, tracking_uri, tmp_path, "steps.quantize.depthwise_scales=false")
    assert "depthwise_scaled_inputs" not in client.get_run(off["steps"]["quantize"]).data.metrics
    cosine = lambda s: client.get_run(s["steps"]["validate"]).data.metrics["int8_cosine"]  # noqa: E731
    assert cosine(on) > cosine(off)


def test_depthwise_scales_need_per_channel_weights() -> None:
    from pipeline.errors import ConfigError
    from pipeline.orchestration.runner import load_config as load
    from steps.quantize import QuantizeConfig

    digits = Path(__file__).parent.parent / "examples" / "digits" / "pipeline.yaml"
    with pytest.raises(ConfigError, match=r"depthwise_scales: .*per_channel is false\. Set per_channel: true"):
        load(digits, ["steps.quantize.per_channel=false", "steps.quantize.depthwise_scales=true"])
    # auto follows the weights: off with one weight scale per tensor, or without calibration samples
    assert QuantizeConfig(per_channel=False).for_graph("convolutional").depthwise_scales is False
    assert QuantizeConfig().for_graph("convolutional", has_samples=False).depthwise_scales is False
    assert QuantizeConfig().for_graph("convolutional").depthwise_scales is True
    # on ORT's CPU kernels the Mul splits the fused chain (EfficientNet-Lite0: 2.4 -> 4.1 ms) for no accuracy
    assert QuantizeConfig(target="onnxruntime").for_graph("convolutional").depthwise_scales is False
    assert QuantizeConfig(target="onnxruntime", depthwise_scales=True).for_graph("convolutional").depthwise_scales


def test_with_fp16_float_layers_the_scales_stay_tensorrt_clean(tmp_path: Path) -> None:
    """TensorRT 11 runs the Mul in the type the model writes: FP16 here, with the depthwise Conv still
    INT8, nothing the strongly typed lint objects to, and the output within FP16's rounding of the
    FP32-regions model's."""
    from pipeline.analysis.strongly_typed import lint
    from pipeline.transforms.quantization import node_table

    fp32, x = build("hardswish_depthwise"), samples()
    onnx.save(fp32, str(tmp_path / "m.onnx"))
    batches = lambda: iter([{"x": x}])  # noqa: E731
    ranges = calibrate(tmp_path / "m.onnx", batches, "mse").ranges
    r = recipe.Recipe(quantize=QuantizeOptions(target="tensorrt"), depthwise_scales=True, float_precision="fp16")
    done = recipe.quantize_static(fp32, ranges, r, recipe.Samples(batches))
    assert done.fp32_regions is not None
    onnx.checker.check_model(done.model, full_check=True)
    assert lint(done.model) == []
    assert {row["node"]: row["precision"] for row in node_table(fp32, done.model)}["dw"] == "int8"
    (mul,) = [n for n in done.model.graph.node if n.name.endswith(depthwise_scales.SUFFIX + "_mul")]
    assert mul.name in done.regions.low_nodes  # type: ignore[union-attr]
    low, high = run(done.model, x)[0], run(done.fp32_regions, x)[0]
    np.testing.assert_allclose(low, high, atol=0.02 * np.abs(high).max())


def test_recovery_reverts_a_scaled_depthwise_conv_to_its_float_model(tmp_path: Path) -> None:
    """Recovery reverts on the float model the Q/DQ one was built from (model/model_float.onnx): the
    reverted depthwise Conv reads the divided tensor with the multiplied weights, which is exact; reverting
    every quantized node gives the FP32 outputs back."""
    from pipeline.analysis import recovery

    fp32, x = build("hardswish_depthwise"), samples()
    onnx.save(fp32, str(tmp_path / "m.onnx"))
    batches = lambda: iter([{"x": x}])  # noqa: E731
    ranges = calibrate(tmp_path / "m.onnx", batches, "mse").ranges
    r = recipe.Recipe(quantize=QuantizeOptions(target="tensorrt"), depthwise_scales=True)
    done = recipe.quantize_static(fp32, ranges, r, recipe.Samples(batches))
    assert done.float_model is not None
    ref = run(fp32, x)[0]
    error = lambda m: float(np.abs(run(m, x)[0] - ref).mean())  # noqa: E731
    one = recovery.revert(done.model, done.float_model, ["dw"])
    onnx.checker.check_model(one, full_check=True)
    assert error(one) < error(done.model)
    every = recovery.revert(done.model, done.float_model, ["stem", "dw"])
    np.testing.assert_allclose(run(every, x)[0], ref, rtol=1e-4, atol=1e-4)


def _conv1d_depthwise() -> onnx.ModelProto:
    """x[N,2,16] -> 1x1 Conv1d "mix" (4 ch, spread 0.05..5) -> Relu -> 5-tap depthwise Conv1d "dw" (pad 2)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(9)
    w1 = rng.normal(size=(4, 2, 1)).astype(np.float32) * np.array([0.05, 0.5, 1.0, 5.0], np.float32)[:, None, None]
    w2 = rng.normal(size=(4, 1, 5)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["m"], name="mix"),
        helper.make_node("Relu", ["m"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="dw", group=4, pads=[2, 2]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 16])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize(
    ("case", "target"), [("conv1d", "tensorrt"), ("hardswish", "onnxruntime")], ids=["conv1d-tensorrt", "asym-ort"]
)
def test_other_ranks_and_asymmetric_activations(
    tmp_path: Path, case: str, target: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A 1-D depthwise Conv (rank-3 factors): a checked model whose depthwise input is the divided tensor,
    closer to FP32 than without. An explicit ``true`` with ORT's asymmetric uint8 activations: built and
    checked too, with a warning, since [-1, 1] per channel leaves the zero point nothing to fit (no gain)."""
    if case == "conv1d":
        fp32, x = _conv1d_depthwise(), np.random.default_rng(3).normal(size=(64, 2, 16)).astype(np.float32)
    else:
        fp32, x = build("hardswish_depthwise"), samples()
    onnx.save(fp32, str(tmp_path / "m.onnx"))
    batches = lambda: iter([{"x": x[:32]}, {"x": x[32:]}])  # noqa: E731
    ranges = calibrate(tmp_path / "m.onnx", batches, "mse").ranges
    activations = "asymmetric" if target == "onnxruntime" else "symmetric"
    opts = QuantizeOptions(target=target, activations=activations)
    ref = runtime.run(runtime.session(fp32.SerializeToString()), {"x": x})[0]

    def error(on: bool) -> float:
        r = recipe.Recipe(quantize=opts, depthwise_scales=on, shift_activations=False)
        done = recipe.quantize_static(fp32, ranges, r, recipe.Samples(batches))
        onnx.checker.check_model(done.model, full_check=True)
        dw = next(n for n in done.model.graph.node if n.name == "dw")
        made_by = {o: n for n in done.model.graph.node for o in n.output}
        quantized = made_by[made_by[dw.input[0]].input[0]].input[0]  # DequantizeLinear <- QuantizeLinear <- this
        assert quantized.endswith(depthwise_scales.SUFFIX) == on
        y = runtime.run(runtime.session(done.model.SerializeToString(), optimize=False), {"x": x})[0]
        return float(np.abs(y - ref).mean())

    with caplog.at_level("WARNING", logger="int8pipe"):
        scaled = error(True)
    if target == "onnxruntime":
        assert "depthwise_scales with asymmetric activations" in caplog.text
    else:
        assert scaled < error(False) and not [r for r in caplog.records if r.levelname == "WARNING"]


def test_without_calibration_samples_the_scales_are_skipped_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Ranges from a TensorRT cache (``from_cache``) come without samples: nothing to measure the channels
    on, so an explicit ``true`` is skipped with a warning and the model is the unscaled one."""
    fp32, x = build("hardswish_depthwise"), samples()
    onnx.save(fp32, str(tmp_path / "m.onnx"))
    ranges = calibrate(tmp_path / "m.onnx", lambda: iter([{"x": x}]), "minmax").ranges
    r = recipe.Recipe(quantize=QuantizeOptions(target="tensorrt"), depthwise_scales=True, bias_correction=False)
    with caplog.at_level("WARNING", logger="int8pipe"):
        done = recipe.quantize_static(fp32, ranges, r, recipe.Samples())
    assert "no per-channel depthwise input scales (it needs data.calibration samples)" in caplog.text
    assert "depthwise_scaled_inputs" not in done.counts and done.float_model is None
    onnx.checker.check_model(done.model, full_check=True)
    assert not any(n.name.endswith(depthwise_scales.SUFFIX + "_mul") for n in done.model.graph.node)
