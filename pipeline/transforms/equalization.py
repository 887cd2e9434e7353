"""Cross-layer equalization: balance the weight ranges of two consecutive convolutions.

With one INT8 scale per weight *tensor*, a layer whose output channels differ 100× in weight range
(typical of depthwise convolutions after BatchNorm folding) leaves its small channels a few levels.
For Conv A → (Relu | Clip(0, hi) | nothing) → Conv B, dividing A's output channel ``c`` by
``s[c] > 0`` and multiplying B's input channel ``c`` by it changes nothing in float, because
``relu(x / s) = relu(x) / s``. Choosing

    s[c] = sqrt(r_A[c] / r_B[c])      (r_A: max |W_A| over output channel c, r_B: over input channel c)

gives both layers the range ``sqrt(r_A[c] · r_B[c])`` in channel ``c`` (Nagel et al., *Data-Free
Quantization*, 2019). A Clip(0, hi) (ReLU6) does not commute with a per-channel scale, so it becomes
Relu then Min with the per-channel bound ``hi / s``: the same function, one node more.

What it is for: per-tensor weights (``per_channel: false``). With per-channel weights every channel
already has its own scale and equalization only moves range between the activation's channels,
which one per-tensor activation scale pays for: on EfficientNet-Lite0 it lowered top-1 agreement
from 0.879 to 0.762 with per-channel weights and raised it from 0.703 to 0.758 with per-tensor ones
(benchmarks/results/efficientnet_lite0_peers.md). One pass, in graph order: iterating to convergence
(as the paper does for chains) moved activation range further and measured worse (0.676 after 3
passes, in a one-off run on the same crops).

Every tensor between A and B gets a new name (``<tensor>_equalized``) and the new weights are new
initializers, so the FP32 model's tensors keep their meaning (per-layer error compares by name) and
the equalized ones get ranges of their own (``equalize_and_calibrate``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pipeline.calibration.ranges import TensorRange
from pipeline.graph.graph_index import GraphIndex
from pipeline.graph.layout import Layout
from pipeline.graph.model import attribute, toposort
from pipeline.log import logger
from pipeline.transforms import statistics_pass

Batch = dict[str, np.ndarray]
SUFFIX = "_equalized"


@dataclass
class Pair:
    first: onnx.NodeProto  # Conv A
    activation: onnx.NodeProto | None  # Relu or Clip(0, hi) between them, if any
    second: onnx.NodeProto  # Conv B, plain (group 1) or depthwise


def _group(node: onnx.NodeProto) -> int:
    return int(attribute(node, "group", 1))


def _clip_bounds(node: onnx.NodeProto, inits: Mapping[str, np.ndarray]) -> tuple[float, float] | None:
    """(lo, hi) of a Clip whose bounds are constants, from its inputs (opset 11+) or attributes."""
    attrs = {a.name: float(helper.get_attribute_value(a)) for a in node.attribute if a.name in ("min", "max")}
    lo, hi = attrs.get("min"), attrs.get("max")
    for k, name in ((1, "lo"), (2, "hi")):
        if len(node.input) > k and node.input[k]:
            if node.input[k] not in inits:
                return None  # a bound computed at run time
            value = float(inits[node.input[k]].reshape(-1)[0])
            lo, hi = (value, hi) if name == "lo" else (lo, value)
    return (lo if lo is not None else -np.inf, hi if hi is not None else np.inf)


def pairs(model: onnx.ModelProto, skip: Iterable[str] = ()) -> list[Pair]:
    """Conv → (Relu | Clip(0, hi))? → Conv chains that can be equalized.

    A's output (and the activation's) must feed B alone and not be a graph output; both weights
    must be float32 initializers; B must read all of A's channels (group 1) or one each (depthwise,
    one output per input channel); unnamed nodes and those named in ``skip`` (kept float) are left out.
    """
    index = GraphIndex(model)
    inits, skipped = index.arrays, set(skip)

    def only_reader(tensor: str) -> onnx.NodeProto | None:
        found = index.consumers(tensor)
        return found[0] if len(found) == 1 and tensor not in index.outputs else None

    found = []
    for a in model.graph.node:
        if a.op_type != "Conv" or not a.name or a.name in skipped or len(a.input) < 2 or a.input[1] not in inits:
            continue
        act, b = None, only_reader(a.output[0])
        if b is not None and b.op_type == "Relu" or b is not None and b.op_type == "Clip":
            bounds = _clip_bounds(b, inits) if b.op_type == "Clip" else (0.0, np.inf)
            act, b = (b, only_reader(b.output[0])) if bounds is not None and bounds[0] == 0.0 else (None, None)
        if b is None or b.op_type != "Conv" or not b.name or b.name in skipped or b.input[0] != (act or a).output[0]:
            continue
        if len(b.input) < 2 or b.input[1] not in inits or (act is not None and not act.name):
            continue
        # any A: its output channel c comes from W_A[c] alone, grouped or not
        w_a, w_b = inits[a.input[1]], inits[b.input[1]]
        if w_a.dtype != np.float32 or w_b.dtype != np.float32:
            continue
        channels, group = w_a.shape[0], _group(b)
        if (group == 1 and w_b.shape[1] == channels) or (group == channels and w_b.shape[:2] == (channels, 1)):
            found.append(Pair(a, act, b))
    return found


def _channel_range(w: np.ndarray, axis: int) -> np.ndarray:
    return np.abs(w).max(axis=tuple(k for k in range(w.ndim) if k != axis)).astype(np.float64)


def factors(r_a: np.ndarray, r_b: np.ndarray) -> np.ndarray:
    """sqrt(r_a / r_b) per channel; 1 where a channel is silent on either side."""
    s = np.ones_like(r_a, dtype=np.float64)
    live = (r_a > 0) & (r_b > 0)
    s[live] = np.sqrt(r_a[live] / r_b[live])
    return s


def equalize(model: onnx.ModelProto, skip: Iterable[str] = ()) -> tuple[onnx.ModelProto, list[str], int]:
    """A copy of ``model`` with every pair equalized, the renamed tensors (they need ranges of their
    own) and the number of pairs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    # the weights, biases and bounds as they were; what this rewrite adds gets new names and is not looked up
    inits = GraphIndex(out).arrays
    found = pairs(out, skip)
    # weights, biases and Clip bounds about to be replaced: dropped at the end unless still read elsewhere
    replaced = {i for p in found for n in (p.first, p.second, p.activation) if n is not None for i in n.input[1:]}
    by_name = {n.name: n for n in graph.node}
    # a node's weights as equalized so far: a Conv can be B of one pair and A of the next
    current: dict[str, np.ndarray] = {}
    renamed: list[str] = []

    def weights(node: onnx.NodeProto) -> np.ndarray:
        return current.get(node.name, inits[node.input[1]].astype(np.float64))

    def add(name: str, value: np.ndarray) -> str:
        graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    for pair in found:
        a, b = by_name[pair.first.name], by_name[pair.second.name]
        w_a, w_b = weights(a), weights(b)
        depthwise = _group(b) != 1
        s = factors(_channel_range(w_a, 0), _channel_range(w_b, 0 if depthwise else 1))
        current[a.name] = w_a / s.reshape(-1, *[1] * (w_a.ndim - 1))
        in_channels = s.reshape(-1, *[1] * (w_b.ndim - 1)) if depthwise else s.reshape(1, -1, *[1] * (w_b.ndim - 2))
        current[b.name] = w_b * in_channels
        if len(a.input) > 2 and a.input[2]:
            a.input[2] = add(f"{a.name}{SUFFIX}_bias", inits[a.input[2]].astype(np.float64) / s)
        tensor = f"{a.output[0]}{SUFFIX}"
        a.output[0] = tensor
        renamed.append(tensor)
        if pair.activation is not None:
            act = by_name[pair.activation.name]
            hi = _clip_bounds(act, inits)[1] if act.op_type == "Clip" else np.inf  # type: ignore[index]
            relu_out = f"{act.output[0]}{SUFFIX}"
            if np.isfinite(hi):  # Clip(0, hi)(x / s) = min(relu(x / s), hi / s) per channel
                bound = add(f"{act.name}{SUFFIX}_max", (hi / s).reshape(-1, *[1] * (w_a.ndim - 2)))
                relu_out = f"{act.output[0]}{SUFFIX}_relu"
                graph.node.append(
                    helper.make_node("Min", [relu_out, bound], [f"{act.output[0]}{SUFFIX}"], name=f"{act.name}{SUFFIX}")
                )
                renamed.append(relu_out)
            graph.node.append(helper.make_node("Relu", [tensor], [relu_out], name=f"{act.name}{SUFFIX}_relu"))
            graph.node.remove(act)
            tensor = f"{act.output[0]}{SUFFIX}"
            renamed.append(tensor)
        b.input[0] = tensor
    for node in graph.node:
        if node.name in current:
            node.input[1] = add(f"{node.name}{SUFFIX}_weight", current[node.name])
    read = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name in replaced and i.name not in read]:
        graph.initializer.remove(init)
    toposort(out)
    return out, list(dict.fromkeys(renamed)), len(found)


def equalize_and_calibrate(
    fp32: onnx.ModelProto,
    batches: Callable[[], Iterable[Batch]],
    skip: Iterable[str],
    method: str,
    percentile: float,
    memory_mb: int,
    layout: Layout | None = None,
) -> tuple[onnx.ModelProto, dict[str, TensorRange], int]:
    """The equalized model, the ranges of its renamed tensors (calibrated with ``method``), and the
    number of pairs equalized."""
    model, renamed, count = equalize(fp32, skip)
    if not count:
        return fp32, {}, 0
    ranges = statistics_pass.calibrate_new(model, renamed, batches, method, percentile, memory_mb, layout,
                                           "equalization")  # fmt: skip
    logger.info("quantize: cross-layer equalization of %d Conv pairs", count)
    return model, ranges, count
