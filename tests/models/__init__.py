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
def conv_bn_training_outputs() -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(4 ch, 3x3, pad 1) -> BatchNormalization with its five outputs -> y, opset 13.

    A BatchNormalization exported in training mode writes its running and saved statistics too
    (unread here). ONNX Runtime runs it; ONNX's version converter cannot take it past opset 13
    (opset 14 dropped those outputs), so nothing that needs opset 19 can be written from it."""
    rng = np.random.default_rng(13)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    stats = [(np.ones(4), "s"), (np.zeros(4), "bb"), (np.zeros(4), "m"), (np.ones(4), "v")]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["y", "rm", "rv", "sm", "sv"], name="bn"),
    ]
    inits = [numpy_helper.from_array(w, "w"), *(numpy_helper.from_array(a.astype(np.float32), n) for a, n in stats)]
    return _model(nodes, [_t("x", ["batch", 3, 8, 8])], [_t("y", ["batch", 4, 8, 8])], inits, opset=13)


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


@register
def shared_input_convs() -> onnx.ModelProto:
    """x[N,2,4,4] -> Conv a (3 ch) -> a, and x -> Conv b (4 ch, bias) -> b: two convs share their input.

    Excluding one of them must leave it reading the float x while its sibling reads DQ(Q(x)).
    """
    rng = np.random.default_rng(5)
    wa = rng.normal(size=(3, 2, 3, 3)).astype(np.float32)
    wb = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
    bb = rng.normal(size=4).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "wb", "bb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
    ]
    inits = [numpy_helper.from_array(v, n) for v, n in [(wa, "wa"), (wb, "wb"), (bb, "bb")]]
    outputs = [_t("a", ["batch", 3, 4, 4]), _t("b", ["batch", 4, 4, 4])]
    return _model(nodes, [_t("x", ["batch", 2, 4, 4])], outputs, inits)


@register
def shared_weight_convs() -> onnx.ModelProto:
    """x[N,2,4,4] -> Conv a and Conv b, both with the same weight initializer w: excluding b must give
    it the float w back although the quantized model only stores w as INT8 for a."""
    w = np.random.default_rng(6).normal(size=(3, 2, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "w"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
    ]
    outputs = [_t("a", ["batch", 3, 4, 4]), _t("b", ["batch", 3, 4, 4])]
    return _model(nodes, [_t("x", ["batch", 2, 4, 4])], outputs, [numpy_helper.from_array(w, "w")])


@register
def dynamic_hw_conv() -> onnx.ModelProto:
    """x[N,3,h,w] -> Conv(4 ch, 3x3, pad 1) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(2): any image size."""
    rng = np.random.default_rng(12)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    b = rng.normal(size=4).astype(np.float32)
    fc = rng.normal(size=(2, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("GlobalAveragePool", ["relu"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc"], ["y"], name="fc", transB=1),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in [(w, "w"), (b, "b"), (fc, "fc")]]
    return _model(nodes, [_t("x", ["batch", 3, "h", "w"])], [_t("y", ["batch", 2])], inits)


@register
def single_matmul() -> onnx.ModelProto:
    """x[N,4] -> MatMul(W[4,3]) -> y: the only tensor calibration histograms is the graph input."""
    w = (np.arange(12, dtype=np.float32).reshape(4, 3) - 6.0) / 6.0
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    return _model(nodes, [_t("x", ["batch", 4])], [_t("y", ["batch", 3])], [numpy_helper.from_array(w, "w")])


@register
def int32_gemm_classifier() -> onnx.ModelProto:
    """ids int32[N,8] -> Gather(embedding[16,6]) -> ReduceMean over positions -> Gemm(5, bias [1,5]) -> y.

    A file-type classifier in miniature. The [1, 5] bias is what ONNX Runtime's basic optimiser (the
    export step) makes of MatMul + Add when the Add's bias is [1, 5].
    """
    rng = np.random.default_rng(13)
    emb = rng.normal(size=(16, 6)).astype(np.float32)
    fc = rng.normal(size=(6, 5)).astype(np.float32)
    fb = rng.normal(size=(1, 5)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
        helper.make_node("ReduceMean", ["e"], ["pooled"], name="pool", axes=[1], keepdims=0),
        helper.make_node("Gemm", ["pooled", "fc", "fb"], ["y"], name="fc"),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in [(emb, "emb"), (fc, "fc"), (fb, "fb")]]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT32, ["batch", 8])
    return _model(nodes, [ids], [_t("y", ["batch", 5])], inits)


@register
def gather_shape_matmul() -> onnx.ModelProto:
    """ids int64[N,4] -> Gather(embedding[10,6]) -> Reshape to [N, 24] via Shape/Gather/Unsqueeze/Concat
    (int64 shape path) -> MatMul(W[24,3]) -> y: integer tensors that are never quantized."""
    rng = np.random.default_rng(14)
    emb = rng.normal(size=(10, 6)).astype(np.float32)
    w = rng.normal(size=(24, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
        helper.make_node("Shape", ["e"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "zero"], ["n"], name="batch_dim", axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"], name="unsqueeze"),
        helper.make_node("Concat", ["n1", "minus_one"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["e", "target"], ["flat"], name="reshape"),
        helper.make_node("MatMul", ["flat", "w"], ["y"], name="mm"),
    ]
    inits = [
        numpy_helper.from_array(emb, "emb"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array([0], np.int64), "axes"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
    ]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4])
    return _model(nodes, [ids], [_t("y", ["batch", 3])], inits)


@register
def relu_chain() -> onnx.ModelProto:
    """x[N,3] -> ten Relus in a row (relu0 ... relu9, outputs a0 ... a8, then y)."""
    nodes = [
        helper.make_node("Relu", ["x" if i == 0 else f"a{i - 1}"], ["y" if i == 9 else f"a{i}"], name=f"relu{i}")
        for i in range(10)
    ]
    return _model(nodes, [_t("x", ["batch", 3])], [_t("y", ["batch", 3])], [])


@register
def if_branches() -> onnx.ModelProto:
    """x[N,4] -> If(mean(x) > 0): then MatMul(W) -> Relu -> MatMul(V), else MatMul(V2) -> y.

    The main graph holds 3 nodes (ReduceMean, Greater, If); the computation sits in the branches.
    """
    rng = np.random.default_rng(15)
    w = rng.normal(size=(4, 4)).astype(np.float32)
    v = rng.normal(size=(4, 2)).astype(np.float32)
    v2 = rng.normal(size=(4, 2)).astype(np.float32)
    then_branch = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="then_mm1"),
            helper.make_node("Relu", ["h"], ["r"], name="then_relu"),
            helper.make_node("MatMul", ["r", "v"], ["then_y"], name="then_mm2"),
        ],
        "then",
        [],
        [_t("then_y", ["batch", 2])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "v2"], ["else_y"], name="else_mm")], "else", [], [_t("else_y", ["batch", 2])]
    )
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], name="mean", keepdims=0),
        helper.make_node("Greater", ["m", "zero"], ["c"], name="positive"),
        helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_branch, else_branch=else_branch),
    ]
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(v, "v"),
        numpy_helper.from_array(v2, "v2"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    return _model(nodes, [_t("x", ["batch", 4])], [_t("y", ["batch", 2])], inits)


@register
def tiny_detector() -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(8, 3x3) -> Relu -> Conv(6, 1x1) -> Sigmoid -> Reshape -> det [N, 6, 64], a
    YOLO-style output (cx, cy, w, h and 2 class scores per anchor); and Relu -> GlobalAveragePool ->
    Flatten -> feat [N, 8]. Two outputs, neither first one class scores."""
    rng = np.random.default_rng(13)
    w1 = rng.normal(size=(8, 3, 3, 3)).astype(np.float32) * 0.5
    b1 = rng.normal(size=8).astype(np.float32) * 0.1
    w2 = rng.normal(size=(6, 8, 1, 1)).astype(np.float32) * 0.5
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="head"),
        helper.make_node("Sigmoid", ["c2"], ["s"], name="sigmoid"),
        helper.make_node("Reshape", ["s", "shape"], ["det"], name="reshape"),
        helper.make_node("GlobalAveragePool", ["r1"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["feat"], name="flatten"),
    ]
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(b1, "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(np.array([0, 6, -1], np.int64), "shape"),
    ]
    outputs = [_t("det", ["batch", 6, 64]), _t("feat", ["batch", 8])]
    return _model(nodes, [_t("x", ["batch", 3, 8, 8])], outputs, inits)


@register
def outlier_mlp() -> onnx.ModelProto:
    """x[N,8] -> MatMul "fc1" -> Add (channel 0 += 1000) -> MatMul "fc2" -> Relu -> MatMul "fc3" -> y[N,10].

    fc2's input has one huge outlier channel (which fc2's weights ignore): per-tensor symmetric INT8
    over max |x| ~ 1000 rounds every other channel (|x| ~ 1) to zero, so fc2 alone breaks the model
    under INT8 (minmax calibration); fc1 and fc3 quantize harmlessly. Keeping fc2 in float recovers it.
    """
    rng = np.random.default_rng(21)
    w1 = rng.normal(size=(8, 16)).astype(np.float32) * 0.35
    offset = np.zeros(16, np.float32)
    offset[0] = 1000.0
    w2 = rng.normal(size=(16, 16)).astype(np.float32) * 0.5
    w2[0] = 0.0  # the outlier channel carries nothing
    w3 = rng.normal(size=(16, 10)).astype(np.float32) * 0.5
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        helper.make_node("Add", ["h1", "offset"], ["h2"], name="outlier"),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"], name="fc2"),
        helper.make_node("Relu", ["h3"], ["h4"], name="relu"),
        helper.make_node("MatMul", ["h4", "w3"], ["y"], name="fc3"),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in [(w1, "w1"), (offset, "offset"), (w2, "w2"), (w3, "w3")]]
    return _model(nodes, [_t("x", ["batch", 8])], [_t("y", ["batch", 10])], inits)


@register
def depthwise_conv() -> onnx.ModelProto:
    """x[N,4,6,6] -> depthwise Conv(3x3, group 4, no padding, bias) -> y[N,4,4,4].

    Each channel's kernel has one large weight, so max |w| / 127 rounds the other eight coarsely:
    the mean output shift that bias correction removes. Without padding the shift is exactly linear
    in the per-channel input mean.
    """
    rng = np.random.default_rng(31)
    w = rng.normal(size=(4, 1, 3, 3)).astype(np.float32) * 0.1
    w[:, 0, 1, 1] = 5.0
    b = rng.normal(size=4).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="dw", group=4, kernel_shape=[3, 3])]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    return _model(nodes, [_t("x", ["batch", 4, 6, 6])], [_t("y", ["batch", 4, 4, 4])], inits)


@register
def grouped_conv_no_bias() -> onnx.ModelProto:
    """x[N,4,5,5] -> Conv(6 ch, 2 groups, 1x1, no bias) -> y: a bias must be added to correct it."""
    rng = np.random.default_rng(32)
    w = rng.normal(size=(6, 2, 1, 1)).astype(np.float32) * 0.1
    w[:, 0] = 3.0
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="pw", group=2)]
    inits = [numpy_helper.from_array(w, "w")]
    return _model(nodes, [_t("x", ["batch", 4, 5, 5])], [_t("y", ["batch", 6, 5, 5])], inits)


@register
def gemm_alpha_beta() -> onnx.ModelProto:
    """x[N,8] -> Gemm(W [8, 5] not transposed, alpha 0.5, beta 2, C [1, 5]) -> y[N,5]."""
    rng = np.random.default_rng(33)
    w = rng.normal(size=(8, 5)).astype(np.float32) * 0.1
    w[0] = 4.0
    c = rng.normal(size=(1, 5)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", alpha=0.5, beta=2.0)]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(c, "c")]
    return _model(nodes, [_t("x", ["batch", 8])], [_t("y", ["batch", 5])], inits)


@register
def tiny_attention() -> onnx.ModelProto:
    """ids int64[N,5] -> Gather(embedding[20,8]) -> one self-attention head -> mean over tokens -> y[N,8].

    Weight MatMuls "wq", "wk", "wv", "wo"; activation x activation MatMuls "scores" (Q·Kᵀ) and
    "context" (P·V); the embedding table is the largest constant.
    """
    rng = np.random.default_rng(41)
    emb = rng.normal(size=(20, 8)).astype(np.float32)
    weights = {n: (rng.normal(size=(8, 8)) / np.sqrt(8)).astype(np.float32) for n in ("Wq", "Wk", "Wv", "Wo")}
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
        helper.make_node("MatMul", ["e", "Wq"], ["q"], name="wq"),
        helper.make_node("MatMul", ["e", "Wk"], ["k"], name="wk"),
        helper.make_node("MatMul", ["e", "Wv"], ["v"], name="wv"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
        helper.make_node("Softmax", ["s"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["c"], name="context"),
        helper.make_node("MatMul", ["c", "Wo"], ["o"], name="wo"),
        helper.make_node("ReduceMean", ["o"], ["y"], name="pool", axes=[1], keepdims=0),
    ]
    inits = [numpy_helper.from_array(emb, "emb"), *(numpy_helper.from_array(w, n) for n, w in weights.items())]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 5])
    return _model(nodes, [ids], [_t("y", ["batch", 8])], inits)


@register
def outlier_channel_matmul() -> onnx.ModelProto:
    """x[N,8] -> Mul (channel 0 × 40) -> MatMul(W[8,4], every row used) -> y[N,4].

    One input channel runs 40× wider than the rest and its weights matter: one per-tensor INT8 scale
    for the MatMul's input leaves the other seven channels a few levels; smoothing fixes exactly this.
    """
    rng = np.random.default_rng(51)
    gain = np.ones(8, np.float32)
    gain[0] = 40.0
    w = rng.normal(size=(8, 4)).astype(np.float32)
    w[0] *= 0.05  # a wide channel with small weights, as in transformer outlier features
    nodes = [
        helper.make_node("Mul", ["x", "gain"], ["h"], name="outlier"),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="fc"),
    ]
    inits = [numpy_helper.from_array(gain, "gain"), numpy_helper.from_array(w, "w")]
    return _model(nodes, [_t("x", ["batch", 8])], [_t("y", ["batch", 4])], inits)


@register
def matmul_layernorm() -> onnx.ModelProto:
    """x[N,4,8] -> MatMul(W1) "fc1" -> LayerNormalization "norm" -> MatMul(W2) "fc2" -> y[N,4,8]."""
    rng = np.random.default_rng(61)
    w1, w2 = (rng.normal(size=(8, 8)).astype(np.float32) for _ in range(2))
    gamma, beta = rng.normal(1.0, 0.1, size=8).astype(np.float32), rng.normal(0, 0.1, size=8).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["n"], name="norm", axis=-1),
        helper.make_node("MatMul", ["n", "w2"], ["y"], name="fc2"),
    ]
    inits = [numpy_helper.from_array(a, k) for a, k in [(w1, "w1"), (w2, "w2"), (gamma, "gamma"), (beta, "beta")]]
    return _model(nodes, [_t("x", ["batch", 4, 8])], [_t("y", ["batch", 4, 8])], inits)


@register
def mobile_block() -> onnx.ModelProto:
    """x[N,3,6,6] -> 1x1 Conv "expand" (8 ch, bias) -> Clip(0, 6) -> 3x3 depthwise Conv "dw" (pad 1, bias)
    -> Relu -> 1x1 Conv "project" (4 ch) -> y: two equalizable pairs, "dw" in both.

    The output channels of "expand" and "dw" span 100× in weight range (as BatchNorm folding leaves
    them), so one per-tensor weight scale leaves the small channels a few levels.
    """
    rng = np.random.default_rng(71)
    spread = np.geomspace(0.05, 5.0, 8).astype(np.float32)
    w1 = rng.normal(size=(8, 3, 1, 1)).astype(np.float32) * spread[:, None, None, None]
    w2 = rng.normal(size=(8, 1, 3, 3)).astype(np.float32) * spread[::-1, None, None, None]
    w3 = rng.normal(size=(4, 8, 1, 1)).astype(np.float32)
    b1, b2 = rng.normal(size=8).astype(np.float32), rng.normal(size=8).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["e"], name="expand"),
        helper.make_node("Clip", ["e", "zero", "six"], ["e6"], name="relu6"),
        helper.make_node("Conv", ["e6", "w2", "b2"], ["d"], name="dw", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["d"], ["dr"], name="relu"),
        helper.make_node("Conv", ["dr", "w3"], ["y"], name="project"),
    ]
    inits = [numpy_helper.from_array(a, k) for a, k in [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"), (w3, "w3")]]
    inits += [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in [("zero", 0.0), ("six", 6.0)]]
    return _model(nodes, [_t("x", ["batch", 3, 6, 6])], [_t("y", ["batch", 4, 6, 6])], inits)


@register
def cancelling_matmuls() -> onnx.ModelProto:
    """x[N,8] -> MatMul(W) "big" + MatMul(-W + D) "counter" + MatMul(V) "signal" -> Add -> y[N,4].

    "big" and "counter" nearly cancel (their sum is the small D): quantized together their rounding
    errors cancel too, so keeping either one alone in float makes the output *worse*; only both
    together, or neither, is accurate. What a greedy recovery must not hand on half of.
    """
    rng = np.random.default_rng(81)
    w = rng.normal(size=(8, 4)).astype(np.float32) * 20.0
    d = rng.normal(size=(8, 4)).astype(np.float32) * 0.01
    v = rng.normal(size=(8, 4)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="big"),
        helper.make_node("MatMul", ["x", "c"], ["b"], name="counter"),
        helper.make_node("MatMul", ["x", "v"], ["s"], name="signal"),
        helper.make_node("Add", ["a", "b"], ["ab"], name="sum"),
        helper.make_node("Add", ["ab", "s"], ["y"], name="out"),
    ]
    inits = [numpy_helper.from_array(a, k) for a, k in [(w, "w"), (-w + d, "c"), (v, "v")]]
    return _model(nodes, [_t("x", ["batch", 8])], [_t("y", ["batch", 4])], inits)


@register
def text_map() -> onnx.ModelProto:
    """x[N,1,H,W] -> Conv(4, 3x3, pad 1) -> Relu -> Conv(1, 3x3, pad 1) -> Sigmoid -> y[N,1,H,W]: a
    DB-style text probability map, near 1 where the input is above 0.5 and near 0 elsewhere (the
    kernels are centre taps plus a little noise, so the map follows the input's edges)."""
    rng = np.random.default_rng(23)
    gains = np.array([4.0, 3.0, 2.0, 5.0], np.float32)
    w1 = rng.normal(size=(4, 1, 3, 3)).astype(np.float32) * 0.02
    w1[:, 0, 1, 1] += gains
    b1 = -0.5 * gains
    w2 = rng.normal(size=(1, 4, 3, 3)).astype(np.float32) * 0.02
    w2[0, :, 1, 1] += 2.0
    b2 = np.array([-4.0], np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c2"], ["y"], name="sigmoid"),
    ]
    inits = [numpy_helper.from_array(a, k) for a, k in [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2")]]
    return _model(nodes, [_t("x", ["batch", 1, "h", "w"])], [_t("y", ["batch", 1, "h", "w"])], inits)


@register
def loud_and_quiet_branches() -> onnx.ModelProto:
    """x[N,80] -> Mul(gain) "widen" -> Split into ten [N,8] -> MatMul "b0".."b9" ([8,4] each) -> Sum -> y[N,4].

    Branches b0..b8 read one channel 100x wider than the rest that their weights ignore: per-tensor
    INT8 leaves their other channels a level or two, the worst local SQNR of the model, but their
    weights are 1000x smaller, so their error hardly reaches y. b9 reads a milder outlier (8x) that its
    weights use: a better local SQNR than any other branch, and the error that dominates y.
    """
    rng = np.random.default_rng(71)
    gain = np.ones(80, np.float32)
    gain[0:72:8] = 100.0
    gain[72] = 8.0
    nodes = [
        helper.make_node("Mul", ["x", "gain"], ["h"], name="widen"),
        helper.make_node("Split", ["h", "parts"], [f"h{i}" for i in range(10)], name="split", axis=1),
    ]
    inits = [numpy_helper.from_array(gain, "gain"), numpy_helper.from_array(np.full(10, 8, np.int64), "parts")]
    for i in range(10):
        w = rng.normal(size=(8, 4)).astype(np.float32)
        if i < 9:
            w[0] = 0.0
            w *= 1e-3
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"y{i}"], name=f"b{i}"))
    nodes.append(helper.make_node("Sum", [f"y{i}" for i in range(10)], ["y"], name="sum"))
    return _model(nodes, [_t("x", ["batch", 80])], [_t("y", ["batch", 4])], inits)


@register
def tied_scores() -> onnx.ModelProto:
    """x[N,8] -> Mul(gain) -> MatMul "common" (two equal columns) + MatMul "split" -> Add -> y[N,2].

    Two class scores. "common" reads x with channel 0 made 100x wider, which its weights ignore:
    per-tensor INT8 leaves its other channels a few levels, a large error, but it adds the same value
    to both classes and so never changes the top-1. "split" reads x as it is (a small error) and
    alone decides which class wins: only its quantization flips a top-1, on samples near the tie.
    """
    rng = np.random.default_rng(29)
    gain = np.ones(8, np.float32)
    gain[0] = 100.0
    common = np.repeat(rng.normal(size=(8, 1)).astype(np.float32), 2, axis=1)
    common[0] = 0.0
    split = rng.normal(size=(8, 2)).astype(np.float32)
    nodes = [
        helper.make_node("Mul", ["x", "gain"], ["h"], name="widen"),
        helper.make_node("MatMul", ["h", "wc"], ["c"], name="common"),
        helper.make_node("MatMul", ["x", "ws"], ["s"], name="split"),
        helper.make_node("Add", ["c", "s"], ["y"], name="out"),
    ]
    inits = [numpy_helper.from_array(a, k) for a, k in [(gain, "gain"), (common, "wc"), (split, "ws")]]
    return _model(nodes, [_t("x", ["batch", 8])], [_t("y", ["batch", 2])], inits)


@register
def stem_conv() -> onnx.ModelProto:
    """x[N,3,9,9] -> Conv(8 ch, 3x3, stride 2, pads [1, 1, 0, 0], bias) -> y[N,8,4,4]: an image network's
    first layer, its 27 weights per channel rounded on one grid, with padding on two sides only."""
    rng = np.random.default_rng(33)
    w = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
    b = rng.normal(size=8).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="stem", strides=[2, 2], pads=[1, 1, 0, 0])]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    return _model(nodes, [_t("x", ["batch", 3, 9, 9])], [_t("y", ["batch", 8, 4, 4])], inits)


@register
def dilated_grouped_conv() -> onnx.ModelProto:
    """x[N,4,9,9] -> Conv(6 ch, 2 groups, 3x3, dilation 2, no padding) -> y[N,6,5,5]."""
    w = np.random.default_rng(34).normal(size=(6, 2, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="dilated", group=2, dilations=[2, 2])]
    inits = [numpy_helper.from_array(w, "w")]
    return _model(nodes, [_t("x", ["batch", 4, 9, 9])], [_t("y", ["batch", 6, 5, 5])], inits)


@register
def saturating_conv() -> onnx.ModelProto:
    """x[N,16,4,4] -> 1x1 Conv(4 ch, every weight of a channel equal) -> y.

    Inputs near the top of their range times weights at the top of theirs: on x86 without VNNI ORT's
    u8 x s8 kernels sum two products 255 x 127 = 64770 into int16 and saturate, whatever the pairing;
    a channel of 7-bit or uint8 weights cannot. Channel k's weights are (k + 1) / 4, so each channel
    is quantized to its own full range."""
    w = np.repeat((np.arange(1, 5, dtype=np.float32) / 4)[:, None], 16, axis=1).reshape(4, 16, 1, 1)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    return _model(nodes, [_t("x", ["batch", 16, 4, 4])], [_t("y", ["batch", 4, 4, 4])],
                  [numpy_helper.from_array(w, "w")])  # fmt: skip


@register
def saturating_depthwise() -> onnx.ModelProto:
    """x[N,8,6,6] -> 3x3 depthwise Conv (every weight 1) -> 1x1 Conv (8 -> 8, every weight 1) -> y.

    With inputs near their maximum every product is 255 x 127 in both Convs: the pointwise one sums
    pairs past int16 on x86 without VNNI, the depthwise one (ORT's own kernel) does not."""
    dw = np.ones((8, 1, 3, 3), np.float32)
    pw = np.ones((8, 8, 1, 1), np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "dw"], ["a"], name="depthwise", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "pw"], ["y"], name="pointwise"),
    ]
    inits = [numpy_helper.from_array(dw, "dw"), numpy_helper.from_array(pw, "pw")]
    return _model(nodes, [_t("x", ["batch", 8, 6, 6])], [_t("y", ["batch", 8, 6, 6])], inits)


@register
def layernorm_by_hand() -> onnx.ModelProto:
    """x[N,4,8] -> MatMul "fc" -> a LayerNorm written out (ReduceMean, Sub, Mul, ReduceMean, Add eps 1e-12,
    Sqrt, Div) -> y: FP16 holds neither the epsilon (below its smallest subnormal) nor, safely, the statistics."""
    rng = np.random.default_rng(71)
    w = rng.normal(size=(8, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
        helper.make_node("ReduceMean", ["h"], ["mu"], name="mean", axes=[-1]),
        helper.make_node("Sub", ["h", "mu"], ["d"], name="center"),
        helper.make_node("Mul", ["d", "d"], ["d2"], name="square"),
        helper.make_node("ReduceMean", ["d2"], ["var"], name="variance", axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["var_eps"], name="add_eps"),
        helper.make_node("Sqrt", ["var_eps"], ["std"], name="std"),
        helper.make_node("Div", ["d", "std"], ["y"], name="normalize"),
    ]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(1e-12, np.float32), "eps")]
    return _model(nodes, [_t("x", ["batch", 4, 8])], [_t("y", ["batch", 4, 8])], inits)


@register
def conv_quiet_channels() -> onnx.ModelProto:
    """x[N,2,4,4] -> Conv(4 ch, 3x3, pad 1, bias) -> Reshape to [N, 64] (the batch read by Shape of x) -> y.

    Channel 1's weights are ~1e-9 (dead after BatchNorm folding) and channel 2's ~1e-3: their INT8
    scales (max |w| / 127) fall below FP16's normal range (2^-14), as in EfficientNet-Lite2. And x is
    also read by a Shape, as PyTorch's flatten exports it."""
    rng = np.random.default_rng(72)
    gains = np.array([1.0, 1e-9, 1e-3, 0.5], np.float32)[:, None, None, None]
    w = rng.normal(size=(4, 2, 3, 3)).astype(np.float32) * gains
    b = rng.normal(size=4).astype(np.float32)
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "zero"], ["n"], name="batch", axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"], name="batch_1d"),
        helper.make_node("Concat", ["n1", "rest"], ["flat_shape"], name="flat_shape", axis=0),
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["conv", "flat_shape"], ["y"], name="flatten"),
    ]
    consts = [(np.array(0, np.int64), "zero"), (np.array([0], np.int64), "axes"), (np.array([64], np.int64), "rest")]
    inits = [numpy_helper.from_array(a, k) for a, k in [(w, "w"), (b, "b"), *consts]]
    return _model(nodes, [_t("x", ["batch", 2, 4, 4])], [_t("y", ["batch", 64])], inits)


@register
def hardswish_depthwise() -> onnx.ModelProto:
    """x[N,3,6,6] -> 1x1 Conv "stem" (4 ch, bias) -> HardSwish -> h -> 3x3 depthwise Conv "dw" (pad 1, bias)
    -> y; h is also read by GlobalAveragePool -> pooled (a second reader of the tensor "dw" reads).

    The stem's output channels span 100x in scale, as BatchNorm folding leaves them: one INT8 scale
    for all of h leaves the quiet channels a level or two. HardSwish is not homogeneous, so no scale
    can move through it into the stem.
    """
    rng = np.random.default_rng(83)
    spread = np.array([0.05, 0.3, 1.0, 5.0], np.float32)
    w1 = rng.normal(size=(4, 3, 1, 1)).astype(np.float32) * spread[:, None, None, None]
    b1 = rng.normal(size=4).astype(np.float32) * spread
    w2 = rng.normal(size=(4, 1, 3, 3)).astype(np.float32)
    b2 = rng.normal(size=4).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["s"], name="stem"),
        helper.make_node("HardSwish", ["s"], ["h"], name="hardswish"),
        helper.make_node("Conv", ["h", "w2", "b2"], ["y"], name="dw", group=4, pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["h"], ["pooled"], name="pool"),
    ]
    inits = [numpy_helper.from_array(a, k) for a, k in [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2")]]
    outputs = [_t("y", ["batch", 4, 6, 6]), _t("pooled", ["batch", 4, 1, 1])]
    return _model(nodes, [_t("x", ["batch", 3, 6, 6])], outputs, inits)
