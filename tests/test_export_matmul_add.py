"""The export's ORT pass and MatMul + Add.

Initializers the export's ORT pass creates get names of their own: MatMulAddFusion names the
Reshape shapes it adds for a MatMul+Add on 3-D inputs itself, and ORT generates the same names again
when it fuses the INT8 model at load time; on all-MiniLM-L6-v2 that model then failed to load with
optimisations on ("Attempt to replace the existing tensor"; this small block does not collide, so
the test checks the naming and that the INT8 model loads).

A MatMul + Add whose addend is an activation (a streaming model's state) stays apart: fused into a
Gemm, the addend passes for a bias, the Gemm stays float and such a model had nothing to quantize.

A source model at an opset ONNX's version converter cannot raise to per-channel Q/DQ's is a ModelError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from pipeline.calibration.calibrator import calibrate
from pipeline.errors import ModelError
from pipeline.execution import runtime
from pipeline.graph.layout import Layout
from pipeline.graph.model import toposort
from pipeline.transforms.quantization import QuantizeOptions, quantize, quantized_activations
from steps.export import GENERATED_PREFIX, ExportConfig, prepare
from tests.conftest import run_pipeline


def encoder_block() -> onnx.ModelProto:
    """Three projections of one [1, 4, 8] input (as attention's q, k, v) combined, then a feed-forward
    projection: four MatMul+Add on 3-D tensors, static shapes (an export with dynamic_batch: false)."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    for k in ("q", "k", "v", "f"):
        inits += [numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), f"w{k}"),
                  numpy_helper.from_array(rng.normal(size=8).astype(np.float32), f"b{k}")]  # fmt: skip
        src = "s" if k == "f" else "x"
        nodes += [helper.make_node("MatMul", [src, f"w{k}"], [f"m{k}"], name=f"mm_{k}"),
                  helper.make_node("Add", [f"m{k}", f"b{k}"], [f"a{k}"], name=f"add_{k}")]  # fmt: skip
        if k == "v":
            nodes += [helper.make_node("Mul", ["aq", "ak"], ["qk"], name="mul"),
                      helper.make_node("Add", ["qk", "av"], ["s"], name="sum")]  # fmt: skip
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
        [helper.make_tensor_value_info("af", TensorProto.FLOAT, [1, 4, 8])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_initializers_the_export_creates_are_renamed_and_the_int8_model_loads_optimised(tmp_path: Path) -> None:
    path = tmp_path / "fp32.onnx"
    source = encoder_block()
    fp32 = prepare(encoder_block(), ExportConfig(dynamic_batch=False), None, path, "block")
    ops = [n.op_type for n in fp32.graph.node]
    assert ops.count("Gemm") >= 1  # the fusion ran (a Gemm gets bias correction)
    original = {i.name for i in source.graph.initializer}
    created = [i.name for i in fp32.graph.initializer if i.name not in original]
    assert created and all(name.startswith(GENERATED_PREFIX) for name in created)
    x = np.random.default_rng(1).normal(size=(16, 1, 4, 8)).astype(np.float32)
    quantized = quantized_activations(fp32, "tensorrt")
    cal = calibrate(path, lambda: ({"x": b} for b in x), "mse", histogram_tensors=quantized)
    int8 = quantize(fp32, cal.ranges.amax(), QuantizeOptions(target="tensorrt"))
    toposort(int8)
    onnx.checker.check_model(int8, full_check=True)
    out = {}
    for optimize in (False, True):  # exact arithmetic, and ORT's fused kernels (MatMulAddFusion at load)
        sess = runtime.session(int8.SerializeToString(), "cpu", optimize=optimize)
        out[optimize] = runtime.run(sess, {"x": x[0]})[0]
    np.testing.assert_allclose(out[True], out[False], rtol=1e-3, atol=1e-3)


STREAMING = Layout({"state": 1}, frozenset({"sr"}))


def streaming_add() -> onnx.ModelProto:
    """The stateful shape of the issue: ``(x @ W + ReduceSum(state, axis 0)) * Cast(sr)`` with x [B, 16],
    a state [2, B, 8] whose samples are on axis 1, and an int64 scalar sample rate ``sr``."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32), "W")
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes0")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"], name="proj"),
        helper.make_node("ReduceSum", ["state", "axes0"], ["s"], keepdims=0, name="reduce"),
        helper.make_node("Add", ["s", "m"], ["h"], name="add_state"),  # the activation first: order is kept
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Mul", ["h", "srf"], ["y"], name="scale"),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 16]),
        helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "B", 8]),
        helper.make_tensor_value_info("sr", TensorProto.INT64, []),
    ]
    graph = helper.make_graph(
        nodes, "stream", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 8])], [w, axes]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _streaming_data(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(n, 16)).astype(np.float32),
        "state": rng.normal(size=(2, n, 8)).astype(np.float32),
        "sr": np.array(2, np.int64),
    }


def test_a_matmul_plus_an_activation_stays_apart_and_its_matmul_is_quantized(tmp_path: Path) -> None:
    path = tmp_path / "fp32.onnx"
    fp32 = prepare(streaming_add(), ExportConfig(), STREAMING, path, "stream")
    nodes = {n.name: (n.op_type, list(n.input), list(n.output)) for n in fp32.graph.node}
    assert "Gemm" not in {op for op, _, _ in nodes.values()}  # was Gemm(x, W, s): s an activation, not a bias
    assert nodes["proj"] == ("MatMul", ["x", "W"], ["m"]) and nodes["add_state"] == ("Add", ["s", "m"], ["h"])
    feeds = _streaming_data(4, 1)
    before = runtime.run(runtime.session(streaming_add().SerializeToString(), "cpu"), feeds)[0]
    np.testing.assert_allclose(runtime.run(runtime.session(path, "cpu"), feeds)[0], before, rtol=1e-6)
    batches = _streaming_data(32, 2)
    cal = calibrate(path, lambda: [batches], "minmax", layout=STREAMING)
    int8 = quantize(fp32, cal.ranges.amax(), QuantizeOptions(target="tensorrt"))
    feeding = {o: n for n in int8.graph.node for o in n.output}
    matmul = next(n for n in int8.graph.node if n.op_type == "MatMul")
    assert [feeding[i].op_type for i in matmul.input] == ["DequantizeLinear", "DequantizeLinear"]


@pytest.mark.slow
def test_a_streaming_model_with_a_state_addend_quantizes(tmp_path: Path, tracking_uri: str) -> None:
    """Through the pipeline, batch_axes and constants declared: before, the export fused MatMul + Add
    into a Gemm and quantize stopped ("no node of the model runs in INT8 ... Cast, Gemm, Mul, ReduceSum")."""
    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save(streaming_add(), str(folder / "model.onnx"))
    np.savez(folder / "cal.npz", **_streaming_data(64, 3))
    np.savez(folder / "val.npz", **_streaming_data(48, 4))
    layout = {"batch_axes": {"state": 1}, "constants": ["sr"]}
    config = {
        "name": "streaming-add",
        "model": {"onnx": "model.onnx"},
        "data": {"calibration": {"npz": "cal.npz", **layout}, "validation": {"npz": "val.npz", **layout}},
        "steps": {"export": {}, "calibrate": {}, "quantize": {}, "validate": {"metric": "cosine", "max_drop": 0.01}},
    }
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(config))
    s = run_pipeline(folder / "pipeline.yaml", tracking_uri, tmp_path)
    assert s["gate"] == "passed" and s["metrics"]["int8_nodes"] >= 1 and s["metrics"]["int8_cosine"] > 0.999


def test_two_matmuls_added_stay_two_matmuls_and_an_add(tmp_path: Path) -> None:
    """A recurrent cell's ``x @ W + h @ U``: ORT fuses one MatMul with the Add, the other MatMul's output
    as the addend; split back, each MatMul keeps its own output (the model stays in SSA form)."""
    rng = np.random.default_rng(3)
    w, u = (numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), n) for n in ("W", "U"))
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"], name="mx"),
        helper.make_node("MatMul", ["h", "U"], ["b"], name="mh"),
        helper.make_node("Add", ["a", "b"], ["c"], name="sum"),
    ]
    graph = helper.make_graph(
        nodes, "cell", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", 8]) for n in ("x", "h")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["B", 8])], [w, u],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    fp32 = prepare(model, ExportConfig(), None, tmp_path / "cell.onnx", "cell")  # checked: SSA, types
    assert sorted((n.op_type, n.name, tuple(n.output)) for n in fp32.graph.node) == [
        ("Add", "sum", ("c",)), ("MatMul", "mh", ("b",)), ("MatMul", "mx", ("a",)),
    ]  # fmt: skip


def test_an_old_opset_the_version_converter_refuses_is_a_model_error(tmp_path: Path) -> None:
    """A Scan of opset 8 with sequence lengths (valid, and ONNX Runtime runs it) has no conversion to
    opset 9: export says so and how to export instead of the converter's traceback."""
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "xi"], ["s_out"]), helper.make_node("Identity", ["s_out"], ["yi"])],
        "body",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in ("s_in", "xi")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in ("s_out", "yi")],
    )
    graph = helper.make_graph(
        [helper.make_node("Scan", ["lens", "s0", "x"], ["s", "y"], body=body, num_scan_inputs=1, name="scan")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4])],
        [numpy_helper.from_array(np.array([3], np.int64), "lens"),
         numpy_helper.from_array(np.zeros((1, 4), np.float32), "s0")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    onnx.checker.check_model(model, full_check=True)
    x = np.ones((1, 3, 4), np.float32)
    assert runtime.run(runtime.session(model.SerializeToString()), {"x": x})[0].tolist() == [[3.0] * 4]
    with pytest.raises(ModelError) as caught:
        prepare(model, ExportConfig(), None, tmp_path / "scan.onnx", "scan")
    message = str(caught.value)
    assert "need ONNX opset 17, and ONNX's version converter cannot bring this model from opset 8 to 17" in message
    assert "Unsupported conversion to opset 9" in message and "opset 13 or later" in message
