"""Initializers the export's ORT pass creates get names of their own: MatMulAddFusion names the
Reshape shapes it adds for a MatMul+Add on 3-D inputs itself, and ORT generates the same names again
when it fuses the INT8 model at load time; on all-MiniLM-L6-v2 that model then failed to load with
optimisations on ("Attempt to replace the existing tensor"; this small block does not collide, so
the test checks the naming and that the INT8 model loads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.calibration.calibrator import calibrate
from pipeline.execution import runtime
from pipeline.graph.model import toposort
from pipeline.transforms.quantization import QuantizeOptions, quantize, quantized_activations
from steps.export import GENERATED_PREFIX, ExportConfig, prepare


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
