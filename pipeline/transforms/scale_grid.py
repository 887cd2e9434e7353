"""Q/DQ scales on the grid of the float regions' type, before anything is measured against them.

A model with FP16 (or BF16) float regions stores its Q/DQ scales in that type: ONNX makes a
DequantizeLinear output its scale's type. Rounding a scale moves every value it dequantizes by the same
relative amount (up to 2^-11 in FP16, 2^-8 in BF16), which is harmless on its own but not after the
stages that balance one large term against another: a shifted Conv computes ``conv(x - c) + c·ΣW`` with
``c·ΣW`` folded into its bias (pipeline/transforms/shift.py), and on EfficientNet-Lite2's projection
Convs that bias reaches 1000, so a scale rounded after the fold leaves up to 0.25 uncancelled in a
channel whose whole range is 20. So the scales (and the shift's c) are put on the narrow grid right
after quantization, and the shift, GPTQ and bias correction measure and compensate the model that will
run (benchmarks/results/fp16_scale_grid.md: the logits' cosine to FP32 0.9952 -> 0.9956 on Lite2).

Each scale moves to the nearest value on the grid: a weight's dequantized values move with it by at
most half a unit of the type's last place, and an activation's scale stays shared by its QuantizeLinear
and DequantizeLinear. Only a weight channel scaled below FP16's normal range (a channel dead after
BatchNorm folding: 1e-10), where FP16's nearest value is far off, moves up to the next value and has
its INT8 values refitted (:func:`refit`). Activation scales FP16 cannot hold (beyond its range, or below
its normal range) are left alone: the float-regions rewrite keeps those quantizers FP32.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from pipeline.graph.model import attribute, subgraph_inputs

_MAX = {"fp16": 65504.0, "bf16": 3.38e38}
FP16_NORMAL = 2.0**-14  # FP16's smallest normal value: below it a scale keeps only a few significant bits


def on_grid(scale: np.ndarray, precision: str, up: bool) -> np.ndarray:
    """``scale`` (positive float32) as float32 values the ``precision`` type holds exactly: the nearest,
    or with ``up`` the smallest at or above each (never 0: at least the smallest positive value)."""
    s = np.asarray(scale, np.float32)
    if precision == "fp16":
        narrow = s.astype(np.float16)
        if up:
            below = narrow.astype(np.float32) < s
            narrow[below] = np.nextafter(narrow[below], np.float16(np.inf))
        narrow[narrow == 0] = np.nextafter(np.float16(0), np.float16(1))
        return narrow.astype(np.float32)
    if precision == "bf16":  # BF16 is the upper half of an FP32: round the lower 16 bits away
        bits = s.view(np.uint32).astype(np.int64)
        carry = 0xFFFF if up else 0x7FFF + ((bits >> 16) & 1)  # up, or nearest with ties to even
        out = ((bits + carry) & 0xFFFF0000).astype(np.uint32).view(np.float32)
        return np.where(out == 0, np.float32(2.0**-133), out).astype(np.float32)  # smallest BF16 subnormal
    raise ValueError(f"no grid for {precision!r}")


def refit(q: np.ndarray, scale: np.ndarray, new_scale: np.ndarray, axis: int) -> np.ndarray:
    """INT8 values ``q`` dequantized with ``scale``, requantized to ``new_scale`` >= ``scale``: each
    dequantized value moves by at most half the new scale, and |q| can only shrink, so nothing clips."""
    shape = [-1 if d == axis % q.ndim else 1 for d in range(q.ndim)] if scale.size > 1 else []
    ratio = (scale.astype(np.float64) / new_scale.astype(np.float64)).reshape(shape)
    return np.clip(np.round(q.astype(np.float64) * ratio), -128, 127).astype(np.int8)


def fit_weight(q: np.ndarray, scale: np.ndarray, axis: int, precision: str) -> tuple[np.ndarray, np.ndarray]:
    """A symmetric INT8 weight's values and scale on ``precision``'s grid: the nearest scale where the type
    holds it (the INT8 values stay), else (below FP16's normal range) the next one up, with that channel's
    INT8 values refitted."""
    tiny = scale < FP16_NORMAL if precision == "fp16" else np.zeros(scale.shape, bool)
    fitted = np.where(tiny, on_grid(scale, precision, up=True), on_grid(scale, precision, up=False))
    fitted = fitted.astype(np.float32)
    if np.any(tiny):  # only those channels are refitted; the others keep their INT8 values
        q = refit(q, scale, np.where(tiny, fitted, scale), axis)
    return q, fitted


def symmetric_int8_weight(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    """Whether ``dq`` dequantizes an INT8 initializer with zero point 0, per tensor or per channel."""
    q = inits.get(dq.input[0])
    if q is None or q.data_type != TensorProto.INT8 or attribute(dq, "block_size", 0):
        return False
    zero = inits.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    return zero is None or not np.any(numpy_helper.to_array(zero))


def fit_scales(model: onnx.ModelProto, precision: str) -> int:
    """Put ``model``'s FP32 Q/DQ scales on ``precision``'s grid, in place; the number of scales changed.

    Only scales read by nothing but Q/DQ nodes, and INT8 weights read by nothing but their DequantizeLinear,
    are changed (not a graph output, nothing an If/Loop body reads): anything else would see other values."""
    if precision not in _MAX:
        return 0
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for t in node.input:
            readers.setdefault(t, []).append(node)
    elsewhere = {o.name for o in graph.output}.union(*(subgraph_inputs(n) for n in graph.node))
    changed = 0
    done: set[str] = set()
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 2:
            continue
        name = node.input[1]
        init = inits.get(name)
        if name in done or init is None or init.data_type != TensorProto.FLOAT or name in elsewhere:
            continue
        if any(r.op_type not in ("QuantizeLinear", "DequantizeLinear") or r.input[1] != name for r in readers[name]):
            continue
        done.add(name)
        scale = numpy_helper.to_array(init)
        if not scale.size or np.any(~np.isfinite(scale)) or np.any(scale <= 0) or np.any(scale > _MAX[precision]):
            continue
        weight = node.op_type == "DequantizeLinear" and symmetric_int8_weight(node, inits)
        if weight and (len(readers[name]) != 1 or len(readers[node.input[0]]) != 1 or node.input[0] in elsewhere):
            continue
        if not weight and node.input[0] in inits:
            continue  # a constant's quantizer other than a symmetric INT8 weight: its values would move
        if weight:
            q = inits[node.input[0]]
            values = numpy_helper.to_array(q)
            refitted, fitted = fit_weight(values, scale, int(attribute(node, "axis", 1)), precision)
            if not np.array_equal(refitted, values):
                q.CopyFrom(numpy_helper.from_array(refitted, q.name))
        elif precision == "fp16" and np.any(scale < FP16_NORMAL):
            continue  # the float-regions rewrite keeps this quantizer FP32
        else:
            fitted = on_grid(scale, precision, up=False)
        if np.array_equal(fitted, scale):
            continue
        init.CopyFrom(numpy_helper.from_array(fitted, name))
        changed += 1
    return changed
