"""Build the Q/DQ model from precomputed ranges with ONNX Runtime's quantization tooling.

No calibration happens here: ranges come from ``ranges.json`` and are handed to ORT's
``QDQQuantizer`` as ``TensorsData``. Weights are INT8, symmetric, per output channel (max |w|);
for ORT's CPU kernels on a fleet with CPUs without VNNI they are 7-bit or uint8 instead
(``QuantizeOptions.weights``, chosen by :mod:`pipeline.execution.cpu_kernels`).
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
from onnx import TensorProto, numpy_helper

from pipeline.errors import ModelError, fail
from pipeline.execution.cpu_kernels import SCHEMES
from pipeline.graph.graph_index import GraphIndex
from pipeline.graph.model import FLOAT_TYPES, name_nodes, tensor_types
from pipeline.log import logger
from pipeline.transforms.roles import NORMALIZATION_OPS, activation_matmuls, normalization_nodes

# TensorRT's recommended placement: Q/DQ on the inputs of these ops, not on their outputs.
TENSORRT_OPS = ["Conv", "ConvTranspose", "Gemm", "MatMul"]
SHAPE_ONLY = {"Shape", "Size"}


@dataclass
class QuantizeOptions:
    target: str = "tensorrt"  # tensorrt | onnxruntime
    per_channel: bool = True
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    activations: str = "symmetric"  # symmetric (s8, zero point 0) | asymmetric (u8 with a zero point)
    activation_matmuls: bool = False  # quantize MatMuls of two activations (attention's Q·Kᵀ, P·V) too
    normalization: bool = False  # quantize normalization layers too (roles.NORMALIZATION_OPS; onnxruntime target)
    weights: str = "int8"  # cpu_kernels.SCHEMES: int8 | int7 (reduce_range) | uint8; tensorrt takes int8 only


def float_nodes(model: onnx.ModelProto, opts: QuantizeOptions) -> list[str]:
    """The nodes ``opts`` keeps float: excluded by name or op type, and by role (activation MatMuls,
    normalization layers) unless asked for."""
    nodes = [*opts.exclude_nodes, *(n.name for n in model.graph.node if n.op_type in opts.exclude_op_types)]
    if not opts.activation_matmuls:
        nodes += activation_matmuls(model)
    if not opts.normalization:
        nodes += normalization_nodes(model)
    return list(dict.fromkeys(nodes))


def _op_types(model: onnx.ModelProto, opts: QuantizeOptions) -> list[str]:
    if opts.target == "tensorrt":
        ops = list(TENSORRT_OPS)
    else:
        from onnxruntime.quantization.registry import QDQRegistry

        ops = sorted(QDQRegistry)
    dropped = {*opts.exclude_op_types, *(() if opts.normalization else NORMALIZATION_OPS)}
    return [o for o in ops if o not in dropped]


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
            lo, hi = (min(max(v, -a), a) for v in observed[k])
            out[k] = (min(lo, hi), hi)  # inside [-amax, amax], lo <= hi even when amax cuts below min
    return out


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """tensor -> ONNX element type where shape inference knows it (empty if it cannot run)."""
    try:
        return tensor_types(model)
    except Exception:  # shape inference is an aid here: unknown types count as float
        return {}


def _without_ranges(
    model: onnx.ModelProto,
    bounds: dict[str, tuple[float, float]],
    op_types: list[str],
    target: str,
    types: dict[str, int] | None = None,
) -> tuple[onnx.ModelProto, list[str]]:
    """Names of the nodes that would quantize a float tensor without a range (ORT's quantizer
    raises on those), after naming unnamed nodes in a copy so they can be excluded one by one.

    Tensors that are not float (int64 indices, shape tensors) are never quantized, so they need no
    range: a Gather reading int64 indices is not missing anything.
    """
    types = _element_types(model) if types is None else types
    inits = {i.name for i in model.graph.initializer}
    missing = []
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        tensors = [t for t in node.input if t and t not in inits]
        if target != "tensorrt":  # there ORT quantizes outputs too
            tensors += [t for t in node.output if t]
        tensors = [t for t in tensors if types.get(t, TensorProto.FLOAT) in FLOAT_TYPES]
        if any(t not in bounds for t in tensors):
            missing.append(node)
    if any(not n.name for n in missing):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        name_nodes(copy)
        return _without_ranges(copy, bounds, op_types, target, types)
    return model, [n.name for n in missing]


def _warn_unranged(
    model: onnx.ModelProto,
    unranged: list[str],
    bounds: dict[str, tuple[float, float]],
    amax: dict[str, float],
    target: str,
) -> None:
    """Say why nodes stay FP32 for want of a range: a tensor that was 0 on every calibration sample
    (all-zero data, a dead branch) or one the ranges do not hold at all (e.g. a cache without it)."""
    inits, types, wanted = {i.name for i in model.graph.initializer}, _element_types(model), set(unranged)
    missing = {
        n.name: [
            t
            for t in [*n.input, *(n.output if target != "tensorrt" else [])]  # as _without_ranges reads them
            if t and t not in inits and t not in bounds and types.get(t, TensorProto.FLOAT) in FLOAT_TYPES
        ]
        for n in model.graph.node
        if n.name in wanted
    }
    blank = {name for name, ts in missing.items() if ts and all(amax.get(t) == 0 for t in ts)}
    zero = [f"{name} ({', '.join(missing[name])})" for name in unranged if name in blank]
    absent = [name for name in unranged if name not in blank]
    if zero:
        logger.warning(
            "quantize: %d node(s) stay FP32 because a tensor they would quantize was 0 on every calibration "
            "sample, so it has no scale: %s. Check the calibration data when that tensor is a model input",
            len(zero),
            _first(zero),
        )
    if absent:
        logger.warning(
            "quantize: %d node(s) stay FP32 because a float tensor they would quantize has no range "
            "(e.g. a calibration cache without it): %s",
            len(absent),
            _first(absent),
        )


def _first(names: list[str], shown: int = 8) -> str:
    return ", ".join(names[:shown]) + (f" (the first {shown} of {len(names)})" if len(names) > shown else "")


def _vector_gemm_biases(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``, or a copy whose Gemm biases that broadcast along rows are stored as vectors [N].

    ORT's basic optimiser (the export step) fuses MatMul + Add into a Gemm keeping the Add's bias
    shape, often [1, N]; ORT's QDQQuantizer indexes a per-channel bias one channel per element and
    fails on such a bias ("truth value of an array ... is ambiguous") although Gemm broadcasts
    [1, N], [1], [1, 1] and [N] alike. Rewritten here to the equivalent [N]; a bias that differs per
    row ([M, N]) is left alone.
    """
    inits = {i.name: i for i in model.graph.initializer}
    fixes: list[tuple[int, str, np.ndarray]] = []  # node index, bias name, bias as a vector
    for k, node in enumerate(model.graph.node):
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in inits or node.input[1] not in inits:
            continue
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        b_dims = list(inits[node.input[1]].dims)
        if len(b_dims) != 2:
            continue
        n = b_dims[0] if trans_b else b_dims[1]
        c = numpy_helper.to_array(inits[node.input[2]])
        if c.shape == (n,) or c.ndim > 2 or c.size not in (1, n) or (c.ndim == 2 and c.shape[0] != 1):
            continue
        fixes.append((k, node.input[2], np.broadcast_to(c.reshape(-1), (n,)).copy()))
    if not fixes:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    taken = {i.name for i in out.graph.initializer} | {t for n in out.graph.node for t in [*n.input, *n.output]}
    for k, name, vector in fixes:
        new = name
        while new in taken:
            new += "_vector"
        taken.add(new)
        out.graph.initializer.append(numpy_helper.from_array(vector, new))
        out.graph.node[k].input[2] = new
    return out


def _unit_gemm_beta(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``, or a copy whose Gemm nodes with beta != 1 have beta folded into their constant C.

    ORT's QDQ quantizer rewrites a quantized Gemm's beta to 1 (it expects to fold beta into the
    bias it quantizes) even when biases stay float, which would silently drop the factor.
    """
    inits = {i.name: i for i in model.graph.initializer}
    todo = [
        k
        for k, n in enumerate(model.graph.node)
        if n.op_type == "Gemm" and len(n.input) > 2 and n.input[2] in inits
        and any(a.name == "beta" and a.f != 1.0 for a in n.attribute)
    ]  # fmt: skip
    if not todo:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    taken = {i.name for i in out.graph.initializer} | {t for n in out.graph.node for t in [*n.input, *n.output]}
    for k in todo:
        node = out.graph.node[k]
        beta = next(a for a in node.attribute if a.name == "beta")
        c = numpy_helper.to_array(inits[node.input[2]]) * np.float32(beta.f)
        name = f"{node.input[2]}_times_beta"
        while name in taken:
            name += "_"
        taken.add(name)
        out.graph.initializer.append(numpy_helper.from_array(c.astype(np.float32), name))
        node.input[2] = name
        beta.f = 1.0
    return out


def _failing_node(exc: BaseException) -> str | None:
    """The node ORT's quantizer was working on when it raised, read from its stack frames."""
    found = None
    tb = exc.__traceback__
    while tb is not None:  # outermost to innermost: the innermost node wins
        local = tb.tb_frame.f_locals
        node = local.get("node")
        if isinstance(node, onnx.NodeProto) and node.name:
            found = node.name
        name = getattr(local.get("bias_info"), "node_name", None)
        if isinstance(name, str) and name:
            found = name
        tb = tb.tb_next
    return found


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
    scheme = SCHEMES[opts.weights]
    if scheme.uint8_weights and symmetric:
        raise ValueError("ORT has no kernel for int8 activations with uint8 weights: use int8 or int7 weights")
    bounds = activation_bounds(amax, observed, symmetric)
    ranges = TensorsData(
        CalibrationMethod.MinMax,
        {k: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for k, (lo, hi) in bounds.items()},
    )
    op_types = _op_types(model, opts)
    extra: dict[str, Any] = {"ActivationSymmetric": symmetric, "WeightSymmetric": not scheme.uint8_weights}
    if scheme.reduce_range and scheme.depthwise_8bit:
        # an override replaces the tensor's defaults: without its axis a per-channel weight turns per-tensor
        eight_bit = {"reduce_range": False, **({"axis": 0} if opts.per_channel else {})}
        extra["TensorQuantOverrides"] = {w: [dict(eight_bit)] for w in depthwise_weights(model)}
    if opts.target == "tensorrt":
        extra.update(
            {
                "QuantizeBias": False,  # TensorRT keeps biases in float
                # so no weight scale is raised to fit an INT32 bias: weight scales stay max |w| / 127
                "QDQDisableWeightAdjustForInt32Bias": True,
                "OpTypesToExcludeOutputQuantization": op_types,
                "DedicatedQDQPair": False,
            }
        )
    known = {n.name for n in model.graph.node}
    unknown = [n for n in opts.exclude_nodes if n not in known]
    if unknown:
        fail(ModelError, f"steps.quantize.exclude.nodes: no node named {unknown[0]!r} in the model.")
    model, unranged = _without_ranges(model, bounds, op_types, opts.target)
    float_matmuls = [] if opts.activation_matmuls or "MatMul" not in op_types else activation_matmuls(model)
    if unranged:
        _warn_unranged(model, unranged, bounds, amax, opts.target)
    model = _unit_gemm_beta(model)
    if opts.per_channel:
        model = _vector_gemm_biases(model)
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer logs advice at WARNING on every call
    try:
        quantizer = QDQQuantizer(
            model,
            opts.per_channel,
            scheme.reduce_range,  # 7-bit weights: ORT's u8 x s8 kernels cannot saturate without VNNI
            QuantType.QUInt8 if scheme.uint8_weights else QuantType.QInt8,  # weights
            QuantType.QInt8 if symmetric else QuantType.QUInt8,  # activations
            ranges,
            [],
            [*opts.exclude_nodes, *unranged, *float_matmuls],
            op_types,
            extra,
        )
        out: onnx.ModelProto = quantizer.quantize_model()
    except Exception as exc:  # ORT's quantizer has no error contract: name the node and the way around
        node = _failing_node(exc)
        where = f"node {node!r}" if node else "this model"
        keep = f'steps.quantize.exclude.nodes: ["{node}"]' if node else "steps.quantize.exclude.nodes"
        fail(
            ModelError,
            f"ONNX Runtime's QDQ quantizer failed on {where} ({type(exc).__name__}: {exc}). Keep that node in "
            f"FP32 with {keep}, or quantize weights per tensor with steps.quantize.per_channel: false.",
        )
    finally:
        logging.getLogger().setLevel(level)
    return out


def depthwise_weights(model: onnx.ModelProto) -> list[str]:
    """The weight initializers of depthwise Convs (one input channel per group)."""
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        w = inits.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if w is not None and len(w.dims) == 4 and group > 1 and w.dims[1] == 1:
            out.append(w.name)
    return out


def node_table(fp32: onnx.ModelProto, qdq: onnx.ModelProto) -> list[dict[str, Any]]:
    """Per original node: how many of its runtime inputs arrive through DequantizeLinear.

    ``int8``: all of them (weights included), ``partial``: some (e.g. a residual Add whose skip
    branch shares a quantized tensor), ``fp32``: none.
    """
    index = GraphIndex(qdq)
    by_name = {n.name: n for n in qdq.graph.node}  # not index.node: "" too (the export step names every node)
    rows = []
    for node in fp32.graph.node:
        q = by_name.get(node.name)
        if q is None:
            continue
        producers = [index.producer(i) for i in q.input]
        dqs = [p for p in producers if p is not None and p.op_type == "DequantizeLinear"]
        if node.op_type in SHAPE_ONLY:
            dqs = []  # reads a quantized tensor's shape, never its values: not INT8 compute
        runtime_inputs = [i for i, p in zip(q.input, producers) if i and (i not in index.arrays or p is not None)]
        grid = "fp8" if any(_zero_point_type(index, dq) == TensorProto.FLOAT8E4M3FN for dq in dqs) else "int8"
        precision = "fp32" if not dqs else (grid if len(dqs) == len(runtime_inputs) else "partial")
        per_channel = [dq for dq in dqs if _size(index.initializer(dq.input[1])) > 1]
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


def _zero_point_type(index: GraphIndex, dq: onnx.NodeProto) -> int | None:
    zp = index.initializer(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    return zp.data_type if zp is not None else None


def _size(tensor: onnx.TensorProto | None) -> int:
    return int(np.prod(tensor.dims)) if tensor is not None else 1


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
