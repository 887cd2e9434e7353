"""CPU time of a default int8pipe pipeline through validate against ONNX Runtime's quantize_static plus
scoring the same validation data (issue 24: validate at the peers' cost), in one run.

    pip install -e ".[efficientnet]"
    python benchmarks/pipeline_cost.py [--config examples/efficientnet_lite0/pipeline.yaml] [--set k=v]...

int8pipe: ``int8pipe run CONFIG`` (a config of export, calibrate, quantize, validate: the example's; no reuse)
as a child process, its CPU seconds and peak RSS from ``os.wait4``. The peer, in its own child: the
FP32 model int8pipe exported, ``quantize_static`` (QDQ, per-channel, MinMax) over the same calibration
batches, then the FP32 and the INT8 model scored on the same validation batches (ORT sessions, the
INT8 one with optimisations off as int8pipe's exact validation runs it). CPU seconds are what both pay
on a shared machine; the ratio is what the target (at most 2x) is about.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER = r"""
import json, sys
from pathlib import Path
import numpy as np
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from benchmarks_peers import ort_quantize_static
from pipeline.execution import runtime
from pipeline.orchestration.runner import load_config
from pipeline.graph import model as onnx_model
from pipeline.sources import data

cfg = load_config(sys.argv[3])
fp32 = Path(sys.argv[4])
specs, dirs = onnx_model.input_specs(onnx_model.load(fp32, check=False)), data.search_dirs(cfg.base_dir)
def batches(which):
    src = getattr(cfg.data, which)
    return lambda: ({k: v for k, v in b.items() if k != "labels"} for b in data.batches(src, 32, specs, dirs, which))
int8 = ort_quantize_static(fp32, Path(sys.argv[5]), batches("calibration"))
a, b = runtime.session(str(fp32)), runtime.session(int8.SerializeToString(), optimize=False)
cos = []
for feed in batches("validation")():
    x, y = a.run(None, feed)[0], b.run(None, feed)[0]
    x, y = x.reshape(len(x), -1), y.reshape(len(y), -1)
    cos += list((x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)))
print(json.dumps({"cosine_mean": float(np.mean(cos)), "samples": len(cos)}))
"""


def child(cmd: list[str], env: dict[str, str]) -> tuple[str, float, float]:
    """stdout, CPU seconds (user + system, the child and its children) and peak RSS (GiB) of ``cmd``."""
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode()
    if proc.returncode != 0:
        sys.exit(f"{cmd[:4]} failed with exit {proc.returncode}")
    return text, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="examples/efficientnet_lite0/pipeline.yaml")
    ap.add_argument("--set", action="append", default=[], help="an override for int8pipe run, e.g. k=v")
    args = ap.parse_args()
    flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
    int8_flags = " ".join(f for f in flags if "avx" in f or "vnni" in f or "amx" in f)
    print(f"CPU int8 flags: {int8_flags}; cores {os.cpu_count()}")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "s.json"
        run = [sys.executable, "-m", "pipeline", "run", args.config, "--tracking-uri", f"sqlite:///{tmp}/m.db",
               "--no-reuse", "--summary-json", str(summary)]  # fmt: skip
        run += [a for kv in args.set for a in ("--set", kv)]
        _, ours, ours_rss = child(run, env)
        s = json.loads(summary.read_text())
        import mlflow

        fp32 = mlflow.artifacts.download_artifacts(
            run_id=s["steps"]["export"], artifact_path="model/model.onnx", tracking_uri=f"sqlite:///{tmp}/m.db"
        )
        (Path(tmp) / "benchmarks_peers.py").write_text((ROOT / "benchmarks" / "peers.py").read_text())
        peer_cmd = [sys.executable, "-c", PEER, str(ROOT), tmp, args.config, fp32, str(Path(tmp) / "ort.onnx")]
        out, peer, peer_rss = child(peer_cmd, env)
        peer_result = json.loads(out.strip().splitlines()[-1])
    metrics = s["metrics"]
    print("| what | CPU s | peak RSS GiB | result |\n| --- | --- | --- | --- |")
    print(
        f"| int8pipe {' '.join(args.set) or 'defaults'}, export -> validate | {ours:.0f} | {ours_rss:.2f} | "
        "cosine drop "
        f"{metrics.get('accuracy_drop', float('nan')):.4f}, gate {s['gate']} |"
    )
    print(
        f"| ORT quantize_static + scoring FP32 and INT8 | {peer:.0f} | {peer_rss:.2f} | cosine "
        f"{peer_result['cosine_mean']:.4f} on {peer_result['samples']} samples |"
    )
    print(f"\nint8pipe / peer CPU seconds: {ours / peer:.2f}x (target: at most 2x)")


if __name__ == "__main__":
    main()
