"""Activation smoothing: move per-channel outliers of a layer's input into its weights.

One symmetric INT8 scale per activation tensor must cover its widest channel; when a few channels
run 10–30× wider than the rest (a pointwise Conv behind a residual Add, a transformer's MatMul
after LayerNorm), the others are left with a handful of levels. Since ``x · W = (x / s) · (s · W)``
for any positive per-input-channel ``s``, dividing the activation by ``s`` and multiplying the
weights' input channels by it changes nothing in float and lets both quantize well:

    s[c] = max|x[c]|^α / max|W[:, c]|^(1−α)

(Xiao et al., *SmoothQuant*, 2023; ``α`` = 0.5 balances the two). Weights keep one scale per
*output* channel, so the extra spread they take is absorbed there. The division is an explicit
per-channel ``Mul`` before the layer's QuantizeLinear (TensorRT runs it as a float scale layer);
it is never folded into an earlier layer, because a Relu6/Clip or a residual Add in between
would not commute with it. The smoothed input is a new tensor, calibrated anew by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.calibration.collect import DEFAULT_MEMORY_MB
from pipeline.calibration.ranges import TensorRange
from pipeline.graph.graph_index import GraphIndex
from pipeline.graph.layout import Layout
from pipeline.graph.model import append_reduce, attribute, opset_of, toposort
from pipeline.log import logger
from pipeline.transforms import statistics_pass
from pipeline.transforms.roles import activation_matmuls, constant_tensors

Batch = dict[str, np.ndarray]


@dataclass
class Consumer:
    node: onnx.NodeProto
    weight: str  # initializer name
    axis: int  # the weight's input-channel axis


@dataclass
class LayerInput:
    tensor: str
    channel_axis: int  # 1 for a Conv's NCHW input, -1 for a MatMul/Gemm's last axis
    rank: int  # of a Conv input (the weight's); 0 when unknown (MatMul)
    channels: int
    consumers: list[Consumer] = field(default_factory=list)


def candidates(model: onnx.ModelProto, op_types: Iterable[str], skip: Iterable[str] = ()) -> list[LayerInput]:
    """Activation tensors read by smoothable layers, with those layers.

    Smoothable: a Conv without groups, a MatMul whose second operand is a constant [K, N] matrix, a
    Gemm with a constant weight and transA = 0, reading a computed tensor (not a graph input); by
    the names in ``skip`` (kept float) never.
    """
    index = GraphIndex(model)
    # graph inputs keep their preprocessing's fixed range (calibrated minmax, see calibrator.py): left alone
    const = constant_tensors(model) | index.inputs
    wanted, skipped = set(op_types), {*skip, *activation_matmuls(model)}
    found: dict[str, LayerInput] = {}
    for node in model.graph.node:
        if node.op_type not in wanted or node.name in skipped or len(node.input) < 2:
            continue
        x, w = node.input[0], node.input[1]
        weight = index.initializer(w)
        if x in const or weight is None:
            continue
        dims = list(weight.dims)
        if node.op_type == "Conv":
            if int(attribute(node, "group", 1)) != 1:
                continue
            entry = found.setdefault(x, LayerInput(x, 1, len(dims), dims[1]))
            axis = 1
        elif node.op_type == "MatMul" and len(dims) == 2:
            entry = found.setdefault(x, LayerInput(x, -1, 0, dims[0]))
            axis = 0
        elif node.op_type == "Gemm" and len(dims) == 2 and not int(attribute(node, "transA", 0)):
            axis = 1 if int(attribute(node, "transB", 0)) else 0
            entry = found.setdefault(x, LayerInput(x, -1, 2, dims[axis]))
        else:
            continue
        if entry.channel_axis != (1 if node.op_type == "Conv" else -1) or dims[axis] != entry.channels:
            continue  # one tensor read as NCHW by one layer and as [.., K] by another: leave it
        entry.consumers.append(Consumer(node, w, axis))
    return list(found.values())


def channel_max(
    model: onnx.ModelProto,
    inputs: list[LayerInput],
    batches: Iterable[Batch],
    samples: int,
    layout: Layout | None = None,
    memory_mb: int = DEFAULT_MEMORY_MB,
) -> list[np.ndarray]:
    """max |x[c]| per input channel of each tensor over the first ``samples`` samples, fed to ONNX
    Runtime in chunks that keep two sets of the network's activations within ``memory_mb``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    opset = opset_of(m)
    names = []
    for k, item in enumerate(inputs):
        p = f"int8pipe_smoothing_{k}"
        m.graph.node.append(helper.make_node("Abs", [item.tensor], [f"{p}_abs"]))
        if item.channel_axis == 1:
            axes = [0, *range(2, item.rank)]
            flat = f"{p}_abs"
        else:  # [..., K]: fold every leading axis into one, whatever the rank
            width = item.channels
            m.graph.initializer.append(numpy_helper.from_array(np.array([-1, width], np.int64), f"{p}_shape"))
            m.graph.node.append(helper.make_node("Reshape", [f"{p}_abs", f"{p}_shape"], [f"{p}_flat"]))
            axes, flat = [0], f"{p}_flat"
        append_reduce(m.graph, "ReduceMax", flat, f"{p}_max", axes, opset)
        m.graph.output.append(helper.make_tensor_value_info(f"{p}_max", TensorProto.FLOAT, None))
        names.append(f"{p}_max")
    out: list[np.ndarray] | None = None

    def fold(got: dict[str, np.ndarray], _: int) -> None:
        nonlocal out
        values = [got[k] for k in names]
        out = values if out is None else [np.maximum(a, b) for a, b in zip(out, values)]

    statistics_pass.run(model, names, batches, samples, fold, label="smoothing statistics", copies=2,
                        layout=layout, memory_mb=memory_mb, graph=m)  # fmt: skip
    return [np.asarray(v, np.float64) for v in out] if out is not None else []


def _input_channel_max(w: np.ndarray, axis: int) -> np.ndarray:
    return np.abs(w).max(axis=tuple(a for a in range(w.ndim) if a != axis))


def factors(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-channel divisor; 1 where a channel is silent on either side."""
    s = np.ones_like(x_max, dtype=np.float64)
    live = (x_max > 0) & (w_max > 0)
    s[live] = x_max[live] ** alpha / w_max[live] ** (1 - alpha)
    return np.clip(s, 1e-4, 1e4)


def smooth(
    model: onnx.ModelProto, inputs: list[LayerInput], maxima: list[np.ndarray], alpha: float,
    suffix: str = "_smoothed",
) -> tuple[onnx.ModelProto, list[str]]:  # fmt: skip
    """A copy of ``model`` with each input divided by its factors and its consumers' weights multiplied.

    Returns the model and the new (smoothed) activation tensors, named ``<tensor><suffix>``, which need
    ranges of their own.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = GraphIndex(out).arrays  # read by the original weights' names only: the smoothed copies get new ones
    by_name = {n.name: n for n in graph.node}
    new_tensors = []
    for item, x_max in zip(inputs, maxima):
        w_max = np.max([_input_channel_max(inits[c.weight], c.axis) for c in item.consumers], axis=0)
        if w_max.shape != x_max.shape:
            continue
        s = factors(x_max, w_max, alpha)
        shape = [-1] if item.channel_axis == -1 else [1, -1, *([1] * (item.rank - 2))]
        smoothed, inverse = f"{item.tensor}{suffix}", f"{item.tensor}{suffix}_inverse"
        graph.initializer.append(numpy_helper.from_array((1.0 / s).reshape(shape).astype(np.float32), inverse))
        mul = helper.make_node("Mul", [item.tensor, inverse], [smoothed], name=f"{item.tensor}{suffix}_mul")
        graph.node.append(mul)
        for c in item.consumers:
            node = by_name[c.node.name]
            w = inits[c.weight]
            bshape = [1] * w.ndim
            bshape[c.axis] = -1
            name = f"{node.name}{suffix}_weight"
            graph.initializer.append(numpy_helper.from_array((w * s.reshape(bshape)).astype(np.float32), name))
            node.input[0], node.input[1] = smoothed, name
        new_tensors.append(smoothed)
        logger.debug("smoothing %s: factors %.3g..%.3g", item.tensor, s.min(), s.max())
    # the original weights of smoothed layers, unless something else still reads them
    replaced = {c.weight for item in inputs for c in item.consumers}
    read = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name in replaced and i.name not in read]:
        graph.initializer.remove(init)
    toposort(out)
    return out, new_tensors


def smooth_and_calibrate(
    fp32: onnx.ModelProto,
    batches: Callable[[], Iterable[Batch]],
    op_types: Iterable[str],
    skip: Iterable[str],
    alpha: float,
    samples: int,
    method: str,
    percentile: float,
    memory_mb: int,
    layout: Layout | None = None,
) -> tuple[onnx.ModelProto, dict[str, TensorRange]]:
    """The smoothed model and the ranges of its new tensors, calibrated with ``method``.

    ``batches()`` is called twice: per-channel maxima on the first ``samples`` samples, then a
    calibration of the smoothed inputs on all of them.
    """
    items = candidates(fp32, op_types, skip)
    if not items:
        return fp32, {}
    maxima = channel_max(fp32, items, batches(), samples, layout, memory_mb)
    smoothed, new = smooth(fp32, items, maxima, alpha)
    ranges = statistics_pass.calibrate_new(smoothed, new, batches, method, percentile, memory_mb, layout, "smoothing")
    logger.info("quantize: smoothed the inputs of %d layers (alpha %.2f)", sum(len(i.consumers) for i in items), alpha)
    return smoothed, ranges
