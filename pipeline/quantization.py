"""Build the Q/DQ model from precomputed ranges with ONNX Runtime's quantization tooling.

No calibration happens here: ranges come from ``ranges.json`` and are handed to ORT's
``QDQQuantizer`` as ``TensorsData``. Activations are INT8, symmetric, per tensor (scale = amax/127,
zero point 0, TensorRT's convention); weights are INT8, symmetric, per output channel (max |w|).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from pipeline.errors import ModelError, fail

# TensorRT's recommended placement: Q/DQ on the inputs of these ops, not on their outputs.
TENSORRT_OPS = ["Conv", "ConvTranspose", "Gemm", "MatMul"]
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


@dataclass
class QuantizeOptions:
    target: str = "tensorrt"  # tensorrt | onnxruntime
    per_channel: bool = True
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()


def _op_types(model: onnx.ModelProto, opts: QuantizeOptions) -> list[str]:
    if opts.target == "tensorrt":
        ops = list(TENSORRT_OPS)
    else:
        from onnxruntime.quantization.registry import QDQRegistry

        ops = sorted(QDQRegistry)
    return [o for o in ops if o not in opts.exclude_op_types]


def quantize(model: onnx.ModelProto, amax: dict[str, float], opts: QuantizeOptions) -> onnx.ModelProto:
    """The Q/DQ model for ``model`` with symmetric ranges ``amax`` (tensor name -> threshold)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    ranges = TensorsData(
        CalibrationMethod.MinMax,
        {k: TensorData(lowest=np.float32(-v), highest=np.float32(v)) for k, v in amax.items() if v > 0},
    )
    op_types = _op_types(model, opts)
    extra: dict[str, Any] = {"ActivationSymmetric": True, "WeightSymmetric": True}
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
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer logs advice at WARNING on every call
    try:
        quantizer = QDQQuantizer(
            model,
            opts.per_channel,
            False,  # reduce_range: a workaround for pre-VNNI x86 kernels, not what TensorRT wants
            QuantType.QInt8,
            QuantType.QInt8,
            ranges,
            [],
            list(opts.exclude_nodes),
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
