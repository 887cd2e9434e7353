"""The type rules a TensorRT 11 (strongly typed) build enforces on a Q/DQ model, checked before any GPU.

TensorRT 11 builds every network strongly typed: no precision is chosen for a layer, each runs in
the type its tensors carry, and a model that breaks the rules fails to parse or build on the GPU
host, long after it was validated. Each rule here is one such fact, with the fix:

- ``qdq-constant``: Q/DQ scales and zero points are build-time constants (initializers).
- ``qdq-scale``: scales are finite and positive.
- ``qdq-zero-point``: zero points are 0 and INT8 or FP8 E4M3 (TensorRT quantizes symmetrically; no UINT8).
- ``qdq-type``: a QuantizeLinear's input has its scale's type; a DequantizeLinear outputs its scale's type.
- ``activation-per-tensor``: an activation (a tensor computed at run time) has one scale.
- ``weight-axis``: per-channel weight scales run along the reader's output channels.
- ``mixed-types``: the float inputs of an op whose inputs share one type T do share it (no implicit casts).
- ``typed-qdq-opset``: FP16/BF16 scales and FP8 zero points need opset 19.
- ``no-float64``: TensorRT has no FP64 layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from pipeline.graph.model import attribute, opset_of, tensor_types

QDQ = ("QuantizeLinear", "DequantizeLinear")
ZERO_POINT_TYPES = (TensorProto.INT8, TensorProto.FLOAT8E4M3FN)
FLOAT = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
# ops whose data inputs (by index) must share one float type T
SAME_TYPE_INPUTS = {
    "Conv": (0, 1, 2), "ConvTranspose": (0, 1, 2), "MatMul": (0, 1), "Gemm": (0, 1, 2), "Add": (0, 1),
    "Sub": (0, 1), "Mul": (0, 1), "Div": (0, 1), "Concat": None, "Max": None, "Min": None, "Sum": None,
    "BatchNormalization": (0, 1, 2), "LayerNormalization": (0, 1, 2), "PRelu": (0, 1), "Clip": (0, 1, 2),
}  # fmt: skip


@dataclass(frozen=True)
class Finding:
    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node}: {self.message}"


def lint(model: onnx.ModelProto) -> list[Finding]:
    """Every break of the strongly typed rules in ``model`` (empty: TensorRT 11 can type it as written)."""
    inits = {i.name: i for i in model.graph.initializer}
    types = tensor_types(model)
    types.update({name: i.data_type for name, i in inits.items()})
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for t in node.input:
            readers.setdefault(t, []).append(node)
    found: list[Finding] = []
    for k, node in enumerate(model.graph.node):
        name = node.name or f"#{k} {node.op_type}"
        if node.op_type in QDQ:
            found += _qdq(node, name, inits, types, readers, opset_of(model))
        found += _mixed(node, name, types)
        if any(types.get(t) == TensorProto.DOUBLE for t in [*node.input, *node.output] if t):
            found.append(Finding("no-float64", name, "reads or writes float64; cast to float32 or float16"))
    return found


def _qdq(
    node: onnx.NodeProto,
    name: str,
    inits: dict[str, onnx.TensorProto],
    types: dict[str, int],
    readers: dict[str, list[onnx.NodeProto]],
    opset: int,
) -> list[Finding]:
    out: list[Finding] = []
    scale_name = node.input[1] if len(node.input) > 1 else ""
    zp_name = node.input[2] if len(node.input) > 2 else ""
    scale, zp = inits.get(scale_name), inits.get(zp_name)
    if scale is None or (zp_name and zp is None):
        out.append(Finding("qdq-constant", name, "scale and zero point must be initializers (build-time constants)"))
        return out
    s = numpy_helper.to_array(scale).astype(np.float64)
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        out.append(Finding("qdq-scale", name, f"scales must be finite and positive (min {s.min():.3g})"))
    if zp is None:
        zp_type: int = TensorProto.UINT8  # ONNX's default zero point without one: uint8
    else:
        zp_type = zp.data_type
        if np.any(numpy_helper.to_array(zp).astype(np.float64) != 0):
            out.append(Finding("qdq-zero-point", name, "zero points must be 0: TensorRT quantizes symmetrically"))
    if zp_type not in ZERO_POINT_TYPES:
        kind = onnx.helper.tensor_dtype_to_string(zp_type).split(".")[-1]
        out.append(Finding("qdq-zero-point", name, f"{kind} zero point: TensorRT takes INT8 or FLOAT8E4M3FN"))
    side = node.input[0] if node.op_type == "QuantizeLinear" else node.output[0]
    if types.get(side) is not None and types[side] != scale.data_type:
        what = "input" if node.op_type == "QuantizeLinear" else "output"
        detail = f"its {what} {side} is {_type(types[side])}, its scale {_type(scale.data_type)}"
        out.append(Finding("qdq-type", name, detail))
    if (scale.data_type != TensorProto.FLOAT or zp_type == TensorProto.FLOAT8E4M3FN) and opset < 19:
        detail = f"a {_type(scale.data_type)} scale or FP8 zero point needs opset 19 (model: {opset})"
        out.append(Finding("typed-qdq-opset", name, detail))
    per_axis = s.size > 1
    if node.op_type == "QuantizeLinear" and node.input[0] not in inits and per_axis:
        out.append(Finding("activation-per-tensor", name, f"activation {node.input[0]} has {s.size} scales; use one"))
    if node.op_type == "DequantizeLinear" and node.input[0] in inits and per_axis:
        out += _weight_axis(node, name, inits[node.input[0]], readers)
    return out


def _weight_axis(
    dq: onnx.NodeProto, name: str, weight: onnx.TensorProto, readers: dict[str, list[onnx.NodeProto]]
) -> list[Finding]:
    rank = len(weight.dims)
    axis = int(attribute(dq, "axis", 1)) % max(rank, 1)
    out = []
    for reader in readers.get(dq.output[0], []):
        want = _output_channel_axis(reader, dq.output[0], rank)
        if want is not None and axis != want:
            out.append(Finding("weight-axis", name, f"per-channel axis {axis}, but {reader.op_type} {reader.name!r} "
                                                     f"has its output channels on axis {want}"))  # fmt: skip
    return out


def _output_channel_axis(reader: onnx.NodeProto, weight: str, rank: int) -> int | None:
    if reader.op_type == "Conv" and reader.input[1] == weight:
        return 0
    if reader.op_type == "ConvTranspose" and reader.input[1] == weight:
        return 1
    if reader.op_type == "Gemm" and reader.input[1] == weight:
        return 0 if attribute(reader, "transB", 0) else 1
    if reader.op_type == "MatMul" and len(reader.input) > 1 and reader.input[1] == weight:
        return rank - 1
    return None


def _mixed(node: onnx.NodeProto, name: str, types: dict[str, int]) -> list[Finding]:
    if node.op_type not in SAME_TYPE_INPUTS:
        return []
    positions = SAME_TYPE_INPUTS[node.op_type] or range(len(node.input))
    seen = {types[node.input[i]] for i in positions if i < len(node.input) and node.input[i] in types}
    seen &= set(FLOAT)
    if len(seen) <= 1:
        return []
    listed = ", ".join(sorted(_type(t) for t in seen))
    return [Finding("mixed-types", name, f"float inputs of {listed}: insert a Cast so they share one type")]


def _type(elem_type: int) -> str:
    return onnx.helper.tensor_dtype_to_string(elem_type).split(".")[-1]
