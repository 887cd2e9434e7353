"""ONNX Runtime's dynamic quantization (``quantize.mode: dynamic``): the CPU alternative to Q/DQ.

Weights are INT8 per output channel, stored once; each activation is quantized at run time from its
own batch's min and max (DynamicQuantizeLinear), so there is nothing to calibrate and no range to get
wrong: what transformers and RNNs on ORT's CPU provider run best. Only ORT runs it (MatMulInteger
and ConvInteger, not Q/DQ), so it is never a TensorRT artifact.

- MatMul with a constant weight, and Gemm (as MatMul + Add): INT8 compute.
- MatMul of two activations (attention's Q·Kᵀ and P·V): left float, since both operands change per
  input and per-tensor dynamic ranges there cost accuracy for little speed.
- Gather from a constant table (embeddings): weight-only INT8, the table stored in 8 bits and
  dequantized after the lookup; the model shrinks, the compute stays float.
- Conv: not by default (ORT's ConvInteger is slower than its float convolution on x86); static
  Q/DQ is the CNN mode.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import onnx

from pipeline.errors import ModelError, fail
from pipeline.execution.cpu_kernels import SCHEMES, Scheme

OP_TYPES = ["MatMul", "Gemm", "Gather"]
INTEGER_OPS = {"MatMulInteger", "ConvInteger"}


def quantize_dynamic(
    model: onnx.ModelProto,
    per_channel: bool,
    exclude_nodes: tuple[str, ...],
    exclude_op_types: tuple[str, ...],
    scheme: Scheme = SCHEMES["int8"],
) -> onnx.ModelProto:
    """``model`` with ORT's dynamic quantization, weights stored as ``scheme`` says (cpu_kernels)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    known = {n.name for n in model.graph.node}
    unknown = [n for n in exclude_nodes if n not in known]
    if unknown:
        fail(ModelError, f"steps.quantize.exclude.nodes: no node named {unknown[0]!r} in the model.")
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer logs advice at WARNING on every call
    with tempfile.TemporaryDirectory(prefix="int8pipe-dynamic-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, src)
        try:
            ort_quantize_dynamic(
                src,
                dst,
                op_types_to_quantize=[o for o in OP_TYPES if o not in exclude_op_types],
                per_channel=per_channel,
                reduce_range=scheme.reduce_range,
                weight_type=QuantType.QUInt8 if scheme.uint8_weights else QuantType.QInt8,
                nodes_to_exclude=list(exclude_nodes),
                extra_options={"MatMulConstBOnly": True},
            )
        except Exception as exc:  # ORT's quantizer has no error contract
            fail(
                ModelError,
                f"ONNX Runtime's dynamic quantizer failed ({type(exc).__name__}: {exc}). Keep the node it names in "
                "FP32 with steps.quantize.exclude.nodes, or use mode: static.",
            )
        finally:
            logging.getLogger().setLevel(level)
        try:
            # ORT's quantizer does not check what it writes: on a float16 MatMul it inserts
            # DynamicQuantizeLinear, which only takes float32, and returns a model nothing can load
            onnx.checker.check_model(str(dst), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            fail(
                ModelError,
                f"ONNX Runtime's dynamic quantizer wrote an invalid model ({first}). Dynamic quantization takes "
                "float32 MatMul/Gemm/Gather inputs: export the model in float32, keep the node it names in FP32 "
                "with steps.quantize.exclude.nodes, or use mode: static.",
            )
        return onnx.load(str(dst))


def node_table(fp32: onnx.ModelProto, dynamic: onnx.ModelProto, per_channel: bool) -> list[dict[str, Any]]:
    """Per original node its precision in ``dynamic``: ``int8`` (replaced by MatMulInteger/ConvInteger),
    ``int8-weights`` (a Gather reading an 8-bit table) or ``fp32``."""
    integer = {n.name for n in dynamic.graph.node if n.op_type in INTEGER_OPS}
    eight_bit = {
        i.name for i in dynamic.graph.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    }
    by_name = {n.name: n for n in dynamic.graph.node if n.name}
    rows = []
    for node in fp32.graph.node:
        # ORT names the integer node after the original: "<name>_quant" ("<name>_MatMul_quant" for a Gemm)
        if {f"{node.name}_quant", f"{node.name}_MatMul_quant"} & integer:
            precision, weights = "int8", "per-channel" if per_channel else "per-tensor"
        elif node.op_type == "Gather" and node.name in by_name and by_name[node.name].input[0] in eight_bit:
            precision, weights = "int8-weights", "per-tensor"
        else:
            precision, weights = "fp32", ""
        rows.append({"node": node.name, "op_type": node.op_type, "precision": precision, "weights": weights})
    return rows
