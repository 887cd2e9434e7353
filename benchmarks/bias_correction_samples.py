"""How many calibration samples bias correction needs, on EfficientNet-Lite0 (the quantize step's default
as `int8pipe run` writes it for target tensorrt: mse, shifted activations, depthwise scales, FP16 float
layers), scored on held-out crops against FP32.

    pip install -e ".[efficientnet]"
    python benchmarks/bias_correction_samples.py [--samples 256] [--validation 1024] [--counts 128,64,32]

Every Q/DQ model computed exactly (ORT graph optimisations off); "recipe CPU s" is the process CPU time of
``recipe.quantize_static``, which includes the depthwise scales' and bias correction's passes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from accuracy_vs_ort import add_crop_args, lite0
from accuracy_vs_peers import agreement, cpu_flags, logits


def main() -> None:
    ap = argparse.ArgumentParser()
    add_crop_args(ap)
    ap.add_argument("--counts", default="128,64,32", help="bias_correction_samples values to compare")
    args = ap.parse_args()

    from data import crops

    from pipeline.calibration.calibrator import calibrate
    from pipeline.transforms import recipe
    from pipeline.transforms.quantization import QuantizeOptions, quantized_activations

    net = lite0("int8pipe-bias-samples-", args.samples, args.validation)
    batches = lambda: crops(args.samples, 32)  # noqa: E731
    cal = calibrate(net.path, batches, "mse", histogram_tensors=quantized_activations(net.fp32, "tensorrt"))
    print(f"# EfficientNet-Lite0: {args.samples} calibration crops, {args.validation} held-out crops; "
          f"CPU flags: {cpu_flags()}\n")  # fmt: skip
    print("| bias_correction_samples | top-1 agreement ± s.e. | logits cosine | recipe CPU s |")
    print("| --- | --- | --- | --- |")
    for n in (int(c) for c in args.counts.split(",")):
        start = time.process_time()
        r = recipe.Recipe(
            quantize=QuantizeOptions(target="tensorrt"), shift_activations=True, depthwise_scales=True,
            bias_correction_samples=n, float_precision="fp16",
        )  # fmt: skip
        model = recipe.quantize_static(net.fp32, cal.ranges, r, recipe.Samples(batches)).model
        cpu = time.process_time() - start
        out = logits(model.SerializeToString(), net.x_val)
        a = agreement(out, net.ref)
        cos = ((out * net.ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(net.ref, axis=1)).mean()
        print(f"| {n} | {a:.3f} ± {np.sqrt(a * (1 - a) / len(out)):.3f} | {cos:.4f} | {cpu:.1f} |", flush=True)


if __name__ == "__main__":
    main()
