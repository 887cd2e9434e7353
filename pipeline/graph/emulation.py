"""Run FP16/BF16 models on a CPU with the numbers an FP16/BF16 engine computes.

ONNX Runtime's CPU provider has few FP16 kernels on x86 and fewer BF16 ones. For a node without
one it inserts Casts to FP32 around the node, and then removes each Cast pair FP32 -> FP16 -> FP32
it finds between two such nodes: the roundings vanish and a "FP16" model computes in FP32, except
for its FP16-stored weights. So a model written for TensorRT is validated on a twin in which every
node that reads or writes FP16/BF16 computes in FP32 between explicit Casts (which ORT keeps): its
inputs widened exactly, its outputs rounded to their narrow type. That is FP16 storage with FP32
accumulation, what TensorRT's FP16 layers do. The deployed file is unchanged; only the copy a
session runs is rewritten.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from pipeline.graph.model import name_taker, tensor_types, toposort

NARROW = (TensorProto.FLOAT16, TensorProto.BFLOAT16)


def has_narrow_floats(model: onnx.ModelProto) -> bool:
    """Whether any initializer, graph input or output of ``model`` is FP16/BF16, or a Cast writes one."""
    if any(i.data_type in NARROW for i in model.graph.initializer):
        return True
    if any(v.type.tensor_type.elem_type in NARROW for v in [*model.graph.input, *model.graph.output]):
        return True
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    return any(a.name == "to" and a.i in NARROW for n in casts for a in n.attribute)


def emulated(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` in which every node but Cast that reads or writes FP16/BF16 computes in FP32
    between explicit roundings; and how many nodes that is."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    toposort(out)
    types = tensor_types(out)
    types.update({i.name: i.data_type for i in out.graph.initializer})
    fresh = name_taker(out)

    added: list[onnx.NodeProto] = []
    count = 0
    for node in out.graph.node:
        if node.op_type == "Cast":
            continue
        narrow_in = [i for i, t in enumerate(node.input) if t and types.get(t) in NARROW]
        narrow_out = [i for i, t in enumerate(node.output) if t and types.get(t) in NARROW]
        if not narrow_in and not narrow_out:
            continue
        count += 1
        for i in narrow_in:
            wide = fresh(f"{node.input[i]}_fp32")
            added.append(helper.make_node("Cast", [node.input[i]], [wide], to=TensorProto.FLOAT, name=fresh(wide)))
            node.input[i] = wide
        for i in narrow_out:
            narrow, wide = node.output[i], fresh(f"{node.output[i]}_fp32")
            node.output[i] = wide
            added.append(helper.make_node("Cast", [wide], [narrow], to=types[narrow], name=fresh(f"{narrow}_round")))
    out.graph.node.extend(added)
    del out.graph.value_info[:]
    toposort(out)
    return out, count
