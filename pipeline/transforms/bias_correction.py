"""Bias correction: fold the mean output shift that quantization causes into the float bias.

Rounding a layer's weights and clipping its input move the *mean* of its output, per output
channel, and a shifted mean is what accumulates through a deep network (depthwise-separable
networks suffer most: a 3×3 depthwise kernel has nine weights to round per channel). The shift of
output channel ``o`` is

    shift[o] = E[ layer(fq(x); W_q)[o] − layer(x; W)[o] ]

over calibration samples and output positions, with ``W_q`` the dequantized INT8 weights and ``fq``
the layer's input quantizer. It is measured, not estimated: one pass of the FP32 model in which
every INT8 Conv/Gemm has a twin that reads the quantized input (the Q/DQ model's own quantizer,
copied) with the quantized weights, so padding, strides and groups are exact. The correction is
local, each layer against its own FP32 input, so all layers are corrected at once without
over-correcting what an earlier layer already fixed. Subtracting the shift from the bias costs
nothing at inference: TensorRT keeps biases in float, ONNX Runtime re-quantizes them to INT32.

Nagel et al., *Data-Free Quantization* (2019) correct the weight term analytically from BatchNorm
statistics; measuring includes the input quantizer's clipping, which on EfficientNet-Lite0 matters
as much as the weights (benchmarks/results/efficientnet_lite0_peers.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.calibration.collect import DEFAULT_MEMORY_MB
from pipeline.graph.graph_index import GraphIndex
from pipeline.graph.layout import Layout
from pipeline.graph.model import append_reduce, attribute, dequantized, opset_of
from pipeline.log import logger
from pipeline.transforms import statistics_pass
from pipeline.transforms.shift import shift_of

Batch = dict[str, np.ndarray]


@dataclass
class _Layer:
    node: onnx.NodeProto  # the FP32 model's node (same name in the Q/DQ model)
    scale: np.ndarray  # the input quantizer's scale and zero point, as the Q/DQ model holds them
    zero_point: np.ndarray
    weight_q: np.ndarray  # the dequantized INT8 weights
    shift: float = 0.0  # the input is quantized as x - shift (pipeline/transforms/shift.py)


def layers(fp32: onnx.ModelProto, qdq: onnx.ModelProto) -> list[_Layer]:
    """The Conv and Gemm nodes that run in INT8 in ``qdq``: activation and weight through Q/DQ."""
    index, originals = GraphIndex(qdq), GraphIndex(fp32)
    out = []
    for node in qdq.graph.node:
        original = originals.node(node.name)
        if node.op_type not in ("Conv", "Gemm") or original is None or original.op_type != node.op_type:
            continue
        if node.op_type == "Gemm" and float(attribute(node, "beta", 1.0)) == 0:
            continue  # a bias that is multiplied by zero cannot carry a correction
        dq_x, dq_w = (index.producer(t) for t in node.input[:2])
        if dq_x is None or dq_w is None or dq_x.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
            continue
        q_x = index.producer(dq_x.input[0])
        if q_x is None or q_x.op_type != "QuantizeLinear" or len(q_x.input) < 3 or dq_w.input[0] not in index.arrays:
            continue
        scale, zero_point = index.array(q_x.input[1]), index.array(q_x.input[2])
        out.append(_Layer(original, scale, zero_point, dequantized(dq_w, index.arrays), shift_of(q_x, index)))
    return out


def _shift_model(fp32: onnx.ModelProto, todo: list[_Layer]) -> tuple[onnx.ModelProto, list[str]]:
    """``fp32`` plus, per layer, a quantized twin and the per-channel mean of twin − original."""
    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    opset = opset_of(model)
    graph = model.graph
    names: list[str] = []
    for k, layer in enumerate(todo):
        p = f"int8pipe_bias_correction_{k}"
        graph.initializer.extend(
            [
                numpy_helper.from_array(layer.scale, f"{p}_scale"),
                numpy_helper.from_array(layer.zero_point, f"{p}_zero_point"),
                numpy_helper.from_array(layer.weight_q.astype(np.float32), f"{p}_weight"),
            ]
        )
        twin = onnx.NodeProto()
        twin.CopyFrom(layer.node)
        twin.name = f"{p}_twin"
        twin.input[0], twin.input[1] = f"{p}_dq", f"{p}_weight"
        del twin.output[:]
        twin.output.append(f"{p}_out")
        rank = layer.weight_q.ndim if layer.node.op_type == "Conv" else 2
        x = layer.node.input[0]
        if layer.shift:  # the INT8 layer computes the layer of DQ(Q(x - c)) + c, padding included
            graph.initializer.append(numpy_helper.from_array(np.array(layer.shift, np.float32), f"{p}_offset"))
            graph.node.append(helper.make_node("Sub", [x, f"{p}_offset"], [f"{p}_offset_x"]))
            x = f"{p}_offset_x"
        graph.node.extend(
            [
                helper.make_node("QuantizeLinear", [x, f"{p}_scale", f"{p}_zero_point"], [f"{p}_q"]),
                helper.make_node("DequantizeLinear", [f"{p}_q", f"{p}_scale", f"{p}_zero_point"], [f"{p}_dq"]),
            ]
        )
        if layer.shift:
            graph.node.append(helper.make_node("Add", [f"{p}_dq", f"{p}_offset"], [f"{p}_offset_back"]))
            twin.input[0] = f"{p}_offset_back"
        graph.node.extend(
            [
                twin,
                helper.make_node("Sub", [f"{p}_out", layer.node.output[0]], [f"{p}_diff"]),
            ]
        )
        append_reduce(graph, "ReduceMean", f"{p}_diff", f"{p}_shift", [0, *range(2, rank)], opset)
        graph.output.append(helper.make_tensor_value_info(f"{p}_shift", TensorProto.FLOAT, None))
        names.append(f"{p}_shift")
    return model, names


# Live copies of one sample's activations while the shift model runs: the FP32 network's, the
# quantized twins' outputs and their differences, plus ONNX Runtime's arena around them.
COPIES = 3


def shifts(
    fp32: onnx.ModelProto,
    todo: list[_Layer],
    batches: Iterable[Batch],
    samples: int,
    layout: Layout | None = None,
    memory_mb: int = DEFAULT_MEMORY_MB,
) -> tuple[list[np.ndarray], int]:
    """Per layer the mean output shift per channel over the first ``samples`` samples.

    Samples go through ONNX Runtime in chunks sized so that ``COPIES`` sets of the network's
    activations fit ``memory_mb`` (a 640×640 detector's are hundreds of MB per sample).
    """
    model, names = _shift_model(fp32, todo)
    sums: list[np.ndarray] | None = None

    def fold(values: dict[str, np.ndarray], n: int) -> None:
        nonlocal sums
        means = [values[k] for k in names]
        # weighted by chunk size: ReduceMean averages within a chunk only
        sums = [m.astype(np.float64) * n for m in means] if sums is None else [s + m * n for s, m in zip(sums, means)]

    # no graph optimisation: the copied quantizers must round exactly as the Q/DQ model's do
    seen = statistics_pass.run(fp32, names, batches, samples, fold, label="bias correction", copies=COPIES,
                               layout=layout, memory_mb=memory_mb, graph=model, optimize=False)  # fmt: skip
    return ([s / seen for s in sums] if sums is not None else []), seen


def apply(qdq: onnx.ModelProto, corrections: dict[str, np.ndarray]) -> int:
    """Subtract ``corrections`` (node -> shift per output channel) from those nodes' biases in ``qdq``.

    A corrected bias is a new initializer (``<node>_corrected_bias``), never an edit of the FP32 one,
    so a node later reverted to float finds its original bias again. Returns how many nodes changed.
    """
    graph = qdq.graph
    # built before any bias moves: a DequantizeLinear two nodes share is re-pointed for the first only
    index = GraphIndex(qdq)
    changed = 0
    for node in graph.node:
        delta = corrections.get(node.name)
        if delta is None:
            continue
        beta = float(attribute(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
        if beta == 0:
            continue
        name = f"{node.name}_corrected_bias"
        bias_in = node.input[2] if len(node.input) > 2 else ""
        dq = index.producer(bias_in)
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in index.arrays:
            # ONNX Runtime's INT32 bias: re-quantize with its scale (input scale × weight scale)
            scale = index.array(dq.input[1]).astype(np.float64)
            bias = index.array(dq.input[0]).astype(np.float64) * scale - delta / beta
            quantized = np.clip(np.round(bias / scale), -(2**31), 2**31 - 1).astype(np.int32)
            graph.initializer.append(numpy_helper.from_array(quantized, name))
            dq.input[0] = name
        elif not bias_in or bias_in in index.arrays:
            old = index.array(bias_in).astype(np.float64) if bias_in else np.zeros(1)
            bias = old - delta / beta  # broadcasts a scalar or (1, N) Gemm bias like Gemm itself would
            graph.initializer.append(numpy_helper.from_array(bias.astype(np.float32), name))
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = name
        else:
            continue  # a bias computed at run time: nothing to fold into
        changed += 1
    return changed


def correct(
    fp32: onnx.ModelProto,
    qdq: onnx.ModelProto,
    batches: Iterable[Batch],
    samples: int = 128,
    layout: Layout | None = None,
    memory_mb: int = DEFAULT_MEMORY_MB,
) -> tuple[int, int]:
    """Bias-correct every INT8 Conv and Gemm of ``qdq`` in place. Returns (nodes corrected, samples).

    ``layout`` says where each input holds its samples (``batch_axes``, ``constants``)."""
    todo = layers(fp32, qdq)
    if not todo:
        return 0, 0
    measured, seen = shifts(fp32, todo, batches, samples, layout, memory_mb)
    if not measured:
        return 0, 0
    changed = apply(qdq, {layer.node.name: m for layer, m in zip(todo, measured)})
    logger.info("quantize: bias correction on %d nodes from %d calibration samples", changed, seen)
    return changed, seen
