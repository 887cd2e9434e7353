"""ONNX model helpers: loading with clear errors, hashing, preparation and inspection."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from pipeline.errors import ModelError, fail

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


def load(path: str | Path, check: bool = True) -> onnx.ModelProto:
    """Load an ONNX model, turning every way it can be unreadable into a ModelError."""
    p = Path(path)
    if not p.is_file():
        fail(ModelError, f"model file not found: {p}.")
    try:
        model = onnx.load(str(p))
    except Exception as exc:  # protobuf raises several unrelated types on corrupt bytes
        fail(ModelError, f"{p} is not a readable ONNX model ({type(exc).__name__}: {exc}). Re-export it.")
    if not model.graph.node:
        fail(ModelError, f"{p} has an empty graph: is it really an ONNX model?")
    if check:
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            fail(ModelError, f"{p} fails the ONNX checker: {str(exc).splitlines()[0]}")
    return model


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


def set_dynamic_batch(model: onnx.ModelProto, name: str = "batch") -> None:
    """Make the first axis of every graph input and output symbolic."""
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
