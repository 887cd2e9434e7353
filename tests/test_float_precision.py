"""FP16/BF16 float regions and FP8 Q/DQ against answers computed independently in numpy.

TensorRT 11 runs each layer in the type its ONNX tensors carry, so these rewrites decide what runs.
Every model is checked by the full ONNX checker and run by ONNX Runtime's CPU provider (through
int8pipe's session, which rounds through FP16/BF16 where ORT has no kernel)."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.errors import ModelError
from pipeline.execution import runtime
from pipeline.graph import emulation
from pipeline.graph.model import subgraph_inputs, tensor_types, toposort
from pipeline.transforms import float_precision, fp8
from pipeline.transforms.quantization import QuantizeOptions, node_table, quantize
from tests.models import build


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return runtime.run(runtime.session(model.SerializeToString(), optimize=False), feeds)


def half(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).astype(np.float32)


def e4m3(a: np.ndarray) -> np.ndarray:
    return np.clip(a, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)


@pytest.mark.parametrize("name", ["conv_relu_gemm", "mobile_block", "tiny_detector", "tiny_attention"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_lowered_model_is_valid_keeps_fp32_io_and_computes_close(name: str, precision: str) -> None:
    fp32 = build(name)
    lowered = float_precision.lower(fp32, precision)
    onnx.checker.check_model(lowered.model, full_check=True)
    assert [i.type.tensor_type.elem_type for i in lowered.model.graph.output] == [TensorProto.FLOAT] * len(
        fp32.graph.output
    )
    types = tensor_types(lowered.model)
    narrow = float_precision.PRECISIONS[precision]
    assert lowered.low_nodes, "nothing was lowered"
    by_name = {n.name: n for n in lowered.model.graph.node}
    for node in lowered.low_nodes:
        assert types[by_name[node].output[0]] == narrow, node
    rng = np.random.default_rng(0)
    feeds = {}
    for i in fp32.graph.input:
        dims = [d.dim_value or 2 for d in i.type.tensor_type.shape.dim]
        feeds[i.name] = (
            rng.integers(0, 20, dims).astype(np.int64)
            if i.type.tensor_type.elem_type == TensorProto.INT64
            else rng.normal(size=dims).astype(np.float32)
        )
    want, got = run(fp32, feeds), run(lowered.model, feeds)
    tolerance = 1e-2 if precision == "fp16" else 5e-2  # 11 and 8 significant bits
    for a, b in zip(want, got):
        assert b.dtype == np.float32
        assert np.max(np.abs(a - b)) <= tolerance * (np.max(np.abs(a)) + 1e-6)


def test_fp16_conv_equals_rounding_its_inputs_and_output() -> None:
    """A Conv in FP16 with FP32 accumulation: the FP32 Conv of FP16-rounded input and weights, rounded."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(2, 3, 3, 3)).astype(np.float32)
    x = rng.normal(size=(1, 3, 5, 5)).astype(np.float32) * 3
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    graph = helper.make_graph(
        [conv], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    got = run(float_precision.lower_float_regions(model, "fp16"), {"x": x})[0]
    xs, ws = half(x)[0], half(w)
    want = np.zeros((2, 3, 3), np.float64)
    for o in range(2):
        for i in range(3):
            for j in range(3):
                want[o, i, j] = np.sum(xs[:, i : i + 3, j : j + 3].astype(np.float64) * ws[o])
    assert np.allclose(got[0], half(want.astype(np.float32)), rtol=1e-3, atol=1e-3)


def test_statistics_and_epsilon_stay_fp32_with_the_reason() -> None:
    lowered = float_precision.lower(build("layernorm_by_hand"), "fp16")
    kept = lowered.kept_fp32
    assert set(kept) == {"mean", "variance", "add_eps"}
    assert "reduction" in kept["mean"] and "below FP16's normal range" in kept["add_eps"]
    assert {"fc", "center", "square", "std", "normalize"} <= set(lowered.low_nodes)
    x = np.random.default_rng(1).normal(size=(2, 4, 8)).astype(np.float32)
    want, got = run(build("layernorm_by_hand"), {"x": x})[0], run(lowered.model, {"x": x})[0]
    assert np.max(np.abs(want - got)) < 1e-2
    # BF16 has FP32's exponents: the epsilon fits; reductions stay FP32 by rule
    assert "add_eps" not in float_precision.lower(build("layernorm_by_hand"), "bf16").kept_fp32


def test_activation_beyond_fp16_keeps_its_writer_and_readers_fp32() -> None:
    limit = float_precision.FP16_MAX / float_precision.FP16_HEADROOM
    lowered = float_precision.lower(build("conv_relu_gemm"), "fp16", {"conv": 2 * limit, "x": 1.0})
    assert set(lowered.kept_fp32) == {"conv", "relu"}  # conv writes it, relu reads it
    assert "conv reached" in lowered.kept_fp32["relu"]
    assert float_precision.lower(build("conv_relu_gemm"), "fp16", {"conv": limit / 2}).kept_fp32 == {}


def test_keep_fp32_record_relowers_the_same_way() -> None:
    first = float_precision.lower(build("conv_relu_gemm"), "fp16", {"conv": 1e6})
    again = float_precision.lower(build("conv_relu_gemm"), "fp16", keep_fp32=first.kept_fp32)
    assert again.kept_fp32 == first.kept_fp32 and again.low_nodes == first.low_nodes


def qdq_model(name: str, amax: dict[str, float]) -> onnx.ModelProto:
    fp32 = build(name)
    return quantize(fp32, amax, QuantizeOptions(target="tensorrt"), None)


def test_dequantize_outputs_its_scale_type_and_quantize_reads_its_own() -> None:
    lowered = float_precision.lower_float_regions(qdq_model("conv_relu_gemm", {"x": 3.0, "flat": 4.0}), "fp16")
    onnx.checker.check_model(lowered, full_check=True)
    types = tensor_types(lowered)
    types.update({i.name: i.data_type for i in lowered.graph.initializer})
    qdq = [n for n in lowered.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for n in qdq:
        side = n.output[0] if n.op_type == "DequantizeLinear" else n.input[0]
        assert types[n.input[1]] == types[side], n.name
    conv = next(n for n in lowered.graph.node if n.name == "conv")
    assert {types[t] for t in conv.input} == {TensorProto.FLOAT16}  # DQ feeds it FP16 directly, no Cast


def test_fp8_scales_are_amax_over_448_and_the_output_matches_numpy() -> None:
    """single_matmul: y = fq(x) @ fq(W), fq the E4M3 fake quantizer; per output column for W."""
    source = build("single_matmul")
    model = qdq_model("single_matmul", {"x": 2.0})
    assert fp8.to_fp8(model, source) == 2  # the input's Q/DQ pair and the weight's DQ
    toposort(model)
    onnx.checker.check_model(model, full_check=True)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    assert inits[q.input[1]] == np.float32(2.0 / 448)
    zp = next(i for i in model.graph.initializer if i.name == q.input[2])
    assert zp.data_type == TensorProto.FLOAT8E4M3FN
    w = numpy_helper.to_array(next(i for i in source.graph.initializer if i.name == "w"))
    wdq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits)
    axis = next(a.i for a in wdq.attribute if a.name == "axis")
    w_scale = np.abs(w).max(axis=1 - axis) / 448
    assert np.allclose(inits[wdq.input[1]], w_scale)
    x = np.random.default_rng(2).normal(size=(16, 4)).astype(np.float32) * 1.5
    sx = np.float32(2.0 / 448)
    shape = (-1, 1) if axis == 0 else (1, -1)
    w_fq = e4m3(w / w_scale.reshape(shape)) * w_scale.reshape(shape)
    want = (e4m3(x / sx) * sx) @ w_fq
    assert np.allclose(run(model, {"x": x})[0], want, rtol=1e-5, atol=1e-5)


def test_fp8_with_fp16_regions_differs_from_fp32_regions_by_fp16_rounding_only() -> None:
    source = build("conv_relu_gemm")
    model = qdq_model("conv_relu_gemm", {"x": 3.0, "flat": 4.0})
    fp8.to_fp8(model, source)
    lowered = float_precision.lower_float_regions(model, "fp16")
    onnx.checker.check_model(lowered, full_check=True)
    x = np.random.default_rng(4).normal(size=(8, 2, 4, 4)).astype(np.float32)
    want, got = run(model, {"x": x})[0], run(lowered, {"x": x})[0]
    assert 0 < np.max(np.abs(want - got)) < 2e-2 * np.max(np.abs(want))


def test_cpu_sessions_round_through_the_narrow_type_where_ort_would_not() -> None:
    """ORT's CPU provider runs an FP16 Conv by casting around it and drops the Cast pairs between nodes;
    int8pipe's sessions run a twin with explicit roundings, so FP16 storage shows in the numbers."""
    model = float_precision.lower_float_regions(build("relu_chain"), "fp16")
    twin, count = emulation.emulated(model)
    assert count >= 1 and not emulation.has_narrow_floats(build("relu_chain"))
    assert emulation.has_narrow_floats(model)
    types = tensor_types(twin)
    for node in twin.graph.node:
        if node.op_type != "Cast":
            assert all(types.get(t) != TensorProto.FLOAT16 for t in [*node.input, *node.output] if t), node.name
    # BF16 Conv has no CPU kernel at all: it runs, and every value it writes is a BF16 value
    bf16 = float_precision.lower_float_regions(build("conv_relu_gemm"), "bf16")
    x = np.random.default_rng(5).normal(size=(2, 2, 4, 4)).astype(np.float32)
    y = run(bf16, {"x": x})[0]
    assert np.array_equal(y, y.astype(ml_dtypes.bfloat16).astype(np.float32))
    broken = build("conv_relu_gemm")
    broken.graph.node[0].input[1] = "missing_weight"
    with pytest.raises(ModelError, match="cannot load the model"):
        runtime.session(broken.SerializeToString(), optimize=False)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_a_session_of_a_model_proto_computes_what_its_bytes_and_file_do(precision: str, tmp_path: Path) -> None:
    """runtime.session reads a ModelProto's types as they are (the proto itself, not a parsed copy, decides
    whether the rounding twin runs): the same numbers as from the bytes or the file, whose FP16/BF16
    roundings show (the FP16 case differs from the FP32 model)."""
    fp32 = build("conv_relu_gemm")
    model = float_precision.lower_float_regions(fp32, precision)
    assert (runtime.narrow_model(model) is model) == (precision != "fp32")  # no parse, no copy
    onnx.save(model, str(tmp_path / "m.onnx"))
    x = np.random.default_rng(9).normal(size=(3, 2, 4, 4)).astype(np.float32)
    got = [runtime.run(runtime.session(m, optimize=False), {"x": x})[0]
           for m in (model, model.SerializeToString(), tmp_path / "m.onnx")]  # fmt: skip
    assert np.array_equal(got[0], got[1]) and np.array_equal(got[0], got[2])
    if precision != "fp32":
        assert not np.array_equal(got[0], run(fp32, {"x": x})[0])
        narrow = np.float16 if precision == "fp16" else ml_dtypes.bfloat16
        assert np.array_equal(got[0], got[0].astype(narrow).astype(np.float32))  # the output rounded, as Y is


def test_overflowing_fp16_tensor_is_named() -> None:
    lowered = float_precision.lower_float_regions(build("conv_relu_gemm"), "fp16")
    x = np.full((1, 2, 4, 4), 30000.0, np.float32)  # the 3x3 sums pass 65504
    assert "conv" in float_precision.nonfinite_tensors(lowered, {"x": x})
    assert float_precision.nonfinite_tensors(lowered, {"x": x / 1e4}) == []


def test_a_tensor_an_if_body_reads_keeps_its_type() -> None:
    """if_branches behind a Relu "pre": the If's bodies read its output; lowering the Relu would retype
    what the bodies were typed against."""
    model = build("if_branches")
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                for inner in attr.g.node:
                    inner.input[:] = ["xr" if t == "x" else t for t in inner.input]
    model.graph.node.insert(0, helper.make_node("Relu", ["x"], ["xr"], name="pre"))
    assert "xr" in set().union(*(subgraph_inputs(n) for n in model.graph.node))
    lowered = float_precision.lower(model, "fp16")
    onnx.checker.check_model(lowered.model, full_check=True)
    assert "If/Loop/Scan body" in lowered.kept_fp32["pre"]
    x = np.random.default_rng(6).normal(size=(3, 4)).astype(np.float32)
    assert np.allclose(run(model, {"x": x})[0], run(lowered.model, {"x": x})[0], atol=1e-2)


@pytest.mark.parametrize(("precision", "version"), [("fp16", 19), ("bf16", 22)])
def test_a_model_the_version_converter_refuses_is_a_model_error(precision: str, version: int) -> None:
    """conv_bn_training_outputs runs in ONNX Runtime at opset 13, and ONNX's version converter has no way
    past 14 for its BatchNormalization: the user reads both opsets, the converter's reason and the ways out."""
    model = build("conv_bn_training_outputs")
    x = np.random.default_rng(8).normal(size=(2, 3, 8, 8)).astype(np.float32)
    assert run(model, {"x": x})[0].shape == (2, 4, 8, 8)
    with pytest.raises(ModelError) as caught:
        float_precision.lower(model, precision)
    message = str(caught.value)
    assert f"float regions (steps.quantize.float_precision: {precision}) need ONNX opset {version}," in message
    assert f"from opset 13 to {version}: BatchNormalization outputs 4 and 5 are not supported in Opset 14." in message
    assert "float_precision: fp32" in message and f"opset {version} or later" in message
    assert "Assertion" not in message and ".h:" not in message  # the converter's C++ location is not the user's
    assert model == build("conv_bn_training_outputs")  # lower() works on a copy


def test_fp8_on_a_model_the_version_converter_refuses_names_int8_as_the_way_out() -> None:
    qdq = qdq_model("conv_bn_training_outputs", {"x": 4.0})
    with pytest.raises(ModelError, match=r"FP8 Q/DQ \(steps.quantize.precision: fp8\) need ONNX opset 19.*"
                                         r"from opset 13 to 19.*precision: int8"):  # fmt: skip
        fp8.to_fp8(qdq, build("conv_bn_training_outputs"))


def test_weight_channels_scaled_below_fp16_normal_keep_their_conv_int8() -> None:
    """EfficientNet-Lite2's dead channels (INT8 scales of 1e-10) and a Shape reading the quantized input
    once kept DQs FP32 behind a Cast, and TensorRT runs a Conv behind a Cast in FP16, not INT8."""
    fp32 = build("conv_quiet_channels")
    qdq = quantize(fp32, {"x": 3.0}, QuantizeOptions(target="tensorrt"), None)
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    w_dq = next(n for n in qdq.graph.node if n.output[0] == "w_DequantizeLinear_Output")
    q, s = inits[w_dq.input[0]].astype(np.float32), inits[w_dq.input[1]]
    assert s[1] < 1e-9 and float_precision.FP16_NORMAL / 4 < s[2] < float_precision.FP16_NORMAL
    assert any(n.op_type == "Shape" and n.input[0] == "x_DequantizeLinear_Output" for n in qdq.graph.node)

    lowered = float_precision.lower_float_regions(qdq, "fp16")
    onnx.checker.check_model(lowered, full_check=True)
    outputs = {o.name for o in lowered.graph.output}
    assert not [n.name for n in lowered.graph.node if n.op_type == "Cast" and n.output[0] not in outputs]
    assert {r["node"]: r["precision"] for r in node_table(fp32, lowered)}["conv"] == "int8"
    producers = {o: n for n in lowered.graph.node for o in n.output}
    conv = next(n for n in lowered.graph.node if n.name == "conv")
    dq = producers[conv.input[1]]
    lowered_inits = {i.name: i for i in lowered.graph.initializer}
    assert lowered_inits[dq.input[1]].data_type == TensorProto.FLOAT16
    q2 = numpy_helper.to_array(lowered_inits[dq.input[0]]).astype(np.float32)
    s2 = numpy_helper.to_array(lowered_inits[dq.input[1]]).astype(np.float32)
    assert np.all(s2[[1, 2]] >= s[[1, 2]]) and np.all(s2 > 0)  # the two tiny channels' rounded up: nothing clips
    # every dequantized weight moves by at most half its new scale; normal channels keep q exactly
    moved = np.abs(q2 * s2[:, None, None, None] - q * s[:, None, None, None])
    assert np.all(moved <= s2[:, None, None, None] / 2 + 1e-12)
    assert np.array_equal(q2[[0, 3]], q[[0, 3]]) and np.array_equal(q2[2] != 0, q[2] != 0)
    # and the model computes what the FP32-region Q/DQ model does, to FP16's rounding
    x = np.random.default_rng(5).normal(size=(3, 2, 4, 4)).astype(np.float32)
    want, got = run(qdq, {"x": x})[0], run(lowered, {"x": x})[0]
    assert got.shape == (3, 64) and np.max(np.abs(want - got)) <= 1e-2 * np.max(np.abs(want))
