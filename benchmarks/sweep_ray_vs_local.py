"""A four-method sweep of EfficientNet-Lite0, locally (parallel: 1) and on a local Ray cluster, in one run.

    pip install -e ".[efficientnet,ray]"
    python benchmarks/sweep_ray_vs_local.py [--set KEY=VALUE ...] [--rounds 1]

Each round runs examples/efficientnet_lite0/pipeline.yaml with
``sweep.grid = {steps.calibrate.method: [minmax, entropy, percentile, mse]}`` three times against the
same real ``mlflow server`` (one experiment per sweep and round, so none reuses another's steps), each
as its own ``int8pipe run`` process: locally with ``parallel: 1``; locally with ``OMP_NUM_THREADS=1``,
which is what Ray gives a task reserving one CPU (PyTorch's export then runs one thread), to tell
thread counts from parallelism; and with ``executor: ray``. The Ray cluster is a head and one worker
node, 1 CPU each, on this machine (tests/ray_cluster.py), so two trials run at once; it is started
before the first sweep (idle during the local ones) and its start-up is reported apart. ``--set``
items go to every sweep (e.g. fewer samples: ``--set data.calibration.args.n=128``).

Peak RSS per process is each process's own high-water mark (VmHWM in /proc/<pid>/status), sampled
every 0.2 s while it lives: the driver (``int8pipe run``), every trial process, the export step's
PyTorch exporter child process, and (for the Ray sweep) Ray's own processes on both nodes (raylet,
GCS, workers, agents). The per-trial gates and metrics of the sweeps are compared, timings aside.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
CONFIG = ROOT / "examples" / "efficientnet_lite0" / "pipeline.yaml"
METHODS = ["minmax", "entropy", "percentile", "mse"]
BIN = Path(sys.executable).parent


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    return env | {"MLFLOW_DISABLE_TELEMETRY": "true", "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"} | extra


def _status(pid: int) -> tuple[str, int] | None:
    """(name, VmHWM kB) of ``pid``, or None once it is gone."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        hwm = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmHWM"))
    except (OSError, StopIteration):
        return None
    if "--under" in argv and "-c" not in argv:
        name = "trial " + argv[argv.index("--run-name") + 1]
    elif "pipeline.graph.torch_export" in argv:
        name = "export"  # the export step runs the PyTorch exporter in a child process
    elif argv[0].startswith("ray::"):
        name = argv[0].split()[0]  # ray::IDLE, ray::run_trial_process, ...
    else:
        name = " ".join(argv[:3]) if "python" in Path(argv[0]).name else Path(argv[0]).name
    return name, int(hwm.split()[1])


class PeakRss:
    """Samples the high-water mark of a process tree every 0.2 s (each process's own peak)."""

    def __init__(self, roots: Any):
        self.roots = roots  # () -> root pids; their descendants are sampled too
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                pid, rest = stat.read_text().split(" (", 1)
                children.setdefault(int(rest.rsplit(")", 1)[1].split()[1]), []).append(int(pid))
            except (OSError, ValueError, IndexError):
                continue
        out, todo = [], list(self.roots())
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, []))
        return out

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for pid in self._tree():
                got = _status(pid)
                if got is not None:
                    name, hwm = got
                    self.peaks[pid] = (name, max(hwm, self.peaks.get(pid, ("", 0))[1]))


def start_server(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--artifacts-destination", str(folder / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=folder,
        env=clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow server did not start")


def sweep(
    url: str, folder: Path, experiment: str, sweep_cfg: str, sets: list[str], cluster: Any, **env: str
) -> dict[str, Any]:
    summary = folder / f"{experiment}.json"
    cmd = [sys.executable, "-m", "pipeline", "run", str(CONFIG), "--tracking-uri", url, "--summary-json", str(summary),
           "--set", f"experiment={experiment}", "--set", f"sweep={sweep_cfg}"]  # fmt: skip
    for item in sets:
        cmd += ["--set", item]
    start = time.perf_counter()
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=folder, env=clean_env(**env))
    with PeakRss(lambda: [driver.pid] + (cluster.processes() if cluster else [])) as rss:
        _, err = driver.communicate()
    wall = time.perf_counter() - start
    if driver.returncode != 0:
        raise RuntimeError(f"{experiment} failed ({driver.returncode}):\n{err.decode()[-3000:]}")
    s = json.loads(summary.read_text())
    return {"wall": wall, "peaks": rss.peaks, "driver": driver.pid, "summary": s}


def outcome(s: dict[str, Any]) -> list[Any]:
    return [
        (t["overrides"], t["gate"], {k: v for k, v in t["metrics"].items() if not k.endswith("_seconds")})
        for t in s["trials"]
    ]


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    out = []
    for (over, gate_a, ma), (_, gate_b, mb_) in zip(outcome(a), outcome(b)):
        trial = over["steps.calibrate.method"]
        if gate_a != gate_b:
            out.append(f"{trial}: gate {gate_a} vs {gate_b}")
        for k in sorted(set(ma) | set(mb_)):
            if ma.get(k) != mb_.get(k):
                out.append(f"{trial}: {k} {ma.get(k)!r} vs {mb_.get(k)!r}")
    return out


def mb(kb: int) -> str:
    return f"{kb / 1024:.0f}"


def report(name: str, run: dict[str, Any]) -> list[str]:
    peaks = run["peaks"]
    driver = peaks.get(run["driver"], ("", 0))[1]
    trials = sorted((v for p, v in peaks.items() if v[0].startswith("trial ")), key=lambda v: v[0])
    exports = [k for n, k in peaks.values() if n == "export"]
    ours = ("trial ", "export")
    ray_procs = [v for p, v in peaks.items() if p != run["driver"] and not v[0].startswith(ours)]
    best = next(t for t in run["summary"]["trials"] if t["run_id"] == run["summary"]["best"])
    total = driver + sum(k for _, k in trials) + sum(exports) + sum(k for _, k in ray_procs)
    return [
        f"| {name} | {run['wall']:.1f} | {mb(driver)} | "
        + (", ".join(f"{n[6:]} {mb(k)}" for n, k in trials) or "in the driver")
        + f" | {len(exports)} × ≤ {mb(max(exports, default=0))} | "
        + (f"{len(ray_procs)}: {mb(sum(k for _, k in ray_procs))} in all, largest {mb(max(k for _, k in ray_procs))}"
           if ray_procs else "-")
        + f" | {mb(total)} | {best['overrides']['steps.calibrate.method']} |"
    ]  # fmt: skip


def cpu_info() -> str:
    text = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni"]
    return f"{model}, {os.cpu_count()} CPUs; " + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--rounds", type=int, default=1, help="local then Ray, this many times")
    args = ap.parse_args()

    import ray

    from tests.ray_cluster import start_cluster

    folder = Path(tempfile.mkdtemp(prefix="int8pipe-bench-ray-"))
    grid = f"{{steps.calibrate.method: [{', '.join(METHODS)}]}}"
    print(f"# {cpu_info()}")
    print(f"# {platform.platform()}, Python {platform.python_version()}, Ray {ray.__version__}")
    print(f"# load average at start: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    server, url = start_server(folder)
    start = time.perf_counter()
    cluster = start_cluster(workers=1, env=clean_env())
    print(f"# Ray cluster (head + 1 worker node, 1 CPU each) started in {time.perf_counter() - start:.1f} s")
    lines = [
        "| sweep | wall s | driver peak RSS MB | trial processes' peak RSS MB | export subprocesses MB "
        "| Ray's own processes, peak RSS MB | sum of peaks MB | selected |",
        "| --- | ---: | ---: | --- | --- | --- | ---: | --- |",
    ]
    try:
        for r in range(args.rounds):
            local = sweep(url, folder, f"local-{r}", f"{{grid: {grid}, parallel: 1}}", args.sets, None)
            # what Ray gives a task reserving 1 CPU: OMP_NUM_THREADS=1 (PyTorch's export then uses one thread)
            local1 = sweep(url, folder, f"local1-{r}", f"{{grid: {grid}, parallel: 1}}", args.sets, None,
                           OMP_NUM_THREADS="1")  # fmt: skip
            on_ray = sweep(url, folder, f"ray-{r}",
                           f"{{grid: {grid}, executor: ray, ray: {{address: '{cluster.address}'}}}}", args.sets,
                           cluster)  # fmt: skip
            lines += report(f"local, parallel: 1 (round {r + 1})", local)
            lines += report(f"local, parallel: 1, OMP_NUM_THREADS=1 (round {r + 1})", local1)
            lines += report(f"Ray, 2 workers (round {r + 1})", on_ray)
            print(f"# round {r + 1}: wall time Ray / local = {on_ray['wall'] / local['wall']:.2f}, "
                  f"Ray / local with OMP_NUM_THREADS=1 = {on_ray['wall'] / local1['wall']:.2f}")  # fmt: skip
            for name, other in (("local", local), ("local, OMP_NUM_THREADS=1", local1)):
                diff = differences(other["summary"], on_ray["summary"])
                print(f"# round {r + 1}: per-trial gates and metrics (timings aside), {name} vs Ray: "
                      + ("identical" if not diff else "differ: " + "; ".join(diff)))  # fmt: skip
    finally:
        cluster.stop()
        server.terminate()
        server.wait()
        shutil.rmtree(folder, ignore_errors=True)
    print(f"# load average at end: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
