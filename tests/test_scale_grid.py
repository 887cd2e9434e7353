"""Q/DQ scales put on the FP16/BF16 grid before the shift and bias correction fold terms into biases."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.calibration.calibrator import calibrate
from pipeline.execution import runtime
from pipeline.graph.model import toposort
from pipeline.transforms import recipe, scale_grid
from pipeline.transforms.quantization import QuantizeOptions, quantize
from tests.models import build


def test_grid_values_known_by_hand() -> None:
    tiny = np.array([1e-10, 2.0**-24, 3.0, 1.0 + 2.0**-12], np.float32)
    assert scale_grid.on_grid(tiny, "fp16", up=True).tolist() == [2.0**-24, 2.0**-24, 3.0, 1.0 + 2.0**-10]
    assert scale_grid.on_grid(tiny, "fp16", up=False).tolist() == [2.0**-24, 2.0**-24, 3.0, 1.0]
    # BF16 keeps 7 fraction bits: 1 + 2^-8 is a tie that goes to the even 1.0; up goes to 1 + 2^-7
    b = np.array([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-9, 1.0 + 2.0**-20], np.float32)
    assert scale_grid.on_grid(b, "bf16", up=False).tolist() == [1.0, 1.0 + 2.0**-7, 1.0]
    assert scale_grid.on_grid(b, "bf16", up=True).tolist() == [1.0 + 2.0**-7] * 3


def test_refit_moves_each_weight_by_at_most_half_the_new_scale() -> None:
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, size=(3, 4)).astype(np.int8)
    s = np.array([1e-7, 0.01, 3e-5], np.float32)
    up = scale_grid.on_grid(s, "fp16", up=True)
    q2 = scale_grid.refit(q, s, up, axis=0)
    moved = np.abs(q2 * up[:, None].astype(np.float64) - q * s[:, None].astype(np.float64))
    assert np.all(moved <= up[:, None] / 2 + 1e-15) and np.all(np.abs(q2) <= np.abs(q))
    assert np.array_equal(q2[1], q[1])  # a normal-range scale moves by < 2^-11: no value changes


def test_fitted_scales_are_exact_in_the_narrow_type_and_keep_shared_pairs_equal() -> None:
    qdq = quantize(build("conv_quiet_channels"), {"x": 3.0}, QuantizeOptions(target="tensorrt"), None)
    before = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    for precision, dtype in (("fp16", np.float16), ("bf16", ml_dtypes.bfloat16)):
        model = onnx.ModelProto()
        model.CopyFrom(qdq)
        assert scale_grid.fit_scales(model, precision) == 2  # the weight's and the input's (shared by Q and DQ)
        toposort(model)  # ORT's quantizer appends its Q/DQ nodes at the end
        onnx.checker.check_model(model, full_check=True)
        after = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        for name in ("x_scale", "w_scale"):
            assert np.array_equal(after[name].astype(dtype).astype(np.float32), after[name])
        # channels FP16 holds move to the nearest value and keep their INT8 values; the two below its
        # normal range (1e-9 and 1e-3 weights) move up and are refitted
        tiny = before["w_scale"] < 2.0**-14 if precision == "fp16" else np.zeros(4, bool)
        assert tiny.sum() == (2 if precision == "fp16" else 0)
        assert np.all(after["w_scale"][tiny] >= before["w_scale"][tiny])
        assert np.array_equal(after["w_quantized"][~tiny], before["w_quantized"][~tiny])
        ulp = 2.0**-10 if precision == "fp16" else 2.0**-7  # relative, at the bottom of a binade
        assert np.all(np.abs(after["w_scale"] - before["w_scale"])[~tiny] <= ulp / 2 * before["w_scale"][~tiny])
        assert np.array_equal(after["b"], before["b"])  # not a Q/DQ scale


def test_an_activation_scale_below_fp16_normal_range_is_left_for_the_fp32_rewrite() -> None:
    """FP16's nearest value to 7.9e-8 is 6.0e-8 (24% lower: inputs near the threshold would clip), and the
    float-regions rewrite keeps that quantizer FP32 anyway."""
    qdq = quantize(build("conv_relu_gemm"), {"x": 1e-5, "flat": 4.0}, QuantizeOptions(target="tensorrt"), None)
    before = next(numpy_helper.to_array(i) for i in qdq.graph.initializer if i.name == "x_scale")
    scale_grid.fit_scales(qdq, "fp16")
    assert np.array_equal(next(numpy_helper.to_array(i) for i in qdq.graph.initializer if i.name == "x_scale"), before)


def shifted_sparse_conv(tmp: Path) -> tuple[onnx.ModelProto, np.ndarray, recipe.Ranges]:
    """A 1x1 Conv over 256 mostly-zero ReLU6-like channels: its input is shifted by c ≈ 3, so the bias
    absorbs c·ΣW ≈ 3 * 256 * 0.5 while the output stays near 0, as in EfficientNet-Lite2's projections."""
    rng = np.random.default_rng(4)
    w = (0.5 + 0.05 * rng.normal(size=(8, 256, 1, 1))).astype(np.float32)
    conv = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="project")
    graph = helper.make_graph(
        [conv], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 256, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(8, np.float32), "b")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # the observed range is [-0.28, hi] (a HardSwish's), hi chosen so that the shifted input's scale
    # ((hi + 0.28) / 2 / 127) is about as far from an FP16 value as a scale can be
    lo, hi = -0.28, 5.86206
    x = (hi * rng.random((64, 256, 2, 2)) * (rng.random((64, 256, 2, 2)) < 0.01)).astype(np.float32)
    x[0, :, 0, 0], x[1, :, 0, 0] = hi, lo
    onnx.save(model, str(tmp / "m.onnx"))
    ranges = calibrate(tmp / "m.onnx", lambda: iter([{"x": x}]), "minmax").ranges
    return model, x, ranges


def test_fp16_model_computes_the_fp32_regions_arithmetic_in_fp16_storage(tmp_path: Path) -> None:
    """The shifted Conv's bias (~384) balances conv(x - c). With every scale on FP16's grid before the
    shift, the FP16 model is the FP32-regions model stored in FP16: computed here in numpy from the
    FP32-regions model's parameters, rounding each stored tensor to FP16. Scales rounded after the fold
    would leave up to 2^-12 * 384 uncancelled, and this reference would not match."""
    fp32, x, ranges = shifted_sparse_conv(tmp_path)
    opts = recipe.Recipe(
        quantize=QuantizeOptions(), shift_activations=True, bias_correction=False, float_precision="fp16"
    )
    done = recipe.quantize_static(fp32, ranges, opts, recipe.Samples(lambda: iter([{"x": x}])))
    assert done.counts["shifted_inputs"] == 1 and done.counts["fp16_grid_scales"] == 3  # x, w, then x - c
    assert done.fp32_regions is not None
    inits = {i.name: numpy_helper.to_array(i) for i in done.fp32_regions.graph.initializer}
    nodes = {n.name: n for n in done.fp32_regions.graph.node}
    conv, sub = nodes["project"], nodes["project_shift_sub"]
    q_x = next(n for n in done.fp32_regions.graph.node if n.op_type == "QuantizeLinear")
    w_dq = next(n for n in done.fp32_regions.graph.node if n.output[0] == conv.input[1])
    c, s_x, bias = inits[sub.input[1]], inits[q_x.input[1]], inits[conv.input[2]]
    assert np.abs(bias).max() > 300
    assert c.astype(np.float16).astype(np.float32) == c  # the Sub subtracts what the bias pays back
    # every scale, the shift's new one included, is an FP16 value: TensorRT applies s_x * s_w to the INT32
    # sum of the shifted Conv (~384 here), where any rounding of them after the fold would show in full
    scales = {n.input[1] for n in done.fp32_regions.graph.node if n.op_type.endswith("QuantizeLinear")}
    for name in scales:
        assert np.array_equal(inits[name].astype(np.float16).astype(np.float32), inits[name]), name

    def half(a: np.ndarray) -> np.ndarray:
        return np.asarray(a, np.float32).astype(np.float16).astype(np.float64)

    shifted = half(half(x) - half(c))
    x_dq = half(np.clip(np.round(shifted / s_x), -127, 127) * s_x)
    w = half(inits[w_dq.input[0]][:, :, 0, 0] * inits[w_dq.input[1]][:, None])
    want = half(np.einsum("nchw,oc->nohw", x_dq, w) + half(bias)[None, :, None, None])
    got = runtime.run(runtime.session(done.model.SerializeToString(), optimize=False), {"x": x})[0]
    # one FP16 step of the output (the order of a 256-term sum differs from numpy's)
    assert np.max(np.abs(got - want) / np.maximum(np.abs(want), 1.0)) <= 2.0**-10


def test_a_grid_is_fp16_or_bf16_only() -> None:
    with pytest.raises(ValueError, match="no grid for 'fp8'"):
        scale_grid.on_grid(np.array([0.5], np.float32), "fp8", up=False)
    qdq = quantize(build("conv_relu_gemm"), {"x": 3.0, "flat": 4.0}, QuantizeOptions(target="tensorrt"), None)
    assert scale_grid.fit_scales(qdq, "fp32") == 0  # FP32 regions: nothing to fit
