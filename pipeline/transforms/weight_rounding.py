"""GPTQ weight rounding: round each INT8 Conv's weights so that its *output* error is smallest.

Rounding every weight to the nearest grid point minimises each weight's own error, but what the
network sees is the output error ``x · (W_q − W)``, and the errors of weights whose inputs are
correlated (neighbouring pixels, the taps of a 3×3 kernel) add up. With the second moments of the
Conv's receptive fields, ``H = Σ x xᵀ`` over calibration samples (one matrix per Conv group: a
depthwise Conv has one per channel), the output error of an output channel is
``(w_q − w) H (w_q − w)ᵀ``. GPTQ (Frantar et al., 2022, after Optimal Brain Quantization) rounds
the weights one input position at a time and moves each rounding error onto the positions not yet
rounded, weighted by ``H⁻¹``: a greedy solution of that least-squares problem on the INT8 grid.

Only the INT8 values change: scales stay max |w| / 127 per channel and the graph is the same, so
the model runs wherever the nearest-rounded one does (TensorRT, ONNX Runtime). H comes from the
FP32 model's own Conv inputs; bias correction, run afterwards, measures the rounded weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, numpy_helper

from pipeline.calibration.collect import DEFAULT_MEMORY_MB
from pipeline.graph.graph_index import GraphIndex
from pipeline.graph.layout import Layout
from pipeline.graph.model import attribute
from pipeline.log import logger
from pipeline.transforms import statistics_pass

Batch = dict[str, np.ndarray]

# GPTQ's damping: a share of H's mean diagonal added to the diagonal, so that inputs that are
# (almost) linear combinations of others do not make H⁻¹ explode.
DAMPING = 0.01
# Live copies of one sample's activations: the FP32 network's and the Conv inputs fetched from it.
COPIES = 2
# Bytes held per byte of a Conv's float64 second moments (groups·D²·8) while it is measured and rounded:
# the sum itself, one sample's float32 product (half), and GPTQ's inverse and Cholesky factor of a group.
MOMENT_COPIES = 3.5


@dataclass
class _Conv:
    node: onnx.NodeProto  # the FP32 model's Conv
    weight: np.ndarray  # its FP32 weights (O, C/group, kh, kw)
    values: str  # the Q/DQ model's INT8 weight initializer
    scale: np.ndarray  # the weight scale per output channel (O,)


def convs(fp32: onnx.ModelProto, qdq: onnx.ModelProto) -> list[_Conv]:
    """The 2-D Convs of ``qdq`` whose weights are symmetric INT8 (zero point 0) from an initializer."""
    index, f_inits = GraphIndex(qdq), GraphIndex(fp32).arrays
    originals = {n.name: n for n in fp32.graph.node if n.name and n.op_type == "Conv"}
    out = []
    for node in qdq.graph.node:
        original = originals.get(node.name)
        dq = index.producer(node.input[1]) if node.op_type == "Conv" else None
        if original is None or dq is None or dq.op_type != "DequantizeLinear" or original.input[1] not in f_inits:
            continue
        values = index.initializer(dq.input[0])
        if values is None or values.data_type != TensorProto.INT8 or len(index.consumers(dq.input[0])) != 1:
            continue  # activations, uint8 weights, or an initializer another node reads too
        zero = index.array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros(1)
        weight = f_inits[original.input[1]]
        scale = index.array(dq.input[1]).astype(np.float64).reshape(-1)
        if weight.ndim != 4 or np.any(zero != 0) or (scale.size > 1 and int(attribute(dq, "axis", 1)) != 0):
            continue  # not a 2-D Conv, asymmetric, or scales along another axis than the output channels'
        if attribute(original, "auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
            logger.info("quantize: GPTQ leaves %s rounded to nearest (auto_pad SAME_*)", original.name)
            continue  # its padding depends on the input size; exporters write explicit pads
        out.append(_Conv(original, weight, dq.input[0], np.broadcast_to(scale, weight.shape[:1]).copy()))
    return out


def receptive_fields(x: np.ndarray, node: onnx.NodeProto, weight: np.ndarray) -> np.ndarray:
    """The rows a Conv multiplies with its weights: (groups, positions, C/group·kh·kw), one sample ``x`` (C, H, W).

    Row order matches ``weight[o].reshape(-1)`` (channel, kernel row, kernel column). Explicit pads only."""
    _, per_group, kh, kw = weight.shape
    groups = int(attribute(node, "group", 1))
    sh, sw = attribute(node, "strides", [1, 1])
    dh, dw = attribute(node, "dilations", [1, 1])
    top, left, bottom, right = attribute(node, "pads", [0, 0, 0, 0])
    padded = np.pad(x, ((0, 0), (top, bottom), (left, right)))
    span = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    windows = sliding_window_view(padded, span, axis=(1, 2))[:, ::sh, ::sw, ::dh, ::dw]  # C Ho Wo kh kw
    c, ho, wo = windows.shape[:3]
    rows = windows.reshape(groups, per_group, ho * wo, kh * kw).transpose(0, 2, 1, 3)
    return rows.reshape(groups, ho * wo, per_group * kh * kw)


def second_moments(
    fp32: onnx.ModelProto,
    todo: list[_Conv],
    batches: Iterable[Batch],
    samples: int,
    layout: Layout | None = None,
    memory_mb: int = DEFAULT_MEMORY_MB,
) -> tuple[dict[str, np.ndarray], int]:
    """Per Conv, H = Σ x xᵀ over the receptive fields of the first ``samples`` samples: (groups, D, D).

    Summed in float64 (GPTQ's choices flip with tiny changes of H: summed in float32, EfficientNet-Lite0's
    agreement moved by up to 0.009) for every Conv at once: Σ groups·D² · 8 bytes, D = C/group·kh·kw (a 3×3
    Conv over 512 channels alone: 170 MB)."""
    wanted = list(dict.fromkeys(c.node.input[0] for c in todo))
    sums: dict[str, np.ndarray] = {}

    def fold(got: dict[str, np.ndarray], n: int) -> None:
        for conv in todo:
            x = np.asarray(got[conv.node.input[0]], np.float32)
            for sample in x[:n]:  # one sample at a time: a k×k Conv's fields are k² times its input
                rows = receptive_fields(sample, conv.node, conv.weight)
                h = np.matmul(rows.transpose(0, 2, 1), rows)
                total = sums.get(conv.node.name)
                if total is None:
                    sums[conv.node.name] = h.astype(np.float64)
                else:
                    total += h  # in place: a large Conv's H is tens of MB, and this runs per sample

    # Convs that read a graph input (a stem) take it from the feeds: for those alone, no inference at all
    seen = statistics_pass.run(fp32, wanted, batches, samples, fold, label="weight rounding", copies=COPIES,
                               layout=layout, memory_mb=memory_mb, optimize=False)  # fmt: skip
    return sums, seen


def gptq(weight: np.ndarray, scale: np.ndarray, h: np.ndarray, limit: int = 127) -> np.ndarray:
    """INT8 values of ``weight`` (O, D) on the grid ``scale`` (O,), rounded for inputs with moments ``h`` (D, D)."""
    w = weight.astype(np.float64).copy()
    d = w.shape[1]
    h = h.astype(np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0  # an input that is always zero: its weight's rounding costs nothing
    h += DAMPING * np.mean(np.diag(h)) * np.eye(d)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper triangular, uᵀu = H⁻¹
    out = np.zeros(w.shape, np.int8)
    s = scale.reshape(-1).astype(np.float64)
    for i in range(d):
        q = np.clip(np.round(w[:, i] / s), -limit, limit)
        out[:, i] = q
        err = (w[:, i] - q * s) / u[i, i]
        w[:, i + 1 :] -= np.outer(err, u[i, i + 1 :])
    return out


def moment_bytes(conv: _Conv) -> int:
    """The float64 second moments of ``conv``: groups·D², D = C/group·kh·kw (a 1-D Conv over 1,024
    channels with 64 taps: D = 65,536, 32 GiB)."""
    groups = int(attribute(conv.node, "group", 1))
    d = int(conv.weight[0].size)
    return groups * d * d * 8


def budgeted(todo: list[_Conv], memory_mb: int) -> tuple[list[list[_Conv]], list[_Conv]]:
    """``todo`` in consecutive passes whose moments fit ``memory_mb`` together, and the Convs whose
    moments alone do not fit (those keep nearest rounding): checked before anything is allocated."""
    budget = memory_mb << 20
    passes: list[list[_Conv]] = []
    held, too_big = 0, []
    for conv in todo:
        need = moment_bytes(conv)
        if MOMENT_COPIES * need > budget:
            too_big.append(conv)
            continue
        if not passes or held + MOMENT_COPIES * need > budget:
            passes.append([])
            held = 0
        passes[-1].append(conv)
        held += need
    return passes, too_big


def _first_samples(batches: Iterable[Batch], samples: int, layout: Layout) -> list[Batch]:
    """The batches holding the first ``samples`` samples, kept for passes after the first."""
    kept, seen = [], 0
    for batch in batches:
        kept.append(batch)
        seen += layout.count(batch)
        if seen >= samples:
            break
    return kept


def round_weights(
    fp32: onnx.ModelProto,
    qdq: onnx.ModelProto,
    batches: Iterable[Batch],
    samples: int = 128,
    layout: Layout | None = None,
    memory_mb: int = DEFAULT_MEMORY_MB,
) -> tuple[int, int]:
    """Re-round the INT8 weights of ``qdq``'s Convs by GPTQ, in place. Returns (Convs rounded, samples).

    The Convs' second moments are measured in as many passes over the samples as ``memory_mb`` needs;
    a Conv whose moments alone exceed it keeps nearest rounding, with a warning naming it."""
    passes, too_big = budgeted(convs(fp32, qdq), memory_mb)
    for conv in too_big:
        logger.warning(
            "quantize: GPTQ leaves %s rounded to nearest: its second moments (%d×%d per group) need %.0f MB, "
            "more than steps.calibrate.memory_mb=%d allows",
            conv.node.name,
            conv.weight[0].size,
            conv.weight[0].size,
            MOMENT_COPIES * moment_bytes(conv) / 2**20,
            memory_mb,
        )
    if not passes:
        return 0, 0
    if len(passes) > 1:
        logger.info(
            "quantize: GPTQ measures its %d Convs in %d passes to stay within memory_mb",
            sum(map(len, passes)),
            len(passes),
        )
        if iter(batches) is batches:  # an iterator reads once: the later passes read the kept samples
            batches = _first_samples(batches, samples, layout or Layout())
    rounded = seen = 0
    for todo in passes:
        moments, seen = second_moments(fp32, todo, batches, samples, layout, memory_mb)
        if not seen:
            return 0, 0
        _round(qdq, todo, moments)
        rounded += len(todo)
    logger.info("quantize: GPTQ weight rounding on %d Convs from %d calibration samples", rounded, seen)
    return rounded, seen


def _round(qdq: onnx.ModelProto, todo: list[_Conv], moments: dict[str, np.ndarray]) -> None:
    """Write the GPTQ-rounded INT8 values of ``todo`` into ``qdq``'s initializers."""
    inits = {i.name: i for i in qdq.graph.initializer}
    for conv in todo:
        h = moments[conv.node.name]
        groups, out_ch = h.shape[0], conv.weight.shape[0]
        flat = conv.weight.reshape(out_ch, -1)
        per = out_ch // groups
        # the quantizer's own range: 127, or 64 for 7-bit weights (cpu_kernels: int7 must not saturate)
        limit = int(np.abs(numpy_helper.to_array(inits[conv.values]).astype(np.int32)).max())
        values = np.concatenate(
            [gptq(flat[g * per : (g + 1) * per], conv.scale[g * per : (g + 1) * per], h[g], limit)
             for g in range(groups)]
        )  # fmt: skip
        inits[conv.values].CopyFrom(numpy_helper.from_array(values.reshape(conv.weight.shape), conv.values))
