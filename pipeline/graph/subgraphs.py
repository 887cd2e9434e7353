"""Control flow (If, Loop, Scan): computation int8pipe can see but does not calibrate or quantize.

Calibration exposes and measures the main graph's tensors, and ONNX Runtime's QDQ quantizer places
Q/DQ in the main graph only, so whatever sits inside an If branch or a Loop/Scan body stays FP32. A
model exported with its computation inside such subgraphs (a scripted PyTorch loop, a data-dependent
branch) then "quantizes" to nearly nothing; :func:`control_flow_report` says so, and why.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

CONTROL_FLOW_OPS = ("If", "Loop", "Scan")


@dataclass
class ControlFlowNode:
    name: str  # the node's name ("" when unnamed)
    op_type: str  # If, Loop or Scan (or another op carrying a graph attribute)
    subgraphs: dict[str, int]  # graph attribute (then_branch, else_branch, body) -> nodes inside, nested included


def _subgraphs(node: onnx.NodeProto) -> dict[str, list[onnx.GraphProto]]:
    out: dict[str, list[onnx.GraphProto]] = {}
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            out[attr.name] = [attr.g]
        elif attr.type == onnx.AttributeProto.GRAPHS and attr.graphs:
            out[attr.name] = list(attr.graphs)
    return out


def _count(graph: onnx.GraphProto) -> int:
    """Nodes of ``graph``, those inside its own subgraphs included."""
    return sum(1 + sum(_count(g) for gs in _subgraphs(n).values() for g in gs) for n in graph.node)


def control_flow_nodes(model: onnx.ModelProto) -> list[ControlFlowNode]:
    """The main graph's nodes that carry subgraphs (If, Loop, Scan), with the node count of each subgraph."""
    found = []
    for node in model.graph.node:
        graphs = _subgraphs(node)
        if graphs:
            counts = {attr: sum(_count(g) for g in gs) for attr, gs in graphs.items()}
            found.append(ControlFlowNode(node.name, node.op_type, counts))
    return found


def control_flow_report(model: onnx.ModelProto) -> str | None:
    """One paragraph on the model's control flow and the nodes hidden in it, or None without any.

    Meant as a warning of the export/quantize steps: the nodes inside subgraphs are neither
    calibrated nor quantized, whatever the main graph's node count suggests.
    """
    found = control_flow_nodes(model)
    if not found:
        return None
    inside = sum(sum(n.subgraphs.values()) for n in found)
    main = len(model.graph.node)
    parts = []
    for n in found[:8]:
        label = f"{n.op_type} {n.name!r}" if n.name else f"an unnamed {n.op_type}"
        graphs = ", ".join(f"{count} in {attr}" for attr, count in n.subgraphs.items())
        parts.append(f"{label} ({graphs})")
    more = f" and {len(found) - 8} more" if len(found) > 8 else ""
    share = 100.0 * inside / (main + inside)
    return (
        f"{len(found)} control-flow node(s) hold {inside} of the model's {main + inside} nodes "
        f"({share:.0f}%) in subgraphs: {'; '.join(parts)}{more}. int8pipe calibrates and quantizes the main "
        f"graph's {main} node(s) only, so everything inside these subgraphs stays FP32. To quantize it, "
        "export the model without the control flow (e.g. trace rather than script a PyTorch model, with "
        "fixed loop counts and the branch the deployment takes)."
    )
