"""Tensors whose min and max follow exactly from another tensor's, so the model need not expose them.

A non-decreasing elementwise function f maps the smallest input to the smallest output and the
largest to the largest: min f(x) = f(min x), max f(x) = f(max x). Relu and Clip with constant
bounds are such functions and compute them with comparisons only, so the derived values are the
ones ONNX Runtime would have produced, bit for bit. Reshapes and transposes move values without
changing them. In a CNN most activations are a Relu/Clip of a convolution output: deriving them
roughly halves what the min/max pass copies out of the runtime (benchmarks/).

Sigmoid, Tanh and friends are monotonic too but are left out: ORT computes them with its own
approximations, and a derived range must be the measured one exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

Bounds = Callable[[float, float], tuple[float, float]]
SAME_VALUES = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"}


@dataclass
class Derived:
    source: str  # the tensor whose statistics this one's follow from
    bounds: Bounds  # (source min, source max) -> (min, max)


def _clip_bounds(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> Bounds | None:
    lo, hi = -math.inf, math.inf
    for attr in node.attribute:  # opset < 11 keeps the bounds as attributes
        if attr.name == "min":
            lo = float(attr.f)
        elif attr.name == "max":
            hi = float(attr.f)
    for position, name in ((1, "min"), (2, "max")):
        if len(node.input) > position and node.input[position]:
            value = constants.get(node.input[position])
            if value is None or value.size != 1:
                return None  # a bound computed at run time: measure the output instead
            if name == "min":
                lo = float(value.reshape(()))
            else:
                hi = float(value.reshape(()))
    if lo > hi:
        return None
    # Python floats hold float16/32/64 values exactly, so comparing them is the runtime's comparison
    return lambda mn, mx: (min(max(mn, lo), hi), min(max(mx, lo), hi))


def _bounds(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> Bounds | None:
    if node.op_type in SAME_VALUES and len(node.output) == 1:
        return lambda mn, mx: (mn, mx)
    if node.op_type == "Relu":
        return lambda mn, mx: (max(mn, 0.0), max(mx, 0.0))
    if node.op_type == "Clip":
        return _clip_bounds(node, constants)
    return None


def derivable(model: onnx.ModelProto, tensors: list[str], measure: set[str]) -> dict[str, Derived]:
    """Which of ``tensors`` can be derived, each from a tensor that is measured (not derived).

    ``measure`` are tensors that must be measured anyway (their histogram is built in this pass).
    """
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = numpy_helper.to_array(attr.t)
    wanted = set(tensors)
    derived: dict[str, Derived] = {}
    for node in model.graph.node:  # graph order: a chain resolves to its first measured tensor
        if not node.output or node.output[0] not in wanted or node.output[0] in measure or not node.input:
            continue
        source = node.input[0]
        if source not in wanted:
            continue
        bounds = _bounds(node, constants)
        if bounds is None:
            continue
        if source in derived:
            inner, outer = derived[source].bounds, bounds
            source = derived[source].source

            def bounds(mn: float, mx: float, inner: Bounds = inner, outer: Bounds = outer) -> tuple[float, float]:
                return outer(*inner(mn, mx))

        derived[node.output[0]] = Derived(source, bounds)
    return derived
