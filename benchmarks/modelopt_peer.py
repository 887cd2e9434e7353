"""NVIDIA ModelOpt's ONNX INT8 quantization beside int8pipe's default, on the benchmarks' networks.

ModelOpt (``nvidia-modelopt[onnx]``) pulls onnxruntime-gpu, cupy and its own onnx, so it lives in a
throwaway virtual environment, and this script runs in three stages that share a folder:

    # 1. int8pipe's venv: each network's prepared FP32 model and calibration samples
    python benchmarks/modelopt_peer.py dump /tmp/mo-nets --networks lite0,lite2,ppocr_det,layout --cal 64
    # 2. a venv with ModelOpt only (torch's CPU wheel first, or it pulls CUDA torch)
    python3 -m venv /tmp/mo && /tmp/mo/bin/pip install torch==2.13.0 && /tmp/mo/bin/pip install "nvidia-modelopt[onnx]"
    /tmp/mo/bin/python benchmarks/modelopt_peer.py quantize /tmp/mo-nets
    # 3. int8pipe's venv again: score ModelOpt's models and int8pipe's default on the held-out data
    python benchmarks/modelopt_peer.py score /tmp/mo-nets --networks lite0,lite2,ppocr_det,layout --cal 64 --val 256

Stage 2 runs ``modelopt.onnx.quantization.quantize`` with its defaults (INT8, entropy calibration, float
layers in FP16) and with ``calibration_method="max"``, on the CPU execution provider, one child process
per model (its CPU seconds and peak RSS). Stage 3 scores every model exactly (ORT graph optimisations
off, FP16 nodes through int8pipe's emulation) as benchmarks/defaults_across_networks.py does, beside
int8pipe's default as ``int8pipe run`` writes it (FP16 float regions), built in the same run. Stages 1
and 3 take defaults_across_networks.py's data options and must be given the same ones.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("entropy", "max")


def dump(folder: Path, args: argparse.Namespace) -> None:
    import shutil

    import defaults_across_networks as bench
    import held_out_networks  # noqa: F401  (registers lite2 and captcha_crnn)

    (folder / "_work").mkdir(parents=True, exist_ok=True)
    for net in bench.loaded(args, folder / "_work"):
        out = folder / net.key
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(net.path, out / "fp32.onnx")
        np.savez(out / "calibration.npz", **net.x_cal)
        bench.progress(f"{net.key}: dumped {len(next(iter(net.x_cal.values())))} calibration samples")


def quantize_one(folder: Path, method: str) -> None:
    """In ModelOpt's venv, in a child process: one network, one calibration method."""
    from modelopt.onnx.quantization import quantize

    data = dict(np.load(folder / "calibration.npz"))
    start = time.process_time()
    quantize(
        str(folder / "fp32.onnx"),
        quantize_mode="int8",
        calibration_data=data,
        calibration_method=method,
        calibration_eps=["cpu"],
        output_path=str(folder / f"modelopt_{method}.onnx"),
        log_level="WARNING",
    )
    cost = {"cpu_s": time.process_time() - start, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    (folder / f"modelopt_{method}.json").write_text(json.dumps(cost))


def quantize_all(folder: Path) -> None:
    import modelopt

    for net in sorted(p for p in folder.iterdir() if (p / "fp32.onnx").is_file()):
        for method in METHODS:
            print(
                f"[{time.strftime('%H:%M:%S')}] {net.name}: ModelOpt {modelopt.__version__} int8 {method}", flush=True
            )
            done = subprocess.run([sys.executable, __file__, "_one", str(net), method], capture_output=True, text=True)
            if done.returncode:
                (net / f"modelopt_{method}.json").write_text(json.dumps({"error": done.stderr.strip()[-400:]}))
                print(f"  failed: {done.stderr.strip()[-400:]}", flush=True)


def score(folder: Path, args: argparse.Namespace) -> None:
    import defaults_across_networks as bench
    import held_out_networks  # noqa: F401

    print(f"# /proc/cpuinfo flags: {bench.cpu_flags()}")
    (folder / "_work").mkdir(parents=True, exist_ok=True)
    for net in bench.loaded(args, folder / "_work"):
        score_net(folder, net)


def score_net(folder: Path, net: Any) -> None:
    import defaults_across_networks as bench
    import onnx

    from pipeline.calibration.calibrator import calibrate
    from pipeline.transforms.quantization import node_table, quantized_activations
    from pipeline.transforms.roles import graph_kind

    compute = [n.name for n in net.fp32.graph.node if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose")]
    ref = net.outputs(net.fp32.SerializeToString(), True)
    print(f"\n## {net.title}\n")
    print(f"| INT8 model | Conv/Gemm/MatMul INT8 | {net.metric} ± s.e. | {net.extra} | CPU s | peak RSS GiB |")
    print("| --- | --- | --- | --- | --- | --- |", flush=True)

    def row(name: str, model: onnx.ModelProto, cpu_s: float, rss_mb: float) -> None:
        s = net.score(net.outputs(model.SerializeToString(), False), ref)
        int8 = sum(r["precision"] == "int8" and r["node"] in compute for r in node_table(net.fp32, model))
        print(f"| {name} | {int8}/{len(compute)} | {s.main:.3f} ± {s.se:.3f} | {s.extra} | {cpu_s:.1f} | "
              f"{rss_mb / 1024:.2f} |", flush=True)  # fmt: skip

    transformer = graph_kind(net.fp32) == "attention"
    default = next(c for c in bench.candidates(transformer, transformer) if c.name.startswith("pipeline default"))

    def build() -> bytes:
        cal = calibrate(net.path, net.cal_batches, "mse", histogram_tensors=quantized_activations(net.fp32, "tensorrt"))
        return bench.build_int8pipe(net, cal, default).SerializeToString()

    out = folder / net.key / "int8pipe.pkl"
    cost = bench.in_child(build, out)  # calibration and build in a child: its own CPU seconds and peak RSS
    if cost.error:
        print(f"| int8pipe {default.name} | failed: {cost.error} | | | | |")
    else:
        row(f"int8pipe {default.name}", onnx.load_from_string(pickle.loads(out.read_bytes())), cost.cpu_s, cost.rss_mb)
    for method in METHODS:
        done = json.loads((folder / net.key / f"modelopt_{method}.json").read_text())
        if "error" in done:
            print(f"| ModelOpt int8 {method} | failed: {done['error'][-200:]} | | | | |")
            continue
        model = onnx.load(str(folder / net.key / f"modelopt_{method}.onnx"))
        row(f"ModelOpt int8 {method} (float layers FP16, its default)", model, done["cpu_s"], done["rss_mb"])


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "_one":
        quantize_one(Path(sys.argv[2]), sys.argv[3])
        return
    if len(sys.argv) >= 3 and sys.argv[1] == "quantize":
        quantize_all(Path(sys.argv[2]))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    stage, folder = sys.argv[1], Path(sys.argv[2])
    sys.argv = [sys.argv[0], *sys.argv[3:]]
    import defaults_across_networks as bench

    args = bench.parser().parse_args()
    (dump if stage == "dump" else score)(folder, args)


if __name__ == "__main__":
    main()
