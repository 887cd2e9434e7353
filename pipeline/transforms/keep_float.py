"""Make chosen nodes of a Q/DQ model compute in float again, exactly as the FP32 model does.

Used wherever a node must really be float: excluded nodes (ORT's quantizer leaves them reading
shared DequantizeLinear outputs), nodes kept float by their role, and accuracy recovery.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx

from pipeline.graph.graph_index import GraphIndex
from pipeline.log import logger


def keep_float_inputs(qdq: onnx.ModelProto, fp32: onnx.ModelProto, nodes: Iterable[str]) -> onnx.ModelProto:
    """Make the excluded ``nodes`` of ``qdq`` read float values again, in place; returns ``qdq``.

    ORT's quantizer leaves an excluded node reading a DequantizeLinear output when its input tensor
    is shared with a quantized sibling (x -> Conv A, x -> Conv B with B excluded: B still reads
    DQ(Q(x))), and when a shared weight was stored as INT8. Each input of an excluded node that comes
    from a DequantizeLinear is rewired to the float tensor the FP32 model computes there: the output
    of the same-named node in ``qdq``, a graph input, or the FP32 initializer (copied from ``fp32``
    when ``qdq`` only holds the INT8 one). Nodes ORT deleted because a quantizer's saturation replaced
    them (a Relu or Clip before an asymmetric QuantizeLinear) are re-created from ``fp32`` for the
    float path. Quantize/DequantizeLinear nodes left without consumers, and their initializers, are
    removed.
    """
    from pipeline.graph.model import toposort

    graph = qdq.graph
    wanted = list(dict.fromkeys(nodes))  # in the given order: the names of re-created nodes are stable
    index, originals = GraphIndex(qdq), GraphIndex(fp32)
    # not the index's: the float copies made on the way are added here, and later lookups must find them
    inits = {i.name: i for i in graph.initializer}
    used_tensors = {t for n in graph.node for t in [*n.input, *n.output]} | set(inits) | index.inputs
    used_nodes = {n.name for n in graph.node}
    added: list[onnx.NodeProto] = []
    memo: dict[str, str] = {}

    def fresh(base: str, used: set[str]) -> str:
        name, k = base, 0
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        return name

    def float_of(tensor: str) -> str | None:
        """A tensor of ``qdq`` holding the FP32 model's value of ``tensor`` (None: not found)."""
        if tensor in memo:
            return memo[tensor]
        out: str | None = None
        original_init = originals.initializer(tensor)
        if original_init is not None:
            init = inits.get(tensor)
            if init is not None and init.data_type == original_init.data_type:
                out = tensor
            else:
                copy = onnx.TensorProto()
                copy.CopyFrom(original_init)
                copy.name = out = fresh(tensor if init is None else f"{tensor}_float", used_tensors)
                graph.initializer.append(copy)
                inits[copy.name] = copy
        elif tensor in index.inputs:
            out = tensor
        elif (src := originals.producer(tensor)) is not None:
            position = list(src.output).index(tensor)
            twin = index.node(src.name)
            if twin is not None and twin.op_type == src.op_type:
                out = twin.output[position]
            elif src.name and twin is None:  # deleted by ORT (a Relu/Clip folded into a quantizer)
                inputs = [float_of(i) if i else "" for i in src.input]
                if all(i is not None for i in inputs):
                    node = onnx.NodeProto()
                    node.CopyFrom(src)
                    node.name = fresh(f"{src.name}_float", used_nodes)
                    del node.input[:]
                    node.input.extend(i or "" for i in inputs)
                    del node.output[:]
                    node.output.extend(fresh(f"{o}_float", used_tensors) if o else "" for o in src.output)
                    added.append(node)
                    for o, n in zip(src.output, node.output):
                        if o:
                            memo[o] = n
                    out = node.output[position]
        if out is not None:
            memo[tensor] = out
        return out

    for name in wanted:
        node, original = index.node(name), originals.node(name)
        if node is None or original is None:
            continue
        for k, tensor in enumerate(node.input):
            if k >= len(original.input):
                continue
            if original.input[k] in originals.arrays and tensor != original.input[k] and tensor in inits:
                # a float initializer swapped in after quantization (a corrected bias): back to FP32's own
                node.input[k] = float_of(original.input[k]) or tensor
                continue
            dq = index.producer(tensor)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            src = float_of(original.input[k])
            if src is None:  # no float twin: fall back to the QuantizeLinear's input for activations
                q = index.producer(dq.input[0])
                if q is None or q.op_type != "QuantizeLinear":
                    logger.warning("quantize: %s input %s stays dequantized (no float value found)", name, tensor)
                    continue
                src = q.input[0]
            node.input[k] = src
        del node.input[len(original.input) :]  # e.g. a bias that bias correction added to a Conv without one
        if node.op_type == original.op_type:  # e.g. the padding a shifted input's Pad took over (shift.py)
            del node.attribute[:]
            node.attribute.extend(original.attribute)
    graph.node.extend(added)
    drop_unread_additions(qdq, fp32)
    if added:
        toposort(qdq)
    return qdq


def drop_unread_additions(model: onnx.ModelProto, fp32: onnx.ModelProto) -> None:
    """Remove what quantization added to ``model`` (nodes and initializers ``fp32`` does not have:
    Q/DQ pairs, smoothing's Mul, a corrected bias) once nothing reads it any more."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    original_nodes = {n.name for n in fp32.graph.node}
    original_inits = {i.name for i in fp32.graph.initializer}
    while True:
        read = {i for n in graph.node for i in n.input} | outputs
        dead = [
            n for n in graph.node if n.name not in original_nodes and not any(o in read for o in n.output)
        ]  # fmt: skip
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    read = {i for n in graph.node for i in n.input} | outputs
    for init in [i for i in graph.initializer if i.name not in original_inits and i.name not in read]:
        graph.initializer.remove(init)
