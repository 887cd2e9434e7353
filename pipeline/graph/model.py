"""ONNX model helpers: loading with clear errors, hashing, preparation and inspection."""

from __future__ import annotations

import hashlib
import heapq
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.errors import ModelError, fail
from pipeline.graph.layout import Layout

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}

# Ops that only appear in a model that is already quantized: re-quantizing one would stack a second
# set of scales on the first and report the result as a fresh INT8 model.
QUANTIZED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    # com.microsoft contrib ops written by ONNX Runtime's quantizers
    "QLinearAdd",
    "QLinearMul",
    "QLinearAveragePool",
    "QLinearGlobalAveragePool",
    "QLinearConcat",
    "QLinearSigmoid",
    "QLinearLeakyRelu",
    "QLinearSoftmax",
    "QLinearWhere",
    "QGemm",
    "QAttention",
    "QEmbedLayerNormalization",
    "DynamicQuantizeMatMul",
    "DynamicQuantizeLSTM",
    "MatMulIntegerToFloat",
    "MatMulNBits",
    "GatherBlockQuantized",
}


def load(path: str | Path, check: bool = True, label: str | None = None) -> onnx.ModelProto:
    """Load an ONNX model, turning every way it can be unreadable into a ModelError.

    ``label`` names the model in messages when ``path`` is a temporary download (e.g. its URI).
    """
    p = Path(path)
    name = label or str(p)
    if not p.is_file():
        fail(ModelError, f"model file not found: {name}.")
    try:
        model = onnx.load(str(p))
    except Exception as exc:  # protobuf raises several unrelated types on corrupt bytes
        fail(ModelError, f"{name} is not a readable ONNX model ({type(exc).__name__}: {exc}). Re-export it.")
    if not model.graph.node:
        fail(ModelError, f"{name} has an empty graph: is it really an ONNX model?")
    if check:
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            fail(ModelError, f"{name} fails the ONNX checker: {str(exc).splitlines()[0]}")
    return model


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    out = []
    for node in graph.node:
        out.append(node)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                out.extend(_all_nodes(sub))
    return out


def quantized_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Op type -> count of the ops (subgraphs included) that mark ``model`` as already quantized."""
    return dict(sorted(Counter(n.op_type for n in _all_nodes(model.graph) if n.op_type in QUANTIZED_OPS).items()))


def refuse_quantized(model: onnx.ModelProto, label: str, where: str) -> None:
    """A ModelError naming the quantization ops when ``model`` is not an FP32 model."""
    found = quantized_ops(model)
    if found:
        ops = ", ".join(f"{op} ×{n}" for op, n in found.items())
        fail(
            ModelError,
            f"{where}: {label} is already quantized (it contains {ops}). int8pipe quantizes FP32 models: "
            "point model: at the FP32 model this one was made from (its original ONNX export, registry "
            "version or PyTorch factory).",
        )


def subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names a node's subgraphs (If/Loop/Scan bodies) read: they order it like inputs."""
    used: set[str] = set()
    for attr in node.attribute:
        for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            local = {i.name for i in sub.input} | {i.name for i in sub.initializer}
            for n in sub.node:
                local.update(n.output)
            for n in sub.node:
                used.update(i for i in n.input if i and i not in local)
                used.update(subgraph_inputs(n) - local)
    return used


def toposort(model: onnx.ModelProto) -> None:
    """Order ``model.graph.node`` so every node follows the producers of its inputs, in place.

    Stable: nodes already in order keep their relative order. ONNX Runtime's quantizer appends the
    Quantize/DequantizeLinear nodes it creates at the end of the graph, which ONNX Runtime accepts
    but the ONNX checker (and so ``mlflow.onnx.load_model``) rejects.
    """
    graph = model.graph
    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps = [
        {producer[t] for t in (set(n.input) | subgraph_inputs(n)) if t in producer and producer[t] != i}
        for i, n in enumerate(nodes)
    ]
    users: list[list[int]] = [[] for _ in nodes]
    for i, ds in enumerate(deps):
        for d in ds:
            users[d].append(i)
    waiting = [len(ds) for ds in deps]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise ValueError("the graph has a cycle; it cannot be sorted topologically")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def save_checked(model: onnx.ModelProto, path: str | Path) -> None:
    """Write a model int8pipe produced, sorted and passing the full ONNX checker.

    Every model int8pipe writes must load with ``onnx.checker.check_model(full_check=True)`` and
    so with ``mlflow.onnx.load_model``; a failure here is a bug in int8pipe, not a user error.
    """
    toposort(model)
    drop_unused_initializers(model)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)  # by path: models over 2 GB are checked too


def drop_unused_initializers(model: onnx.ModelProto) -> int:
    """Remove initializers nothing reads (e.g. a quantized bias that bias correction replaced): ORT
    warns about each on every load, and they only take space. Returns how many went."""
    g = model.graph
    used = {i for n in _all_nodes(g) for i in n.input} | {o.name for o in g.output} | {i.name for i in g.input}
    keep = [i for i in g.initializer if i.name in used]
    dropped = len(g.initializer) - len(keep)
    if dropped:
        del g.initializer[:]
        g.initializer.extend(keep)
    return dropped


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: graph inputs that are not initializers (older exporters list both)."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def input_specs(model: onnx.ModelProto) -> dict[str, tuple[list[int | str], np.dtype]]:
    """Per input: shape (ints for fixed dims, names for symbolic ones) and numpy dtype."""
    specs = {}
    for vi in graph_inputs(model):
        tt = vi.type.tensor_type
        dims: list[int | str] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        specs[vi.name] = (dims, onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
    return specs


def name_taker(model: onnx.ModelProto) -> Callable[[str], str]:
    """A function that returns ``base``, or ``base`` with underscores appended, unused by ``model``'s
    tensors and initializers and by the names it returned before."""
    graph = model.graph
    taken = {t for n in graph.node for t in [*n.input, *n.output]} | {i.name for i in graph.initializer}

    def take(base: str) -> str:
        name = base
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    return take


def attribute(node: onnx.NodeProto, name: str, default: Any) -> Any:
    """The value of ``node``'s attribute ``name``, or ``default`` when it does not set it."""
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def dequantized(dq: onnx.NodeProto, inits: Mapping[str, np.ndarray]) -> np.ndarray:
    """The float64 values a DequantizeLinear of an initializer produces (per-tensor or per-axis)."""
    q = inits[dq.input[0]].astype(np.float64)
    scale = inits[dq.input[1]].astype(np.float64)
    zp = inits[dq.input[2]].astype(np.float64) if len(dq.input) > 2 and dq.input[2] else np.zeros_like(scale)
    if scale.ndim == 1 and scale.size > 1:  # per channel along `axis`
        axis = int(attribute(dq, "axis", 1))
        shape = [1] * q.ndim
        shape[axis % q.ndim] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (q - zp) * scale


def append_reduce(graph: onnx.GraphProto, op: str, source: str, out: str, axes: list[int], opset: int) -> None:
    """Append ``op`` (ReduceMean, ReduceMax, ...) of ``source`` over ``axes`` to ``graph``, dims dropped:
    axes are an attribute before opset 18 and an input from 18 on."""
    if opset >= 18:
        graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), f"{out}_axes"))
        graph.node.append(helper.make_node(op, [source, f"{out}_axes"], [out], keepdims=0))
    else:
        graph.node.append(helper.make_node(op, [source], [out], axes=axes, keepdims=0))


def opset_of(model: onnx.ModelProto, default: int = 13) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default)


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Move the main graph's Constant nodes into initializers of the same name, in place; returns how many.

    Some exporters (Paddle2ONNX, older TensorFlow converters) write every weight as a Constant node.
    Quantizers find weights among initializers only; left as Constants, a Conv's weight looks like
    an activation without a range and the Conv stays float.
    """
    if model.ir_version < 4:  # initializers had to be graph inputs too: leave such models alone
        return 0
    kept: list[onnx.NodeProto] = []
    moved = 0
    for node in model.graph.node:
        tensor = None
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            attr = node.attribute[0]
            if attr.name == "value":
                tensor = numpy_helper.to_array(attr.t)
            elif attr.name in ("value_float", "value_floats"):
                tensor = np.array(helper.get_attribute_value(attr), np.float32)
            elif attr.name in ("value_int", "value_ints"):
                tensor = np.array(helper.get_attribute_value(attr), np.int64)
        if tensor is None:
            kept.append(node)
            continue
        model.graph.initializer.append(numpy_helper.from_array(tensor, node.output[0]))
        moved += 1
    if moved:
        del model.graph.node[:]
        model.graph.node.extend(kept)
    return moved


def set_dynamic_batch(model: onnx.ModelProto, name: str = "batch", layout: Layout | None = None) -> None:
    """Make the first axis of every graph input and output symbolic.

    With a declared ``layout`` (a stateful model: ``batch_axes``, ``constants``) only the inputs'
    sample axes are touched, and only where they are fixed: a constant keeps its shape, and a
    symbolic batch dim keeps its name, which is what ties an output's sample axis to the inputs'
    (see :func:`pipeline.graph.layout.output_axes`); an output gets a symbolic first axis only if it has
    no symbolic dim at all.
    """
    if layout is not None and layout.declared:
        for vi in graph_inputs(model):
            axis = layout.axis(vi.name)
            dims = vi.type.tensor_type.shape.dim
            if axis is not None and axis < len(dims) and not dims[axis].dim_param:
                dims[axis].ClearField("dim_value")
                dims[axis].dim_param = name
        for vi in model.graph.output:
            dims = vi.type.tensor_type.shape.dim
            if len(dims) and not any(d.dim_param for d in dims):
                dims[0].ClearField("dim_value")
                dims[0].dim_param = name
    else:
        for vi in list(graph_inputs(model)) + list(model.graph.output):
            dims = vi.type.tensor_type.shape.dim
            if len(dims):
                dims[0].ClearField("dim_value")
                dims[0].dim_param = name
    del model.graph.value_info[:]  # stale fixed-batch shapes; re-inferred below
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        model.graph.value_info.extend(inferred.graph.value_info)
    except Exception:  # shape inference is an aid, not a requirement
        pass


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """tensor name -> ONNX element type, as far as shape inference knows."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    types.update({vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.input})
    types.update({vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.output})
    return types


def activation_tensors(model: onnx.ModelProto) -> list[str]:
    """Float tensors computed at run time (graph inputs and node outputs), in graph order.

    These are what calibration measures; weights and constant subgraphs are excluded.
    """
    types = tensor_types(model)
    constant = {i.name for i in model.graph.initializer}
    names = [vi.name for vi in graph_inputs(model) if types.get(vi.name) in FLOAT_TYPES]
    for node in model.graph.node:
        if node.op_type == "Constant" or (node.input and all(i in constant or not i for i in node.input)):
            constant.update(node.output)
            continue
        names.extend(o for o in node.output if o and types.get(o) in FLOAT_TYPES)
    return names


def name_nodes(model: onnx.ModelProto) -> int:
    """Give every unnamed node a unique name (op type and position); returns how many were named.

    Exclusion lists, ORT's quantizer and the per-node tables all address nodes by name.
    """
    taken = {n.name for n in model.graph.node if n.name}
    named = 0
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name, k = f"{node.op_type}_{i}", 0
            while name in taken:
                k += 1
                name = f"{node.op_type}_{i}_{k}"
            node.name = name
            taken.add(name)
            named += 1
    return named


def producers(model: onnx.ModelProto) -> dict[str, str]:
    """tensor name -> op type of the node that produces it ('input' for graph inputs)."""
    out = {vi.name: "input" for vi in graph_inputs(model)}
    for node in model.graph.node:
        for o in node.output:
            out[o] = node.op_type
    return out


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def summary(model: onnx.ModelProto) -> dict[str, Any]:
    """Op counts, parameter count, inputs and outputs: what a reviewer wants before opening Netron."""

    def io(vis: Any) -> list[dict[str, Any]]:
        rows = []
        for vi in vis:
            tt = vi.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim]
            rows.append({"name": vi.name, "shape": dims, "dtype": TensorProto.DataType.Name(tt.elem_type)})
        return rows

    params = sum(int(np.prod(i.dims)) if i.dims else 1 for i in model.graph.initializer)
    return {
        "num_nodes": len(model.graph.node),
        "num_params": params,
        "op_counts": op_counts(model),
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "inputs": io(graph_inputs(model)),
        "outputs": io(model.graph.output),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
    }
