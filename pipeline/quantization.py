"""Build the Q/DQ model from precomputed ranges with ONNX Runtime's quantization tooling.

No calibration happens here: ranges come from ``ranges.json`` and are handed to ORT's
``QDQQuantizer`` as ``TensorsData``. Weights are INT8, symmetric, per output channel (max |w|).
Activations are per tensor, either symmetric INT8 (scale = amax/127, zero point 0: TensorRT's only
scheme) or asymmetric UINT8 over the observed [min, max] clipped to [-amax, amax] (ONNX Runtime's
default: a ReLU output that never goes negative gets all 256 levels instead of 128).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from pipeline.errors import ModelError, fail
from pipeline.log import logger
from pipeline.model import name_nodes

# TensorRT's recommended placement: Q/DQ on the inputs of these ops, not on their outputs.
TENSORRT_OPS = ["Conv", "ConvTranspose", "Gemm", "MatMul"]
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
SHAPE_ONLY = {"Shape", "Size"}


@dataclass
class QuantizeOptions:
    target: str = "tensorrt"  # tensorrt | onnxruntime
    per_channel: bool = True
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    activations: str = "symmetric"  # symmetric (s8, zero point 0) | asymmetric (u8 with a zero point)


def _op_types(model: onnx.ModelProto, opts: QuantizeOptions) -> list[str]:
    if opts.target == "tensorrt":
        ops = list(TENSORRT_OPS)
    else:
        from onnxruntime.quantization.registry import QDQRegistry

        ops = sorted(QDQRegistry)
    return [o for o in ops if o not in opts.exclude_op_types]


def activation_bounds(
    amax: dict[str, float], observed: dict[str, tuple[float, float]] | None, symmetric: bool
) -> dict[str, tuple[float, float]]:
    """Per tensor (lowest, highest) for the quantizer: [-amax, amax], or the observed [min, max]
    clipped to it (the calibration method's threshold still decides what saturates)."""
    if symmetric:
        return {k: (-a, a) for k, a in amax.items() if a > 0}
    if observed is None:
        raise ValueError("asymmetric activations need the observed min and max of each tensor")
    out = {}
    for k, a in amax.items():
        if a > 0 and k in observed:
            hi = min(observed[k][1], a)
            out[k] = (min(max(observed[k][0], -a), hi), hi)  # lo <= hi even when amax cuts below min
    return out


def _without_ranges(
    model: onnx.ModelProto, bounds: dict[str, tuple[float, float]], op_types: list[str], target: str
) -> tuple[onnx.ModelProto, list[str]]:
    """Names of the nodes that would quantize a tensor without a range (ORT's quantizer raises on
    those), after naming unnamed nodes in a copy so they can be excluded one by one."""
    inits = {i.name for i in model.graph.initializer}
    missing = []
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        tensors = [t for t in node.input if t and t not in inits]
        if target != "tensorrt":  # there ORT quantizes outputs too
            tensors += [t for t in node.output if t]
        if any(t not in bounds for t in tensors):
            missing.append(node)
    if any(not n.name for n in missing):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        name_nodes(copy)
        return _without_ranges(copy, bounds, op_types, target)
    return model, [n.name for n in missing]


def quantize(
    model: onnx.ModelProto,
    amax: dict[str, float],
    opts: QuantizeOptions,
    observed: dict[str, tuple[float, float]] | None = None,
) -> onnx.ModelProto:
    """The Q/DQ model for ``model`` with thresholds ``amax`` (tensor name -> symmetric threshold).

    ``observed`` (tensor name -> calibration min, max) is needed for asymmetric activations.
    """
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    symmetric = opts.activations == "symmetric"
    bounds = activation_bounds(amax, observed, symmetric)
    ranges = TensorsData(
        CalibrationMethod.MinMax,
        {k: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for k, (lo, hi) in bounds.items()},
    )
    op_types = _op_types(model, opts)
    extra: dict[str, Any] = {"ActivationSymmetric": symmetric, "WeightSymmetric": True}
    if opts.target == "tensorrt":
        extra.update(
            {
                "QuantizeBias": False,  # TensorRT keeps biases in float
                "OpTypesToExcludeOutputQuantization": op_types,
                "DedicatedQDQPair": False,
            }
        )
    known = {n.name for n in model.graph.node}
    unknown = [n for n in opts.exclude_nodes if n not in known]
    if unknown:
        fail(ModelError, f"steps.quantize.exclude.nodes: no node named {unknown[0]!r} in the model.")
    model, unranged = _without_ranges(model, bounds, op_types, opts.target)
    if unranged:
        logger.warning(
            "quantize: %d node(s) stay FP32 because a tensor they would quantize has no range "
            "(e.g. a calibration cache without it): %s",
            len(unranged),
            unranged[:8],
        )
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer logs advice at WARNING on every call
    try:
        quantizer = QDQQuantizer(
            model,
            opts.per_channel,
            False,  # reduce_range: a workaround for pre-VNNI x86 kernels, not what TensorRT wants
            QuantType.QInt8,  # weights
            QuantType.QInt8 if symmetric else QuantType.QUInt8,  # activations
            ranges,
            [],
            [*opts.exclude_nodes, *unranged],
            op_types,
            extra,
        )
        out: onnx.ModelProto = quantizer.quantize_model()
    finally:
        logging.getLogger().setLevel(level)
    return out


def node_table(fp32: onnx.ModelProto, qdq: onnx.ModelProto) -> list[dict[str, Any]]:
    """Per original node: how many of its runtime inputs arrive through DequantizeLinear.

    ``int8``: all of them (weights included), ``partial``: some (e.g. a residual Add whose skip
    branch shares a quantized tensor), ``fp32``: none.
    """
    producer = {o: n for n in qdq.graph.node for o in n.output}
    inits = {i.name for i in qdq.graph.initializer}
    sizes = {i.name: int(np.prod(i.dims)) for i in qdq.graph.initializer}
    by_name = {n.name: n for n in qdq.graph.node}
    rows = []
    for node in fp32.graph.node:
        q = by_name.get(node.name)
        if q is None:
            continue
        dqs = [producer[i] for i in q.input if i in producer and producer[i].op_type == "DequantizeLinear"]
        if node.op_type in SHAPE_ONLY:
            dqs = []  # reads a quantized tensor's shape, never its values: not INT8 compute
        runtime_inputs = [i for i in q.input if i and (i not in inits or i in producer)]
        precision = "fp32" if not dqs else ("int8" if len(dqs) == len(runtime_inputs) else "partial")
        per_channel = [dq for dq in dqs if sizes.get(dq.input[1], 1) > 1]
        rows.append(
            {
                "node": node.name,
                "op_type": node.op_type,
                "precision": precision,
                "quantized_inputs": len(dqs),
                "weights": "per-channel" if per_channel else ("per-tensor" if len(dqs) > 1 else ""),
            }
        )
    return rows


def dequantized_names(qdq: onnx.ModelProto) -> dict[str, str]:
    """tensor -> output of the DequantizeLinear behind its QuantizeLinear: the value its consumers see.

    Per-layer error compares FP32 tensors against these. The float tensor of the same name can mean
    something else: for asymmetric activations ORT deletes a Relu/Clip whose range the quantizer's
    saturation already applies, and the convolution before it takes over the name, unclipped.
    """
    quantized = {n.input[0]: n.output[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    dequantized = {n.input[0]: n.output[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    return {t: dequantized[q] for t, q in quantized.items() if q in dequantized}


def quantized_activations(model: onnx.ModelProto, target: str) -> list[str] | None:
    """The activation tensors the Q/DQ model will quantize for ``target`` (None: all of them)."""
    if target != "tensorrt":
        return None
    inits = {i.name for i in model.graph.initializer}
    out: list[str] = []
    for node in model.graph.node:
        if node.op_type in TENSORRT_OPS:
            inputs = node.input[:2] if node.op_type == "MatMul" else node.input[:1]
            out.extend(i for i in inputs if i and i not in inits and i not in out)
    return out
