"""Where a network's INT8 error comes from: the weights' rounding or the activations' quantizers.

    python benchmarks/error_sources.py efficientnet [--samples 256] [--validation 256]
    python benchmarks/error_sources.py detector [--model PATH] [--frames text|mosaic] [--size 640]
                                                [--samples 32] [--validation 96]

int8pipe's default Q/DQ model (mse thresholds, TensorRT placement) is scored against FP32 as built
and in two halves: weights only (its activation quantizers bypassed) and activations only (every
node reading the FP32 weights again), then with bias correction, the default. When the activations
alone already cost what the whole model costs, better weight rounding (GPTQ, AdaRound) cannot close
the gap; a wider activation grid can (``target: onnxruntime``'s u8 asymmetric activations, on CPU).
Data, scoring and models as in accuracy_vs_peers.py (EfficientNet-Lite0: top-1 agreement and
logit cosine) and detector_vs_peers.py (PP-OCRv4 detector: FP32 detections kept, precision,
probability-map cosine); every model computed exactly (ORT graph optimisations off).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples" / "efficientnet_lite0"), str(ROOT / "benchmarks")]

from peers import activations_only, weights_only  # noqa: E402

Batches = Callable[[], Iterator[dict[str, np.ndarray]]]
Scorer = Callable[[onnx.ModelProto], str]


def efficientnet(args: argparse.Namespace) -> tuple[Path, Batches, Scorer]:
    from accuracy_vs_ort import crop_array, fp32_model
    from accuracy_vs_peers import agreement, logits
    from data import crops

    path = fp32_model(Path(tempfile.mkdtemp(prefix="int8pipe-sources-")), args.samples)
    x_val = crop_array(args.validation, 1)
    ref = logits(onnx.load(str(path)).SerializeToString(), x_val, optimize=True)

    def score(model: onnx.ModelProto) -> str:
        out = logits(model.SerializeToString(), x_val)
        cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
        return f"top-1 agreement {agreement(out, ref):.3f}, cosine {cos.mean():.4f}"

    return path, lambda: crops(args.samples, 32), score


def detector(args: argparse.Namespace) -> tuple[Path, Batches, Scorer]:
    from detector_vs_peers import batches, detections, find_model, fixed_size, frames, probability_maps, score

    path = fixed_size(find_model(args.model), args.size, Path(tempfile.mkdtemp(prefix="int8pipe-sources-")))
    x_cal = frames(args.frames, args.samples, args.size, seed=0)
    x_val = frames(args.frames, args.validation, args.size, seed=1)
    ref = probability_maps(onnx.load(str(path)).SerializeToString(), x_val, optimize=True)
    ref_boxes = [detections(p, 9) for p in ref]

    def scored(model: onnx.ModelProto) -> str:
        s = score(probability_maps(model.SerializeToString(), x_val), ref, ref_boxes, 9)
        return (
            f"DB boxes kept {s['db_recall']:.3f} precision {s['db_precision']:.3f}; components kept "
            f"{s['recall']:.3f} precision {s['precision']:.3f}; cosine {s['cosine']:.4f}"
        )

    return path, lambda: batches(x_cal), scored


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("network", choices=["efficientnet", "detector"])
    ap.add_argument("--model", help="detector: path to ch_PP-OCRv4_det_infer.onnx")
    ap.add_argument("--size", type=int, default=640, help="detector: frame side")
    ap.add_argument("--frames", choices=("text", "mosaic"), default="text", help="detector: see detector_vs_peers.py")
    ap.add_argument("--samples", type=int, help="calibration samples (default 256 crops / 32 frames)")
    ap.add_argument("--validation", type=int, help="held-out samples (default 256 crops / 96 frames)")
    args = ap.parse_args()
    big = args.network == "efficientnet"
    args.samples = args.samples or (256 if big else 32)
    args.validation = args.validation or (256 if big else 96)

    from pipeline.calibration.calibrator import calibrate, rethreshold
    from pipeline.transforms import bias_correction
    from pipeline.transforms.quantization import QuantizeOptions, quantize, quantized_activations

    path, batches, score = (efficientnet if big else detector)(args)
    fp32 = onnx.load(str(path))
    cal = calibrate(path, batches, "mse", histogram_tensors=quantized_activations(fp32, "tensorrt"))
    amax = rethreshold(cal.ranges, cal.histograms, "mse", 99.99).amax()
    qdq = quantize(fp32, amax, QuantizeOptions(target="tensorrt"))
    print(f"# {args.network}: {args.samples} calibration, {args.validation} held-out samples; mse, TensorRT placement")
    print(f"weights only (activation quantizers bypassed): {score(weights_only(qdq))}", flush=True)
    print(f"activations only (FP32 weights):              {score(activations_only(qdq, fp32))}", flush=True)
    print(f"both, no bias correction:                     {score(qdq)}", flush=True)
    bias_correction.correct(fp32, qdq, batches(), 128)
    print(f"both, bias correction (the default):          {score(qdq)}", flush=True)


if __name__ == "__main__":
    main()
