"""A streaming model's data: a two-layer recurrent cell whose state is [2, batch, 8] (samples on
axis 1) and whose sample rate ``sr`` is one scalar for every sample. See streaming.yaml.

    python examples/data_sources/streaming.py      # writes streaming/model.onnx and the .npz files
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HIDDEN = 8
FEATURES = 16
SAMPLE_RATE = 0.5


def build_model(seed: int = 0) -> onnx.ModelProto:
    """x [B, 16], state [2, B, 8], sr [] -> y [B, 8], state_out [2, B, 8]; tanh layers fed by MatMuls."""
    rng = np.random.default_rng(seed)

    def weight(name: str, rows: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal((rows, HIDDEN)) / np.sqrt(rows)).astype(np.float32), name)

    inits = [
        weight("w0", FEATURES),
        weight("u0", HIDDEN),
        weight("w1", HIDDEN),
        weight("u1", HIDDEN),
        weight("wo", HIDDEN),
        numpy_helper.from_array(np.array(0, np.int64), "i0"),
        numpy_helper.from_array(np.array(1, np.int64), "i1"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
    ]
    nodes = [
        helper.make_node("Gather", ["state", "i0"], ["h0"], axis=0),
        helper.make_node("Gather", ["state", "i1"], ["h1"], axis=0),
        helper.make_node("Mul", ["x", "sr"], ["xs"]),
        helper.make_node("MatMul", ["xs", "w0"], ["a0"]),
        helper.make_node("MatMul", ["h0", "u0"], ["b0"]),
        helper.make_node("Add", ["a0", "b0"], ["c0"]),
        helper.make_node("Tanh", ["c0"], ["n0"]),
        helper.make_node("MatMul", ["n0", "w1"], ["a1"]),
        helper.make_node("MatMul", ["h1", "u1"], ["b1"]),
        helper.make_node("Add", ["a1", "b1"], ["c1"]),
        helper.make_node("Tanh", ["c1"], ["n1"]),
        helper.make_node("MatMul", ["n1", "wo"], ["y"]),
        helper.make_node("Unsqueeze", ["n0", "axis0"], ["s0"]),
        helper.make_node("Unsqueeze", ["n1", "axis0"], ["s1"]),
        helper.make_node("Concat", ["s0", "s1"], ["state_out"], axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        "streaming_cell",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", FEATURES]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "B", HIDDEN]),
            helper.make_tensor_value_info("sr", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", HIDDEN]),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, "B", HIDDEN]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def make_data(n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` samples in the model's own layout: the state's samples on axis 1, ``sr`` one scalar."""
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((n, FEATURES)).astype(np.float32),
        "state": np.tanh(rng.standard_normal((2, n, HIDDEN))).astype(np.float32),
        "sr": np.float32(SAMPLE_RATE),
    }


def write(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(build_model(), str(folder / "model.onnx"))
    np.savez(folder / "calibration.npz", **make_data(64, seed=1))  # type: ignore[arg-type]
    np.savez(folder / "validation.npz", **make_data(48, seed=2))  # type: ignore[arg-type]


if __name__ == "__main__":
    write(Path(__file__).parent / "streaming")
