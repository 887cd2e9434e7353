"""Quantization roles: what a node does in the network, beyond its op type."""

from __future__ import annotations

import onnx

# Normalization layers: their output depends on statistics over the channels or positions of one
# sample, so a quantized input shifts every value at once; ORT's QDQ quantizer covers them.
NORMALIZATION_OPS = ("LayerNormalization", "InstanceNormalization", "GroupNormalization", "BatchNormalization")


def constant_tensors(model: onnx.ModelProto) -> set[str]:
    """Initializers, Constant outputs, and what nodes compute from those alone (a transposed weight)."""
    const = {i.name for i in model.graph.initializer}
    for node in model.graph.node:  # topological order
        if node.op_type == "Constant" or (node.input and all(not i or i in const for i in node.input)):
            const.update(o for o in node.output if o)
    return const


def activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMul nodes whose two operands both change per input: attention's score and context products.

    Their per-tensor INT8 ranges must cover every head and position at once, and neither side is a
    weight that could take a per-channel scale, so they are kept float unless asked for.
    """
    const = constant_tensors(model)
    return [
        n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) == 2 and not (set(n.input) & const)
    ]


def graph_kind(model: onnx.ModelProto) -> str:
    """``attention`` for a transformer (two activations multiplied, no Conv), else ``convolutional``
    (a CNN with attention on top, such as a text recogniser's, measured best with the CNN defaults):
    the quantize defaults that measured best differ between the two (README, "Defaults by graph kind")."""
    if any(n.op_type == "Conv" for n in model.graph.node):
        return "convolutional"
    return "attention" if activation_matmuls(model) else "convolutional"


def normalization_nodes(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type in NORMALIZATION_OPS]
