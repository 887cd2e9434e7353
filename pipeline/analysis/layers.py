"""Where the INT8 error comes from: every tensor FP32 vs INT8, and the quantized nodes ranked by the
error their own quantization adds. Plain numerics on two ONNX models, no tracking."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import onnx

from pipeline.analysis import evaluation
from pipeline.calibration.collect import exposed
from pipeline.execution import runtime
from pipeline.graph import model as onnx_model
from pipeline.graph.graph_index import GraphIndex
from pipeline.graph.layout import Layout
from pipeline.log import logger, progress
from pipeline.sources import data
from pipeline.transforms.quantization import dequantized_names, node_table

LAYER_CHUNK = 2  # samples per call while comparing every tensor: every tensor of both models is alive at once
# Sets of one chunk's FP32 activations alive then: both models' tensors (INT8's about twice FP32's),
# each inside ONNX Runtime and again as the arrays it returns.
LAYER_COPIES = 6
SQNR_CAP = 999.0  # what an exact tensor's (infinite) SQNR is written as


@dataclass
class LayerErrors:
    """The per-tensor error table and the quantized nodes of one INT8 model, worst first."""

    rows: list[dict[str, Any]]  # per tensor: node, producer, int8_value, sqnr_db (capped), cosine, max_abs_err
    quantized_nodes: list[dict[str, Any]]  # the int8 nodes of node_table, lowest added_sqnr_db first
    candidates: list[dict[str, Any]]  # the int8 and partial nodes, ranked alike: what recovery may keep float

    @property
    def sqnr_db_min(self) -> float:
        """The worst tensor's SQNR in dB; 999 when it is not finite (or there are no tensors)."""
        worst = min((r["sqnr_db"] for r in self.rows), default=math.inf)
        return worst if math.isfinite(worst) else SQNR_CAP


def tensor_groups(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """``sizes``' tensors (in their order) cut into consecutive groups of at most ``limit`` bytes each;
    a tensor larger than ``limit`` on its own makes a group."""
    groups: list[list[str]] = []
    total = 0
    for name, size in sizes.items():
        if not groups or total + size > limit:
            groups.append([])
            total = 0
        groups[-1].append(name)
        total += size
    return groups


def layer_errors(
    fp32_model: onnx.ModelProto,
    int8_model: onnx.ModelProto,
    feeds: Callable[[], Iterable[data.Batch]],
    samples: int,
    int8_optimize: bool = True,
    layout: Layout | None = None,
    chunk: int = LAYER_CHUNK,
    groups: list[list[str]] | None = None,
) -> LayerErrors:
    """FP32-vs-INT8 error of every tensor over the first ``samples`` of ``feeds()`` (model inputs), and
    the quantized nodes ranked by :func:`rank_quantized_nodes`.

    For a quantized tensor the INT8 side is its DequantizeLinear output, the value the next layer
    consumes; the float tensor a QuantizeLinear reads is measured too (the error a node receives
    before its own quantization).

    Every compared tensor of both models is alive at once during a call. ``groups`` (FP32 tensor
    names, see :func:`tensor_groups`) compares them a group per pass over the data instead: memory
    bounded by the largest group, at the cost of one pass of both models per group.
    """
    graph_inputs = {vi.name for vi in onnx_model.graph_inputs(int8_model)}
    int8 = GraphIndex(int8_model)
    seen_as = dequantized_names(int8_model)
    tensors = [t for t in onnx_model.activation_tensors(fp32_model) if int8.producer(t) is not None or t in seen_as]
    producer = onnx_model.producers(fp32_model)
    int8_name = {t: seen_as.get(t, t) for t in tensors}
    # the float value a QuantizeLinear reads (graph inputs are exact, nothing to measure)
    before_q: dict[str, str] = {}
    for t, n in int8_name.items():
        q_input = _quantizer_input(n, int8)
        if q_input is not None and q_input not in graph_inputs:
            before_q[t] = q_input
    acc = {t: evaluation.ErrorAccumulator() for t in tensors}
    acc_before = {t: evaluation.ErrorAccumulator() for t in before_q}
    layout = layout or Layout()  # the data source's batch_axes and constants
    compared = set(tensors)
    passes = [[t for t in g if t in compared] for g in groups or []]
    grouped = {t for g in passes for t in g}
    passes = [g for g in [*passes, [t for t in tensors if t not in grouped]] if g]
    if len(passes) > 1:
        logger.info("validate: comparing layers in %d passes over the data, a group of tensors each", len(passes))
    for number, group in enumerate(passes, 1):
        _compare(
            fp32_model,
            int8_model,
            group,
            label="validate: comparing layers" + (f" (pass {number}/{len(passes)})" if len(passes) > 1 else ""),
            int8_name=int8_name,
            before_q=before_q,
            acc=acc,
            acc_before=acc_before,
            feeds=feeds(),
            samples=samples,
            int8_optimize=int8_optimize,
            layout=layout,
            chunk=chunk,
        )
    rows: list[dict[str, Any]] = [
        {
            "tensor": t,
            # the quantized nodes that read this tensor's dequantized value
            "node": ", ".join(_reader_names(int8, n)) if _is_dequantized(n, int8) else "",
            "producer": producer.get(t, ""),
            "int8_value": "dequantized" if t in seen_as else "float",
            "sqnr_db": _cap(acc[t].sqnr_db),
            "cosine": acc[t].cosine,
            "max_abs_err": acc[t].max_abs_err,
        }
        for t, n in int8_name.items()
    ]
    args = (
        fp32_model,
        int8_model,
        {t: acc[t].sqnr_db for t in tensors},
        {t: acc_before[t].sqnr_db for t in before_q},
        int8_name,
        before_q,
    )
    return LayerErrors(rows, rank_quantized_nodes(*args), rank_quantized_nodes(*args, precisions=("int8", "partial")))


def _compare(
    fp32_model: onnx.ModelProto,
    int8_model: onnx.ModelProto,
    tensors: list[str],
    *,
    label: str,
    int8_name: dict[str, str],
    before_q: dict[str, str],
    acc: dict[str, evaluation.ErrorAccumulator],
    acc_before: dict[str, evaluation.ErrorAccumulator],
    feeds: Iterable[data.Batch],
    samples: int,
    int8_optimize: bool,
    layout: Layout,
    chunk: int,
) -> None:
    """One pass over the data comparing ``tensors`` of both models, into the accumulators; progress
    is logged under ``label``."""
    fetch = [int8_name[t] for t in tensors]
    fetch = list(dict.fromkeys([*fetch, *(before_q[t] for t in tensors if t in before_q)]))
    a = runtime.session(exposed(fp32_model, tensors))
    b = runtime.session(exposed(int8_model, fetch), optimize=int8_optimize)
    parts = _first_samples(data.rechunk(feeds, chunk, layout), samples, layout)
    for part in progress(parts, label, total=samples, size=layout.count, unit="samples"):
        got = dict(zip(fetch, b.run(fetch, part)))
        for t, x in zip(tensors, a.run(tensors, part)):
            acc[t].update(x, got[int8_name[t]])
            if t in before_q:
                acc_before[t].update(x, got[before_q[t]])


def _first_samples(parts: Iterable[data.Batch], samples: int, layout: Layout) -> Iterator[data.Batch]:
    """``parts`` cut off after ``samples`` samples."""
    seen = 0
    for part in parts:
        if seen >= samples:
            return
        part = layout.take(part, 0, samples - seen)
        seen += layout.count(part)
        yield part


def _cap(sqnr_db: float) -> float:
    return min(sqnr_db, SQNR_CAP)


def _is_dequantized(name: str, index: GraphIndex) -> bool:
    node = index.producer(name)
    return node is not None and node.op_type == "DequantizeLinear"


def _reader_names(index: GraphIndex, tensor: str) -> list[str]:
    """The names of the nodes reading ``tensor`` other than quantizers (once per input slot)."""
    return [n.name for n in index.consumers(tensor) if n.op_type not in ("QuantizeLinear", "DequantizeLinear")]


def _quantizer_input(name: str, index: GraphIndex) -> str | None:
    """For the output of a DequantizeLinear fed by a QuantizeLinear: the float tensor quantized."""
    dq = index.producer(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = index.producer(dq.input[0])
    return str(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None


def rank_quantized_nodes(
    fp32_model: onnx.ModelProto,
    int8_model: onnx.ModelProto,
    sqnr: dict[str, float],
    sqnr_before_q: dict[str, float],
    int8_name: dict[str, str],
    before_q: dict[str, str],
    precisions: tuple[str, ...] = ("int8",),
) -> list[dict[str, Any]]:
    """The nodes whose node_table precision is in ``precisions``, the ones whose quantization adds
    the most error first.

    A node's inputs arrive with the error of everything upstream (the float tensor before its
    QuantizeLinear, measured against FP32); its output (as its consumers see it) carries that plus what
    quantizing this node's activations and weights added. In relative noise power (noise / signal,
    10^(-SQNR/10)) the node adds output noise minus the noisiest input's; ``added_sqnr_db`` is the SQNR
    that added noise alone would give (lower is worse). Excluding a node removes that share. A float
    input of a ``partial`` node counts with its own error (nothing of it is this node's quantization).
    """
    fp32, int8 = GraphIndex(fp32_model), GraphIndex(int8_model)
    row_of = {n: t for t, n in int8_name.items()}  # INT8-model tensor -> layer-table tensor
    row_before = {n: t for t, n in before_q.items()}  # float tensor a QuantizeLinear reads -> table tensor
    ranked = []
    for entry in node_table(fp32_model, int8_model):
        node, original = int8.node(entry["node"]), fp32.node(entry["node"])
        if entry["precision"] not in precisions or node is None or original is None:
            continue
        noise_in, dq_sqnr = 0.0, math.inf
        for i in node.input:
            t = row_of.get(i)
            if t is None:  # a weight or a float input
                continue
            dq_sqnr = min(dq_sqnr, sqnr[t])
            dq = evaluation.relative_noise(sqnr[t])
            if not _is_dequantized(i, int8):  # a float input of a partial node: its error is upstream's
                noise_in = max(noise_in, dq)
                continue
            # min: where ORT deleted a Relu/Clip the quantizer's input is the unclipped tensor
            before = evaluation.relative_noise(sqnr_before_q[t]) if t in sqnr_before_q else 0.0
            noise_in = max(noise_in, min(dq, before))
        out = node.output[0] if node.output else ""
        if out in row_before:  # output quantized (target onnxruntime): what consumers see is its DQ
            out_sqnr = sqnr[row_before[out]]
        elif out in row_of:
            out_sqnr = sqnr[row_of[out]]
        elif original.output and original.output[0] in sqnr:
            out_sqnr = sqnr[original.output[0]]
        else:  # no float output measured: the error of its dequantized inputs
            out_sqnr = dq_sqnr
        added = max(evaluation.relative_noise(out_sqnr) - noise_in, 0.0)
        ranked.append(
            {
                "node": entry["node"],
                "op_type": entry["op_type"],
                "input_sqnr_db": _cap(-10.0 * math.log10(noise_in)) if noise_in > 0 else SQNR_CAP,
                "output_sqnr_db": _cap(out_sqnr),
                "added_sqnr_db": _cap(-10.0 * math.log10(added)) if added > 0 else SQNR_CAP,
            }
        )
    ranked.sort(key=lambda r: r["added_sqnr_db"])
    return ranked
