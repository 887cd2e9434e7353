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
    (a pipeline.layers.LayerErrors), as markdown tables."""
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
