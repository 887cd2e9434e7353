"""An INT8 model through this machine's fused int8 kernels against its exact integer arithmetic,
layer by layer: "the model is fine, this CPU's kernels are not" versus "the model lost accuracy".

- Static Q/DQ: the exact arithmetic is the same model with graph optimisations off (every Q/DQ in
  float); with them on, ORT fuses DequantizeLinear -> op -> QuantizeLinear into QLinearConv, QGemm...
  A layer is read from the model cut after its QuantizeLinear (:func:`truncated`): a graph output or
  an extra consumer on a quantized tensor would change what ORT fuses before it.
- Dynamic (MatMulInteger): always a kernel. :func:`exact_twin` computes each MatMulInteger as a
  float64 MatMul of the same integers (exact: sums stay far below 2**53); the original MatMul's
  output, which ORT's dynamic quantizer keeps as the name of the float result, is the probe.

A tensor departs when the kernels' values differ from the exact ones by more than rounding:
``DEPARTS`` relative RMS error. Requantization rounds differently by at most 1 LSB per element,
which stays well below that; a saturated pair sum is tens of LSBs off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from pipeline import runtime

DEPARTS = 0.02  # relative RMS error of a tensor, kernels vs exact, beyond which it departs
MAX_PROBES = 48  # layer results compared at most (evenly spaced in graph order)
INTEGER_OPS = {"MatMulInteger", "ConvInteger"}


def is_dynamic(model: onnx.ModelProto) -> bool:
    return any(n.op_type in INTEGER_OPS for n in model.graph.node)


def exact_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every MatMulInteger computed as a float64 MatMul of the same integers (the
    arithmetic a non-saturating kernel performs), its int32 result cast back. ConvInteger is left
    as it is (int8pipe's dynamic mode does not write it)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes: list[onnx.NodeProto] = []
    for k, node in enumerate(out.graph.node):
        if node.op_type != "MatMulInteger":
            nodes.append(node)
            continue
        p = f"int8pipe_exact_{k}"
        operands = []
        for side, (x, zero) in enumerate(zip(node.input[:2], [*node.input[2:4], "", ""][:2])):
            nodes.append(helper.make_node("Cast", [x], [f"{p}_{side}"], to=TensorProto.DOUBLE))
            value = f"{p}_{side}"
            if zero:
                nodes.append(helper.make_node("Cast", [zero], [f"{p}_{side}_zp"], to=TensorProto.DOUBLE))
                nodes.append(helper.make_node("Sub", [value, f"{p}_{side}_zp"], [f"{p}_{side}_centred"]))
                value = f"{p}_{side}_centred"
            operands.append(value)
        nodes.append(helper.make_node("MatMul", operands, [f"{p}_product"]))
        nodes.append(helper.make_node("Cast", [f"{p}_product"], [node.output[0]], to=TensorProto.INT32))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


@dataclass
class Probe:
    tensor: str  # what is read: a QuantizeLinear output (static) or a dynamic MatMul's float result
    node: str  # the node whose result it is
    scale: str | None  # the quantization scale (static), to count LSBs and dequantize


def probes(model: onnx.ModelProto) -> list[Probe]:
    """The layer results of ``model`` worth comparing, in graph order."""
    if is_dynamic(model):
        out = []
        for node in model.graph.node:
            tensor = _float_result(model, node.output[0]) if node.op_type == "MatMulInteger" else None
            if tensor:  # ORT's dynamic quantizer names its nodes "<original>_quant" / "<original>_MatMul_quant"
                out.append(Probe(tensor, node.name.removesuffix("_quant").removesuffix("_MatMul"), None))
        return out
    inits = {i.name for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    return [
        Probe(n.output[0], producer[n.input[0]].name if n.input[0] in producer else n.input[0], n.input[1])
        for n in model.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits
    ]


def truncated(model: onnx.ModelProto, probe: Probe) -> onnx.ModelProto:
    """``model`` cut after ``probe``'s tensor, which becomes the only output (dequantized for a
    static probe). Everything after it is gone, so nothing new consumes it: adding a consumer or a
    graph output to a quantized tensor changes what ORT fuses, which is what is being measured."""
    producer = {o: n for n in model.graph.node for o in n.output}
    needed, todo = set(), [probe.tensor]
    while todo:
        node = producer.get(todo.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            todo.extend(i for i in node.input if i)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = [n for n in model.graph.node if id(n) in needed]
    del out.graph.node[:]
    out.graph.node.extend(keep)
    del out.graph.output[:]
    result = probe.tensor
    if probe.scale is not None:
        q = next(n for n in keep if n.op_type == "QuantizeLinear" and n.output[0] == probe.tensor)
        result = f"{probe.tensor}_int8pipe_probe"
        out.graph.node.append(helper.make_node("DequantizeLinear", [probe.tensor, *q.input[1:]], [result]))
    out.graph.output.append(helper.make_value_info(result, onnx.TypeProto()))
    used = {i for n in out.graph.node for i in n.input}
    kept_inits = [i for i in out.graph.initializer if i.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept_inits)
    kept_inputs = [i for i in out.graph.input if i.name in used]
    del out.graph.input[:]
    out.graph.input.extend(kept_inputs)
    return out


def _float_result(model: onnx.ModelProto, start: str) -> str | None:
    """Follow the single-consumer chain after a MatMulInteger (Cast, Mul by the scales, Add bias) to
    its last float tensor."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    tensor, steps = start, 0
    while len(consumers.get(tensor, [])) == 1 and consumers[tensor][0].op_type in ("Cast", "Mul", "Add"):
        tensor, steps = consumers[tensor][0].output[0], steps + 1
    return tensor if steps else None


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """RMS of ``a - b`` over RMS of ``b`` (0 for equal arrays)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ref = float(np.sqrt((b**2).sum()))
    err = float(np.sqrt(((a - b) ** 2).sum()))
    return err / ref if ref > 0 else float(err > 0)


def compare(
    kernels_model: onnx.ModelProto,
    exact_model: onnx.ModelProto | None,
    feeds: list[dict[str, np.ndarray]],
    max_probes: int = MAX_PROBES,
) -> list[dict[str, Any]]:
    """Per layer result, in graph order (at most ``max_probes``, evenly spaced): the relative RMS
    error of this CPU's kernels against the exact arithmetic, the share of elements more than 1 LSB
    off (static), and whether it departs. One pair of sessions per probe, each on a cut model.

    ``exact_model``: a dynamic model's :func:`exact_twin`; None for a Q/DQ model (run unoptimised)."""
    found = probes(kernels_model)
    if len(found) > max_probes:
        found = [found[round(k * (len(found) - 1) / (max_probes - 1))] for k in range(max_probes)]
    scales = {i.name: onnx.numpy_helper.to_array(i) for i in kernels_model.graph.initializer}
    rows = []
    for p in found:
        fast = runtime.session(truncated(kernels_model, p).SerializeToString(), optimize=True)
        slow = runtime.session(truncated(exact_model or kernels_model, p).SerializeToString(), optimize=False)
        names = {i.name for i in fast.get_inputs()}
        pairs = [(fast.run(None, f2)[0], slow.run(None, f2)[0]) for f2 in ({k: v for k, v in f.items() if k in names}
                                                                             for f in feeds)]  # fmt: skip
        a = np.concatenate([x.reshape(-1) for x, _ in pairs]).astype(np.float64)
        b = np.concatenate([y.reshape(-1) for _, y in pairs]).astype(np.float64)
        rel = relative_error(a, b)
        row: dict[str, Any] = {"node": p.node, "tensor": p.tensor, "relative_error": rel}
        scale = scales.get(p.scale) if p.scale is not None else None
        if scale is not None and scale.size == 1:
            row["share_off_by_more_than_1_lsb"] = float((np.abs(a - b) > 1.5 * float(scale)).mean())
        row["departs"] = rel > DEPARTS
        rows.append(row)
    return rows


def first_departures(rows: list[dict[str, Any]], n: int = 3) -> list[str]:
    """The first ``n`` layers, in graph order, whose kernel result departs from the exact one: where
    the error starts (what comes after inherits it)."""
    return [r["node"] for r in rows if r["departs"]][:n]
