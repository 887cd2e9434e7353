"""Pieces the accuracy benchmarks share: ONNX Runtime's quantize_static as a peer, and the
per-layer report of int8pipe's default model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

Batch = dict[str, np.ndarray]


def ort_quantize_static(
    src: Path, dst: Path, batches: Callable[[], Iterator[Batch]], **options: Any
) -> onnx.ModelProto:
    """ONNX Runtime's quantize_static as a user would call it: QDQ, per-channel weights, MinMax."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = batches()

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.batches, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    calibrate_method=CalibrationMethod.MinMax, **options)  # fmt: skip
    return onnx.load(str(dst))


def ort_static_variants() -> dict[str, dict[str, Any]]:
    """Its default (u8 asymmetric activations) and the symmetric s8 scheme TensorRT runs."""
    from onnxruntime.quantization import QuantType

    return {
        "ORT quantize_static MinMax (u8 asymmetric, its default)": {},
        "ORT quantize_static MinMax (s8 symmetric)": {
            "activation_type": QuantType.QInt8,
            "extra_options": {"ActivationSymmetric": True},
        },
    }


def print_layer_report(errs: Any, title: str, rows: int) -> None:
    """The nodes whose own quantization adds the most error, and the lowest-SQNR tensors
    (a pipeline.analysis.layers.LayerErrors), as markdown tables."""
    print(f"\n{title}, quantized nodes whose own quantization adds the most error:\n")
    print("| node | op | added SQNR dB |")
    print("| --- | --- | --- |")
    for r in errs.quantized_nodes[:rows]:
        print(f"| {r['node']} | {r['op_type']} | {r.get('added_sqnr_db', float('nan')):.1f} |")
    print("\nlowest-SQNR tensors (FP32 vs INT8):\n")
    print("| tensor | producer | SQNR dB | cosine |")
    print("| --- | --- | --- | --- |")
    for r in sorted(errs.rows, key=lambda r: r["sqnr_db"])[:rows]:
        print(f"| {r['tensor']} | {r['producer']} | {r['sqnr_db']:.1f} | {r['cosine']:.4f} |")


def weights_only(qdq: onnx.ModelProto) -> onnx.ModelProto:
    """``qdq`` with its activation quantizers bypassed: only the weights are INT8 (what the weights'
    rounding alone costs)."""
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    source: dict[str, str] = {}  # a DequantizeLinear output of an activation -> the float tensor it came from
    quantizers = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    quantized = {n.output[0]: n.input[0] for n in quantizers}
    outputs = {o.name for o in graph.output}
    for n in graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in quantized and n.output[0] not in outputs:
            source[n.output[0]] = quantized[n.input[0]]
    for n in graph.node:
        for k, name in enumerate(n.input):
            if name in source:
                n.input[k] = source[name]
    read = {i for n in graph.node for i in n.input} | outputs
    unread = {q for q in quantized if q not in read}
    keep = [n for n in graph.node if n.output[0] not in source and n.output[0] not in unread]
    del graph.node[:]
    graph.node.extend(keep)
    return model


def activations_only(qdq: onnx.ModelProto, fp32: onnx.ModelProto) -> onnx.ModelProto:
    """``qdq`` with every node reading the FP32 model's float weights and biases again: only the
    activations are INT8 (what the activation quantizers alone cost)."""
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    fp32_inits = {i.name: i for i in fp32.graph.initializer}
    fp32_nodes = {n.name: n for n in fp32.graph.node if n.name}
    producer = {o: n for n in graph.node for o in n.output}
    for n in graph.node:
        original = fp32_nodes.get(n.name)
        if original is None or original.op_type != n.op_type:
            continue
        for k, name in enumerate(n.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or k >= len(original.input):
                continue
            weight = original.input[k]
            if weight in fp32_inits:
                n.input[k] = weight
                if weight not in inits:
                    graph.initializer.append(fp32_inits[weight])
                    inits.add(weight)
    return model


def nncf_builds(fp32: onnx.ModelProto, samples: list[Batch]) -> dict[str, Callable[[], tuple[onnx.ModelProto, None]]]:
    """NNCF's quantize as a user would call it, by row name: its defaults and its preset for
    BERT-like models. Empty when NNCF is not installed (the caller prints that row)."""
    try:
        import nncf
    except ImportError:
        return {}
    import contextlib
    import logging
    import sys

    nncf.set_log_level(logging.WARNING)

    def build(**options: Any) -> Callable[[], tuple[onnx.ModelProto, None]]:
        def run() -> tuple[onnx.ModelProto, None]:
            # its INFO lines and progress bars go to stdout: keep the table clean
            with contextlib.redirect_stdout(sys.stderr):
                return nncf.quantize(fp32, nncf.Dataset(samples), subset_size=len(samples), **options), None

        return run

    return {
        f"NNCF {nncf.__version__} quantize (defaults)": build(),
        f"NNCF {nncf.__version__} quantize (model_type TRANSFORMER)": build(model_type=nncf.ModelType.TRANSFORMER),
    }


def add_latency_args(ap: Any) -> None:
    """``--rounds`` and ``--runs`` of :func:`interleaved_p50`, on an argparse parser."""
    ap.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    ap.add_argument("--runs", type=int, default=60, help="timed runs per model and round")


def interleaved_p50(models: dict[str, bytes], feed: Batch, rounds: int, runs: int) -> dict[str, float]:
    """Batch latency (ms) of each model on ONNX Runtime's CPU provider with its graph optimisations on
    (its int8 kernels): the models take turns over ``rounds`` rounds of ``runs`` runs (10 warm-up),
    so a noisy neighbour slows them all alike; the median of the rounds' medians."""
    import sys

    from pipeline.execution import runtime

    sessions = {name: runtime.session(m, "cpu", optimize=True) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds):
        print(f"latency round {r + 1}/{rounds}", file=sys.stderr, flush=True)
        for name, sess in sessions.items():
            times[name].append(float(np.median(runtime.time_session(sess, feed, runs, 10))))
    return {name: float(np.median(t)) for name, t in times.items()}
