"""Peak memory of calibrating a 640x640 detector-sized network: int8pipe against ORT's quantize_static.

    python benchmarks/calibration_memory.py [--samples 16] [--peers MinMax Entropy]

Model: a synthetic text-detector-shaped network built here (no download): a full-resolution stem
(3 -> 16 channels at 640x640, the wide early activations that dominate memory), three stride-2
Conv/Relu stages, and an FPN-like top-down path (Resize x2, Concat, Conv/Relu) back to 1/2 scale.
Data: ``--samples`` random images [3, 640, 640] in an npz, read by both tools.

Every measurement runs in its own wrapper process; its peak RSS is ``resource.getrusage(
RUSAGE_CHILDREN).ru_maxrss`` of the measured child, so nothing this script holds is counted.
int8pipe is the whole ``int8pipe run`` (export + calibrate at the default ``calibrate.memory_mb``,
against a fresh sqlite store); ORT is one ``quantize_static`` call (QDQ, the given calibration method).
The CPU flags from /proc/cpuinfo are printed with the results.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
SIZE = 640
WRAPPER = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"wall": time.perf_counter() - t, "rc": p.returncode, "out": p.stdout[-2000:],
                  "err": p.stderr[-3000:], "rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def detector(seed: int = 0) -> onnx.ModelProto:
    """x [N, 3, 640, 640] -> a probability-map-like [N, 1, 320, 320]; ~140 MB of activations per sample."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def conv(src: str, cin: int, cout: int, name: str, stride: int = 1, relu: bool = True) -> str:
        w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (9 * cin))).astype(np.float32)
        inits.extend(
            [numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(np.zeros(cout, np.float32), f"{name}.b")]
        )
        nodes.append(helper.make_node("Conv", [src, f"{name}.w", f"{name}.b"], [f"{name}.c"], name=name,
                                      pads=[1, 1, 1, 1], strides=[stride, stride]))  # fmt: skip
        if not relu:
            return f"{name}.c"
        nodes.append(helper.make_node("Relu", [f"{name}.c"], [f"{name}.r"], name=f"{name}.relu"))
        return f"{name}.r"

    def up(src: str, name: str) -> str:
        nodes.append(helper.make_node("Resize", [src, "", "scale2"], [name], name=name, mode="nearest"))
        return name

    inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scale2"))
    s1 = conv("x", 3, 16, "stem")  # 640x640x16
    s2 = conv(s1, 16, 32, "down1", stride=2)  # 320
    s3 = conv(s2, 32, 64, "down2", stride=2)  # 160
    s4 = conv(s3, 64, 128, "down3", stride=2)  # 80
    nodes.append(helper.make_node("Concat", [up(s4, "up3"), s3], ["cat3"], name="cat3", axis=1))
    f3 = conv("cat3", 192, 64, "fuse3")  # 160
    nodes.append(helper.make_node("Concat", [up(f3, "up2"), s2], ["cat2"], name="cat2", axis=1))
    f2 = conv("cat2", 96, 32, "fuse2")  # 320
    conv(f2, 32, 1, "head", relu=False)
    graph = helper.make_graph(
        nodes,
        "detector640",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("head.c", TensorProto.FLOAT, ["batch", 1, SIZE // 2, SIZE // 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def measured(cmd: list[str], cwd: Path) -> dict:
    """``cmd`` in a fresh wrapper process: wall seconds, peak RSS bytes, its output."""
    res = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, cwd=cwd, check=True)
    got = json.loads(res.stdout)
    if got["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{got['err']}")
    return got


def ort_worker(model: str, data: str, method: str) -> None:
    """One quantize_static run over the npz's samples, one sample per batch."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static

    x = np.load(data)["x"]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(range(len(x)))

        def get_next(self):  # type: ignore[no-untyped-def]
            i = next(self.it, None)
            return None if i is None else {"x": x[i : i + 1]}

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        quantize_static(model, str(Path(tmp) / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                        calibrate_method=getattr(CalibrationMethod, method))  # fmt: skip
        print(json.dumps({"seconds": time.perf_counter() - start}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--peers", nargs="*", default=["MinMax"], help="ORT CalibrationMethod names")
    ap.add_argument("--ort-worker", nargs=3, metavar=("MODEL", "DATA", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ort_worker:
        ort_worker(*args.ort_worker)
        return
    from pipeline.calibration.collect import DEFAULT_MEMORY_MB
    from pipeline.execution import environment

    cpu = environment.cpu()
    print(f"CPU: {cpu['model']}, {cpu['count']} cores; /proc/cpuinfo flags: {' '.join(cpu['flags'])}")
    with tempfile.TemporaryDirectory(prefix="calibration-memory-") as tmp:
        folder = Path(tmp)
        onnx.save(detector(), str(folder / "model.onnx"))
        rng = np.random.default_rng(1)
        x = rng.uniform(-1, 1, (args.samples, 3, SIZE, SIZE)).astype(np.float32)
        np.savez(folder / "data.npz", x=x)
        del x
        (folder / "pipeline.yaml").write_text(
            "name: memory-640\nmodel: {onnx: model.onnx}\ndata:\n  calibration: {npz: data.npz}\n"
            "steps:\n  export: {}\n  calibrate: {method: entropy}\n"
        )
        rows = []
        ours = measured(
            [sys.executable, "-m", "pipeline", "run", str(folder / "pipeline.yaml"), "--tracking-uri",
             f"sqlite:///{folder / 'mlflow.db'}", "--summary-json", str(folder / "s.json")],
            ROOT,
        )  # fmt: skip
        metrics = json.loads((folder / "s.json").read_text())["metrics"]
        rows.append(
            (f"int8pipe run (export + calibrate entropy, memory_mb {DEFAULT_MEMORY_MB})", ours["wall"], ours["rss"])
        )
        print(
            f"int8pipe: {metrics['activation_mb_per_sample']:.0f} MB of exposed activations per sample, "
            f"{metrics['calibration_chunk']:.0f} sample(s) per ONNX Runtime call, "
            f"calibrate step {metrics['calibration_seconds']:.1f}s"
        )
        for method in args.peers:
            got = measured([sys.executable, __file__, "--ort-worker", str(folder / "model.onnx"),
                            str(folder / "data.npz"), method], ROOT)  # fmt: skip
            rows.append((f"ORT quantize_static {method}", got["wall"], got["rss"]))
    print(f"\n{args.samples} samples of [3, {SIZE}, {SIZE}]; peak RSS of the measured process\n")
    print("| run | wall s | peak RSS GiB |")
    print("| --- | --- | --- |")
    for name, wall, rss in rows:
        print(f"| {name} | {wall:.1f} | {rss / 2**30:.2f} |")


if __name__ == "__main__":
    main()
