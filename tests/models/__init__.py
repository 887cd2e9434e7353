"""A registry of tiny ONNX models built in code, each small enough to reason about by hand.

from tests.models import build
model = build("conv_relu_gemm")
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REGISTRY: dict[str, Callable[[], onnx.ModelProto]] = {}


def register(fn: Callable[[], onnx.ModelProto]) -> Callable[[], onnx.ModelProto]:
    REGISTRY[fn.__name__] = fn
    return fn


def build(name: str) -> onnx.ModelProto:
    return REGISTRY[name]()


def _model(nodes: list, inputs: list, outputs: list, inits: list, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _t(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


@register
def conv_relu_gemm() -> onnx.ModelProto:
    """x[N,2,4,4] -> Conv(3 ch, 3x3, pad 1, bias) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(4)."""
    rng = np.random.default_rng(7)
    w = rng.normal(size=(3, 2, 3, 3)).astype(np.float32) * np.array([1.0, 0.1, 3.0], np.float32)[:, None, None, None]
    b = rng.normal(size=3).astype(np.float32)
    fc = rng.normal(size=(4, 3)).astype(np.float32)
    fb = rng.normal(size=4).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("GlobalAveragePool", ["relu"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc", "fb"], ["y"], name="fc", transB=1),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in [(w, "w"), (b, "b"), (fc, "fc"), (fb, "fb")]]
    return _model(nodes, [_t("x", ["batch", 2, 4, 4])], [_t("y", ["batch", 4])], inits)


@register
def conv_bn() -> onnx.ModelProto:
    """x[N,1,5,5] -> Conv(2 ch, no bias) -> BatchNormalization -> y: the folding case."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(2, 1, 3, 3)).astype(np.float32)
    scale, bias = np.array([2.0, 0.5], np.float32), np.array([0.1, -0.2], np.float32)
    mean, var = np.array([0.3, -0.1], np.float32), np.array([1.5, 0.7], np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["y"], name="bn"),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in [(w, "w"), (scale, "s"), (bias, "bb"), (mean, "m"), (var, "v")]]
    return _model(nodes, [_t("x", [1, 1, 5, 5])], [_t("y", [1, 2, 3, 3])], inits)


@register
def matmul_two_inputs() -> onnx.ModelProto:
    """a[N,3], b[N,3] -> Add -> MatMul(W[3,2]) -> y: a model with two inputs."""
    w = np.arange(6, dtype=np.float32).reshape(3, 2) / 6.0
    nodes = [
        helper.make_node("Add", ["a", "b"], ["s"], name="add"),
        helper.make_node("MatMul", ["s", "w"], ["y"], name="mm"),
    ]
    return _model(
        nodes,
        [_t("a", ["batch", 3]), _t("b", ["batch", 3])],
        [_t("y", ["batch", 2])],
        [numpy_helper.from_array(w, "w")],
    )


@register
def clip_chain() -> onnx.ModelProto:
    """x[N,2,4,4] -> Conv -> Clip(0, 6) -> Relu -> Flatten -> Gemm(3) -> y, plus Clip(x, 0, lo) with lo = -Gemm.

    The Clip/Relu/Flatten chain has ranges that follow from the Conv's; the second Clip's upper bound
    is computed at run time, so its range must be measured. Conv weights are large enough that the
    Clip(0, 6) really clips.
    """
    rng = np.random.default_rng(11)
    w = rng.normal(size=(3, 2, 3, 3)).astype(np.float32) * 2.0
    fc = rng.normal(size=(3, 48)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["conv", "zero", "six"], ["relu6"], name="relu6"),
        helper.make_node("Relu", ["relu6"], ["relu"], name="relu"),
        helper.make_node("Flatten", ["relu"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc"], ["y"], name="fc", transB=1),
        helper.make_node("ReduceMax", ["y"], ["top"], name="top", keepdims=0),
        helper.make_node("Clip", ["x", "zero", "top"], ["clipped"], name="runtime_clip"),
    ]
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(fc, "fc"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(6.0, np.float32), "six"),
    ]
    outputs = [_t("y", ["batch", 3]), _t("clipped", ["batch", 2, 4, 4])]
    return _model(nodes, [_t("x", ["batch", 2, 4, 4])], outputs, inits)
