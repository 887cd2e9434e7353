"""A real local Ray cluster for tests and benchmarks: a head node and worker nodes on 127.0.0.1.

Each node is a ``ray start --block`` process in its own session, so stopping the cluster signals
exactly the process groups started here (never other users' Ray processes, as ``ray stop`` would);
each group holds the node's raylet, its workers and the trial processes they start.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
OBJECT_STORE_BYTES = 100 * 1000 * 1000  # Ray's default reserves 30% of RAM per node


@dataclass
class RayCluster:
    address: str
    temp_dir: Path
    nodes: list[subprocess.Popen[bytes]] = field(default_factory=list)  # head first

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-1500:] for p in sorted(self.temp_dir.glob("node*.log")))

    def processes(self) -> list[int]:
        """Every live process of the cluster: the nodes and all their descendants (Ray's workers
        run in process groups of their own, the trial processes under them)."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                pid, rest = stat.read_text().split(" (", 1)
                ppid = int(rest.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(pid))
        out, todo = [], [p.pid for p in self.nodes if p.poll() is None]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, []))
        return out

    def stop(self) -> list[int]:
        """SIGKILL the cluster's processes (its process groups and every descendant), remove its files.

        Returns the processes still alive (not zombies) a few seconds later: none, normally.
        """
        pids = self.processes()
        for proc in reversed(self.nodes):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.nodes:
            proc.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        deadline = time.monotonic() + 5
        while True:
            alive = [pid for pid in pids if _alive(pid)]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node(cluster: RayCluster, args: list[str], env: dict[str, str]) -> None:
    log = open(cluster.temp_dir / f"node{len(cluster.nodes)}.log", "wb")  # noqa: SIM115  # the child holds it
    cmd = [str(BIN / "ray"), "start", *args, "--num-cpus", "1", "--object-store-memory", str(OBJECT_STORE_BYTES),
           "--disable-usage-stats", "--block"]  # fmt: skip
    cluster.nodes.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
    log.close()


def _wait_started(cluster: RayCluster, index: int, deadline: float) -> None:
    log = cluster.temp_dir / f"node{index}.log"
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if cluster.nodes[index].poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ray node {index} did not start:\n{cluster.logs()}")
        time.sleep(0.2)


def start_cluster(workers: int = 1, env: dict[str, str] | None = None, timeout_s: float = 90.0) -> RayCluster:
    """A head and ``workers`` worker nodes, 1 CPU each. Stop it with :meth:`RayCluster.stop`."""
    port = _free_port()
    # short: Ray's socket paths live under it and a Unix socket path has at most 107 bytes
    cluster = RayCluster(f"127.0.0.1:{port}", Path(tempfile.mkdtemp(prefix="r", dir="/tmp")))
    env = dict(env if env is not None else os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # workers and the trial processes they start make their temporary folders in the cluster's, so the
    # folders of a process killed on purpose (a test's dead worker) go with the cluster
    (cluster.temp_dir / "tmp").mkdir()
    env["TMPDIR"] = str(cluster.temp_dir / "tmp")
    try:
        deadline = time.monotonic() + timeout_s
        _node(cluster, ["--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--include-dashboard",
                        "false", "--temp-dir", str(cluster.temp_dir)], env)  # fmt: skip
        _wait_started(cluster, 0, deadline)
        for _ in range(workers):
            _node(cluster, ["--address", cluster.address, "--node-ip-address", "127.0.0.1"], env)
        for i in range(1, workers + 1):
            _wait_started(cluster, i, deadline)
    except BaseException:
        cluster.stop()
        raise
    return cluster
