"""An INT8 model through this machine's fused int8 kernels against its exact integer arithmetic,
layer by layer: "the model is fine, this CPU's kernels are not" versus "the model lost accuracy".

- Static Q/DQ: the exact arithmetic is the same model with graph optimisations off (every Q/DQ in
  float); with them on, ORT fuses DequantizeLinear -> op -> QuantizeLinear into QLinearConv, QGemm...
  Each layer is run alone, as a small model from the float tensors its inputs are quantized from to
  its own QuantizeLinear, whose output a probe DequantizeLinear reads (a quantized tensor that is a graph
  output stops ORT from fusing the node that produces it).
- Dynamic (MatMulInteger): always a kernel. :func:`exact_twin` computes each MatMulInteger as a
  float64 MatMul of the same integers (exact: sums stay far below 2**53); the original MatMul's
  output, which ORT's dynamic quantizer keeps as the name of the float result, is the probe.

A layer departs when the kernels' result differs from the exact one by more than rounding: a
static layer when any element is more than 1 LSB off (requantization in fixed point rounds at most
1 LSB differently; a saturated pair sum is tens of LSBs off), a dynamic layer when its float result
differs beyond float rounding (``DYNAMIC_ROUNDING``), since both sides multiply the same integers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from pipeline.execution import runtime
from pipeline.graph.graph_index import GraphIndex
from pipeline.log import logger, progress
from pipeline.transforms.dynamic import INTEGER_OPS

DYNAMIC_ROUNDING = 1e-5  # relative RMS error of a dynamic layer's float result that is float rounding
# relative RMS difference of a model's outputs, kernels vs exact, below which no layer is looked at.
# 1-LSB requantization differences stay below it in small models (digits: 0); deep ones accumulate more
# (EfficientNet-Lite0 with 7-bit weights: 0.035), and then the layer scan finds no layer departing.
OUTPUT_ROUNDING = 0.01
MAX_PROBES = 256  # layers compared at most (evenly spaced in graph order); each is a tiny model of its own
DYNAMIC_UNIT = {"DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul"}  # one dynamic layer, run alone


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
    index = GraphIndex(model)
    out = []
    if is_dynamic(model):
        for node in model.graph.node:
            tensor = _float_result(index, node.output[0]) if node.op_type == "MatMulInteger" else None
            if tensor:  # ORT's dynamic quantizer names its nodes "<original>_quant" / "<original>_MatMul_quant"
                out.append(Probe(tensor, node.name.removesuffix("_quant").removesuffix("_MatMul"), None))
        return out
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in index.arrays:
            src = index.producer(n.input[0])
            out.append(Probe(n.output[0], src.name if src is not None else n.input[0], n.input[1]))
    return out


def _float_result(index: GraphIndex, start: str) -> str | None:
    """Follow the single-consumer chain after a MatMulInteger (Cast, Mul by the scales, Add bias) to
    its last float tensor."""
    tensor, steps = start, 0
    while len(readers := index.consumers(tensor)) == 1 and readers[0].op_type in ("Cast", "Mul", "Add"):
        tensor, steps = readers[0].output[0], steps + 1
    return tensor if steps else None


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """RMS of ``a - b`` over RMS of ``b`` (0 for equal arrays)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ref = float(np.sqrt((b**2).sum()))
    err = float(np.sqrt(((a - b) ** 2).sum()))
    return err / ref if ref > 0 else float(err > 0)


def _walk(index: GraphIndex, output: str, stop: set[str], through: Any) -> tuple[list[onnx.NodeProto], set[str]]:
    """The nodes ``output`` is computed from, back to tensors in ``stop``, initializers, graph inputs or
    tensors whose producer ``through(node)`` refuses; returns them in graph order with those inputs."""
    seen: set[int] = set()
    inputs: set[str] = set()
    todo = [output]
    while todo:
        t = todo.pop()
        node = index.producer(t)
        if t in index.arrays or not t:
            continue
        if node is None or (t in stop and t != output) or (t != output and not through(node)):
            inputs.add(t)
            continue
        if id(node) not in seen:
            seen.add(id(node))
            todo.extend(node.input)
    return [n for n in index.graph.node if id(n) in seen], inputs


def _unit_model(
    model: onnx.ModelProto, nodes: list[onnx.NodeProto], inputs: dict[str, np.ndarray], output: str
) -> onnx.ModelProto:
    """A model of ``nodes`` alone, reading ``inputs`` (their values give the types) and giving ``output``."""
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(
        nodes,
        "unit",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), None) for k, v in inputs.items()],
        [helper.make_value_info(output, onnx.TypeProto())],
        [i for i in model.graph.initializer if i.name in used],
    )
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def compare(
    kernels_model: onnx.ModelProto,
    exact_model: onnx.ModelProto | None,
    feeds: list[dict[str, np.ndarray]],
    max_probes: int = MAX_PROBES,
) -> list[dict[str, Any]]:
    """Per layer, in graph order (at most ``max_probes``, evenly spaced), on the exact values of its own
    inputs: the relative RMS error of this CPU's kernels against the exact arithmetic, the share of
    elements more than 1 LSB off (static), and whether it departs.

    Each layer runs alone, from the float tensors its quantized inputs are made of (or a dynamic
    layer's float input), fed from one exact run of the whole model: an error is charged to the layer
    that makes it, not to every layer after it.

    ``exact_model``: a dynamic model's :func:`exact_twin`; None for a Q/DQ model."""
    found = probes(kernels_model)
    if len(found) > max_probes:
        found = [found[round(k * (len(found) - 1) / (max_probes - 1))] for k in range(max_probes)]
    exact_model = exact_model or kernels_model
    # built once for every layer's walk (not once per walk): up to MAX_PROBES walks over the same graph
    kernels = GraphIndex(kernels_model)
    exact = kernels if exact_model is kernels_model else GraphIndex(exact_model)
    # the float tensors QuantizeLinear nodes read: a unit starts there, Q and DQ included, so that ORT
    # rewrites it as it rewrites the whole model (int8 activations become uint8 only with their Q in view)
    quantized = {n.input[0]: n.output[0] for n in kernels_model.graph.node if n.op_type == "QuantizeLinear"}
    units = []
    for p in found:
        if p.scale is not None:  # static: back to the float tensors the quantized inputs are made from
            own = {t for t, q in quantized.items() if q == p.tensor}
            nodes, inputs = _walk(kernels, p.tensor, set(quantized) - own, lambda n: True)
        else:  # dynamic: the MatMulInteger, its run-time quantization and its rescaling
            nodes, inputs = _walk(kernels, p.tensor, set(), lambda n: n.op_type in DYNAMIC_UNIT)
        units.append((p, nodes, inputs))
    wanted = sorted(set().union(*(u[2] for u in units))) if units else []
    full = onnx.ModelProto()
    full.CopyFrom(exact_model)
    have = {o.name for o in full.graph.output}
    full.graph.output.extend(helper.make_value_info(t, onnx.TypeProto()) for t in wanted if t not in have)
    exact_run = runtime.session(full, optimize=False)
    scales = kernels.arrays
    pairs: list[tuple[Any, Any]] = []  # per unit: its kernel session and its exact one, built on the first feed
    # per unit: sum of squared error, of squared exact value, elements more than 1 LSB off, elements
    sums = np.zeros((len(units), 4))
    # one feed's tensors alive at a time: the memory a validation batch already takes
    for feed in progress(feeds, "validate: the int8 kernels layer by layer", total=len(feeds), unit="batches"):
        values = dict(zip(wanted, exact_run.run(wanted, feed))) if wanted else {}
        if not pairs:
            pairs = [_unit_sessions(kernels_model, exact_model, exact, u, values) for u in units]
        for k, ((p, _, inputs), (fast, slow)) in enumerate(zip(units, pairs)):
            x = {name: values[name] for name in inputs}
            a = np.asarray(fast.run(None, x)[0], np.float64).reshape(-1)
            b = np.asarray(slow.run(None, x)[0], np.float64).reshape(-1)
            scale = scales.get(p.scale) if p.scale is not None else None
            off = float((np.abs(a - b) > 1.5 * float(scale)).sum()) if scale is not None and scale.size == 1 else 0.0
            sums[k] += (((a - b) ** 2).sum(), (b**2).sum(), off, a.size)
    rows = []
    for (p, _, _), (err, ref, off, count) in zip(units, sums):
        rel = float(np.sqrt(err / ref)) if ref > 0 else float(err > 0)
        row: dict[str, Any] = {"node": p.node, "tensor": p.tensor, "relative_error": rel}
        scale = scales.get(p.scale) if p.scale is not None else None
        if scale is not None and scale.size == 1:
            row["share_off_by_more_than_1_lsb"] = float(off / max(count, 1))
            # requantizing rounds at most 1 LSB differently: anything more is not rounding
            row["departs"] = bool(off > 0)
        else:  # dynamic: the same integers either way, so the float results agree to float rounding
            row["departs"] = rel > DYNAMIC_ROUNDING
        rows.append(row)
    return rows


def _unit_sessions(
    kernels_model: onnx.ModelProto,
    exact_model: onnx.ModelProto,
    exact: GraphIndex,
    unit: tuple[Probe, list[onnx.NodeProto], set[str]],
    values: dict[str, np.ndarray],
) -> tuple[Any, Any]:
    """One layer alone, through the kernels (optimised) and exactly (unoptimised); ``exact`` indexes
    ``exact_model``."""
    p, nodes, inputs = unit
    output = p.tensor
    exact_nodes = _walk(exact, p.tensor, inputs, lambda n: True)[0]
    if p.scale is not None:  # a probe DequantizeLinear: the quantized tensor must not be a graph output
        q = next(n for n in nodes if n.op_type == "QuantizeLinear" and n.output[0] == p.tensor)
        output = f"{p.tensor}_int8pipe_probe"
        probe = helper.make_node("DequantizeLinear", [p.tensor, *q.input[1:]], [output])
        nodes, exact_nodes = [*nodes, probe], [*exact_nodes, probe]
    example = {k: values[k] for k in inputs}
    fast = runtime.session(_unit_model(kernels_model, nodes, example, output), optimize=True)
    slow = runtime.session(_unit_model(exact_model, exact_nodes, example, output), optimize=False)
    return fast, slow


def check(
    int8_model: onnx.ModelProto,
    twin: onnx.ModelProto | None,
    sessions: tuple[Any, Any],
    feeds: list[dict[str, np.ndarray]],
) -> tuple[float, list[dict[str, Any]]]:
    """How far the model's outputs through the kernels (``sessions[0]``) are from the exact ones
    (``sessions[1]``), relative RMS, worst output; and, when beyond ``OUTPUT_ROUNDING``, the layer
    table of :func:`compare` (empty otherwise: it costs two small sessions per layer)."""
    names = [o.name for o in sessions[0].get_outputs()]
    runs = [[s.run(names, f) for f in feeds] for s in sessions]
    error = max(
        relative_error(np.concatenate([r[k] for r in runs[0]]), np.concatenate([r[k] for r in runs[1]]))
        for k in range(len(names))
    )
    if error <= OUTPUT_ROUNDING:
        return error, []
    logger.info("validate: the int8 kernels' outputs differ from the exact ones; comparing layer by layer")
    return error, compare(int8_model, twin, feeds)


def first_departures(rows: list[dict[str, Any]], n: int = 3) -> list[str]:
    """The first ``n`` layers, in graph order, whose kernel result departs from the exact one: where
    the error starts (what comes after inherits it)."""
    return [r["node"] for r in rows if r["departs"]][:n]
