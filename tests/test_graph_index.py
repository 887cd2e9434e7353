"""GraphIndex against graphs whose producers and readers are known by construction, and against a
brute-force scan of a real Q/DQ model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.graph.graph_index import GraphIndex
from pipeline.transforms.quantization import QuantizeOptions, quantize
from tests.models import build

W = np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2)


def fork_and_double() -> onnx.ModelProto:
    """x -> Conv "conv" -> c; c -> Relu "relu" -> r and c -> Mul "side" -> s (an output);
    Add "double" reads r twice -> d -> Dropout "drop" (mask output left empty) -> y; an unnamed
    Reshape of s -> flat (an output)."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Mul", ["c", "k"], ["s"], name="side"),
        helper.make_node("Add", ["r", "r"], ["d"], name="double"),
        helper.make_node("Dropout", ["d"], ["y", ""], name="drop"),
        helper.make_node("Reshape", ["s", "shape"], ["flat"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 3, 3])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 2, 2, 2]),
            helper.make_tensor_value_info("flat", TensorProto.FLOAT, [1, 8]),
        ],
        [
            numpy_helper.from_array(W, "w"),
            numpy_helper.from_array(np.array(2.0, np.float32), "k"),
            numpy_helper.from_array(np.array([1, 8], np.int64), "shape"),
        ],
        value_info=[helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 2, 2, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def names(nodes: list[onnx.NodeProto]) -> list[str]:
    return [n.name for n in nodes]


def test_producers_and_readers_of_a_fork() -> None:
    index = GraphIndex(fork_and_double())
    assert index.producer("c").name == "conv"
    assert index.producer("y").name == "drop"
    assert index.producer("flat").op_type == "Reshape"
    # graph inputs, initializers, unknown names and the empty "no tensor" name have no producer
    assert [index.producer(t) for t in ("x", "w", "nope", "")] == [None] * 4
    assert names(index.consumers("c")) == ["relu", "side"]  # graph order
    assert names(index.consumers("r")) == ["double", "double"]  # once per input slot
    assert names(index.consumers("x")) == ["conv"] and names(index.consumers("k")) == ["side"]
    assert index.consumers("y") == [] and index.consumers("") == [] and index.consumers("nope") == []
    index.consumers("c").clear()  # a copy: the caller cannot edit the index
    assert names(index.consumers("c")) == ["relu", "side"]
    assert index.inputs == {"x"} and index.outputs == {"y", "s", "flat"}


def test_nodes_initializers_and_arrays() -> None:
    model = fork_and_double()
    index = GraphIndex(model.graph)  # a graph works as well as its model
    assert index.node("side").op_type == "Mul"
    assert index.node("") is None and index.node("nope") is None  # unnamed nodes (the Reshape) have no name to find
    assert list(index.initializer("w").dims) == [2, 1, 2, 2]
    assert index.initializer("c") is None and index.initializer("x") is None
    np.testing.assert_array_equal(index.array("w"), W)
    assert index.array("w") is index.array("w")  # decoded once
    with pytest.raises(ValueError):
        index.array("w")[0, 0, 0, 0] = 5.0  # shared between callers: read-only
    with pytest.raises(KeyError):
        index.array("c")
    assert "w" in index.arrays and "c" not in index.arrays and sorted(index.arrays) == ["k", "shape", "w"]
    assert index.arrays.get("c") is None and float(index.arrays["k"]) == 2.0


def test_value_types_as_declared() -> None:
    index = GraphIndex(fork_and_double())
    assert index.value_type("x") == TensorProto.FLOAT  # graph input
    assert index.value_type("c") == TensorProto.FLOAT  # value_info
    assert index.value_type("flat") == TensorProto.FLOAT  # graph output
    assert index.value_type("shape") == TensorProto.INT64  # initializer
    assert index.value_type("r") is None  # computed but declared nowhere: no shape inference here


def test_a_snapshot_until_rebuilt() -> None:
    model = fork_and_double()
    index = GraphIndex(model)
    model.graph.node.append(helper.make_node("Neg", ["c"], ["n"], name="late"))
    model.graph.initializer.append(numpy_helper.from_array(np.ones(1, np.float32), "late_init"))
    assert names(index.consumers("c")) == ["relu", "side"] and index.producer("n") is None
    assert index.initializer("late_init") is None
    fresh = GraphIndex(model)
    assert names(fresh.consumers("c")) == ["relu", "side", "late"]
    assert fresh.producer("n").name == "late"
    assert "late_init" in fresh.arrays


def test_agrees_with_a_scan_of_a_qdq_model() -> None:
    """Every tensor of a real Q/DQ model: the producer is the one node listing it as an output, the
    readers exactly the input slots naming it, and the Conv's weight chain reads as ORT wrote it."""
    fp32 = build("mobile_block")
    amax = {t: 4.0 for t in ("x", "e", "e6", "d", "dr")}
    qdq = quantize(fp32, amax, QuantizeOptions(target="tensorrt"))
    index = GraphIndex(qdq)
    tensors = {t for n in qdq.graph.node for t in [*n.input, *n.output] if t}
    for t in tensors:
        made = [n for n in qdq.graph.node if t in n.output]
        assert index.producer(t) is (made[0] if made else None)
        assert index.consumers(t) == [n for n in qdq.graph.node for i in n.input if i == t]
    conv = index.node("dw")
    assert conv is not None
    dq_w = index.producer(conv.input[1])
    assert dq_w is not None and dq_w.op_type == "DequantizeLinear"
    assert index.initializer(dq_w.input[0]).data_type == TensorProto.INT8
    dq_x = index.producer(conv.input[0])
    q_x = index.producer(dq_x.input[0])
    assert q_x is not None and q_x.op_type == "QuantizeLinear"
    assert names(index.consumers(q_x.output[0])) == [dq_x.name]
