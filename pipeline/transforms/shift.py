"""Shifted activations: the whole symmetric INT8 grid for a Conv input that is (almost) one-signed.

TensorRT runs INT8 activations with zero point 0 only, so a ReLU/ReLU6 output quantized over
[-amax, amax] uses levels 0..127 and wastes the negative half: 7 bits. Because a convolution is
linear, the input can be shifted first and the shift paid back in the bias:

    conv(x) = conv(x - c) + c · ΣW      (c = (lo + hi) / 2, x - c in [-(hi - lo)/2, (hi - lo)/2])

so ``x - c`` is quantized symmetric with amax ``(hi - lo) / 2``: for a ReLU6 output half the step,
8 bits. The Conv's zero padding must pad ``x`` with 0, i.e. ``x - c`` with ``-c``: a Conv that pads
gets an explicit Pad (constant ``-c``) and no padding of its own. The rewrite adds a Sub (and a Pad)
before the QuantizeLinear, which TensorRT runs in float; the Conv itself stays INT8. ``c · ΣW`` uses
the dequantized INT8 weights, so the shifted Conv computes exactly the unshifted Conv of the finer
grid's values; bias correction runs after the shift and measures that grid (it recognises the Sub).

On EfficientNet-Lite0 the depthwise Convs' inputs (ReLU6 outputs) carry most of the activation error
(benchmarks/results/efficientnet_lite0_peers.md); shifting them is what took ``target: tensorrt`` past
0.90 top-1 agreement with every Conv INT8.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pipeline.graph.graph_index import GraphIndex
from pipeline.graph.model import attribute, dequantized, toposort
from pipeline.log import logger
from pipeline.transforms.scale_grid import on_grid

MIN_GAIN = 1.25  # shift only where the step gets at least this much finer
SHIFT_SUFFIX = "_shift_sub"  # the Sub's name ends so: shift_of recognises a shifted input by it


@dataclass
class Shifted:
    node: str  # the Conv
    tensor: str  # its input as the FP32 model computes it
    shift: float  # c
    amax: float  # amax of the shifted tensor


def shift_inputs(
    qdq: onnx.ModelProto,
    observed: dict[str, tuple[float, float]],
    min_gain: float = MIN_GAIN,
    narrow: str | None = None,
) -> list[Shifted]:
    """Shift, in place, the INT8 input of every Conv of ``qdq`` that gains at least ``min_gain`` in step.

    ``narrow`` (fp16 | bf16): the float regions' type; c is then a value of it, so the Sub and Pad that
    run in it subtract exactly the c the bias pays back (c·ΣW reaches ~1000: any rounding would show).

    A candidate Conv reads ``DequantizeLinear(QuantizeLinear(x))`` with an int8 zero point 0, that
    DequantizeLinear feeds nothing else, its weights are INT8 initializers and its bias (if any) a
    float initializer; ``observed[x]`` (calibration min, max) bounds ``x`` within [-amax, amax].
    """
    graph = qdq.graph
    # every check reads the graph as it came in, not the Subs, Pads and quantizers added along the way
    index = GraphIndex(qdq)
    inits = index.arrays
    done: list[Shifted] = []
    replaced: set[str] = set()  # initializers the rewrite stopped reading (shared ones may still be read)
    for conv in list(graph.node):
        if conv.op_type != "Conv" or not conv.name:
            continue
        if attribute(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue  # SAME_* padding depends on the input size: no explicit Pad can stand in for it
        dq = index.producer(conv.input[0])
        q = index.producer(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        dq_w = index.producer(conv.input[1])
        if dq is None or q is None or q.op_type != "QuantizeLinear" or dq_w is None:
            continue
        if len(index.consumers(conv.input[0])) != 1 or len(index.consumers(q.output[0])) != 1:
            continue  # the quantized tensor is read elsewhere too: shifting it would change that reader
        if dq_w.op_type != "DequantizeLinear" or dq_w.input[0] not in inits or len(q.input) < 3:
            continue
        bias = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
        if bias is not None and (bias not in inits or index.producer(bias) is not None):
            continue  # a bias computed at run time or itself quantized (ONNX Runtime's INT32): not ours to fold into
        scale, zp = inits.get(q.input[1]), inits.get(q.input[2])
        x = q.input[0]
        # signed INT8 with zero point 0 only: a uint8 grid starts at 0 and has no room for x - c < 0
        if scale is None or zp is None or zp.dtype != np.int8 or scale.size != 1 or np.any(zp != 0):
            continue
        if x not in observed:
            continue
        amax = float(scale) * 127.0
        lo, hi = max(observed[x][0], -amax), min(observed[x][1], amax)
        if amax <= 0 or hi <= lo or amax / ((hi - lo) / 2) < min_gain:
            continue
        c = (hi + lo) / 2
        if narrow is not None:
            c = float(np.sign(c) * on_grid(np.array(abs(c), np.float32), narrow, up=False))
        half = max(hi - c, c - lo)
        p = f"{conv.name}_shift"
        graph.initializer.append(numpy_helper.from_array(np.array(c, np.float32), f"{p}_c"))
        graph.node.append(helper.make_node("Sub", [x, f"{p}_c"], [f"{p}_x"], name=f"{conv.name}{SHIFT_SUFFIX}"))
        shifted = f"{p}_x"
        pads = list(attribute(conv, "pads", []))
        if any(pads):
            rank = len(pads) // 2
            full = [0, 0, *pads[:rank], 0, 0, *pads[rank:]]  # Pad's order: every axis' begin, then every end
            graph.initializer.extend(
                [
                    numpy_helper.from_array(np.array(full, np.int64), f"{p}_pads"),
                    numpy_helper.from_array(np.array(-c, np.float32), f"{p}_pad_value"),
                ]
            )
            graph.node.append(
                helper.make_node("Pad", [shifted, f"{p}_pads", f"{p}_pad_value"], [f"{p}_padded"], name=f"{p}_pad")
            )
            shifted = f"{p}_padded"
            for a in conv.attribute:
                if a.name == "pads":
                    del a.ints[:]
                    a.ints.extend([0] * len(pads))
        # new quantizer initializers: the old ones may be shared with other tensors' quantizers
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(half / 127.0, np.float32), f"{p}_scale"),
                numpy_helper.from_array(np.zeros((), zp.dtype), f"{p}_zero_point"),
            ]
        )
        q.input[0] = shifted
        replaced.update((q.input[1], q.input[2], *([bias] if bias else [])))
        q.input[1], q.input[2] = f"{p}_scale", f"{p}_zero_point"
        dq.input[1], dq.input[2] = f"{p}_scale", f"{p}_zero_point"
        w_q = dequantized(dq_w, inits)
        paid_back = c * w_q.sum(axis=tuple(range(1, w_q.ndim)))
        old = inits[bias].astype(np.float64) if bias is not None else np.zeros(w_q.shape[0])
        graph.initializer.append(numpy_helper.from_array((old + paid_back).astype(np.float32), f"{p}_bias"))
        while len(conv.input) < 3:
            conv.input.append("")
        conv.input[2] = f"{p}_bias"
        done.append(Shifted(conv.name, x, c, half))
    if done:
        used = {i for n in graph.node for i in n.input}
        for init in [i for i in graph.initializer if i.name in replaced and i.name not in used]:
            graph.initializer.remove(init)
        toposort(qdq)
        logger.info("quantize: shifted the INT8 inputs of %d Conv(s) onto the whole grid", len(done))
    return done


def shift_of(q: onnx.NodeProto, index: GraphIndex) -> float:
    """c when ``q`` quantizes ``x - c`` as :func:`shift_inputs` writes it (Sub, then maybe Pad), else 0."""
    node = index.producer(q.input[0])
    if node is not None and node.op_type == "Pad":
        node = index.producer(node.input[0])
    if node is None or node.op_type != "Sub" or not node.name.endswith(SHIFT_SUFFIX):
        return 0.0
    if node.input[1] not in index.arrays:
        return 0.0
    return float(index.array(node.input[1]))
