"""FP8 (E4M3) Q/DQ from the INT8 Q/DQ model: same placement, same calibrated thresholds, FP8 grids.

Hopper, Ada and Blackwell GPUs run FP8 E4M3 layers from explicit Q/DQ (opset 19 FLOAT8E4M3FN zero
points). The scheme is symmetric like TensorRT's INT8: a tensor with threshold ``amax`` gets scale
``amax / 448`` (448 is E4M3's largest finite value), zero point 0; weights per output channel from
max |w| of the float weights (never from the INT8 values, which would round twice). E4M3 has 3
mantissa bits at every magnitude instead of INT8's uniform steps, so small values keep relative
precision and the largest lose it: which is better is a measurement, not a rule.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.graph.graph_index import GraphIndex
from pipeline.graph.model import attribute, dequantized, toposort
from pipeline.transforms.float_precision import raise_opset

E4M3_MAX = 448.0
INT8_MAX = 127.0
FP8_OPSET = 19
# what raise_opset says when the version converter cannot bring a model to FP8_OPSET
FP8_NEEDS = "FP8 Q/DQ (steps.quantize.precision: fp8) need"
FP8_REMEDY = (
    f"Set steps.quantize.precision: int8 (INT8 Q/DQ with FP32 float regions keep the model's opset), or export "
    f"the model at opset {FP8_OPSET} or later (torch.onnx.export(..., opset_version={FP8_OPSET}))."
)


def to_fp8(qdq: onnx.ModelProto, source: onnx.ModelProto) -> int:
    """Turn every symmetric INT8 Q/DQ of ``qdq`` into FP8 E4M3, in place; returns how many Q/DQ pairs
    and weight DQs changed. ``source`` is the float model ``qdq`` was built from (its weights)."""
    import ml_dtypes  # installed with onnx >= 1.18; only FP8 needs it

    raise_opset(qdq, FP8_OPSET, FP8_NEEDS, FP8_REMEDY)
    index = GraphIndex(qdq)
    inits = {i.name: i for i in qdq.graph.initializer}
    source_nodes = {n.name: n for n in source.graph.node if n.name}
    source_inits = {i.name: i for i in source.graph.initializer}
    taken = set(inits) | {t for n in qdq.graph.node for t in [*n.input, *n.output]}

    def add(values: np.ndarray, base: str) -> str:
        name = base
        while name in taken:
            name += "_"
        taken.add(name)
        qdq.graph.initializer.append(numpy_helper.from_array(values, name))
        return name

    def zero_point(shape: tuple[int, ...], base: str) -> str:
        name = base
        while name in taken:
            name += "_"
        taken.add(name)
        qdq.graph.initializer.append(
            helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, list(shape), np.zeros(int(np.prod(shape))).tolist())
        )
        return name

    changed = 0
    for q in [n for n in qdq.graph.node if n.op_type == "QuantizeLinear"]:
        scale, zp = inits.get(q.input[1]), inits.get(q.input[2]) if len(q.input) > 2 else None
        if scale is None or zp is None or zp.data_type != TensorProto.INT8 or np.any(numpy_helper.to_array(zp)):
            continue  # only symmetric INT8 has an FP8 twin (target tensorrt guarantees it)
        amax = numpy_helper.to_array(scale).astype(np.float32) * INT8_MAX
        new_scale = add((amax / E4M3_MAX).astype(np.float32), f"{q.input[1]}_fp8")
        new_zp = zero_point(tuple(zp.dims), f"{q.input[2]}_fp8")
        q.input[1], q.input[2] = new_scale, new_zp
        for dq in index.consumers(q.output[0]):
            if dq.op_type == "DequantizeLinear":
                dq.input[1], dq.input[2] = new_scale, new_zp
        changed += 1
    for dq in [n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]:
        if inits[dq.input[0]].data_type != TensorProto.INT8:
            continue
        weights = _float_weights(dq, index, inits, source_nodes, source_inits)
        axis = int(attribute(dq, "axis", 1)) if numpy_helper.to_array(inits[dq.input[1]]).size > 1 else None
        scale = _scale(weights, axis)
        shape = [1] * weights.ndim
        if axis is not None:
            shape[axis % weights.ndim] = -1
        values = np.clip(weights / scale.reshape(shape), -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
        dq.input[0] = add(values, f"{dq.input[0]}_fp8")
        dq.input[1] = add(scale.astype(np.float32), f"{dq.input[1]}_fp8")
        dq.input[2] = zero_point(scale.shape, f"{dq.input[2] if len(dq.input) > 2 else dq.input[0]}_zero_fp8")
        changed += 1
    del qdq.graph.value_info[:]  # recorded INT8 element types would contradict the FP8 ones
    toposort(qdq)
    return changed


def _float_weights(
    dq: onnx.NodeProto,
    index: GraphIndex,
    inits: dict[str, onnx.TensorProto],
    source_nodes: dict[str, onnx.NodeProto],
    source_inits: dict[str, onnx.TensorProto],
) -> np.ndarray:
    """The float weights behind a weight DequantizeLinear: the source model's initializer read at the
    same input of the same node, else (a weight the source does not name) the INT8 values dequantized."""
    for reader in index.consumers(dq.output[0]):
        original = source_nodes.get(reader.name)
        if original is None:
            continue
        for k, t in enumerate(reader.input):
            if t == dq.output[0] and k < len(original.input) and original.input[k] in source_inits:
                w = numpy_helper.to_array(source_inits[original.input[k]]).astype(np.float32)
                if list(w.shape) == list(inits[dq.input[0]].dims):
                    return w
    arrays = {name: numpy_helper.to_array(inits[name]) for name in dq.input if name in inits}
    return dequantized(dq, arrays).astype(np.float32)


def _scale(weights: np.ndarray, axis: int | None) -> np.ndarray:
    """amax / 448 per tensor (``axis`` None) or per slice along ``axis``; an all-zero slice gets 1."""
    if axis is None:
        amax = np.array(np.abs(weights).max(), np.float32)
    else:
        others = tuple(d for d in range(weights.ndim) if d != axis % weights.ndim)
        amax = np.abs(weights).max(axis=others).astype(np.float32)
    return np.where(amax > 0, amax / E4M3_MAX, 1.0).astype(np.float32)
