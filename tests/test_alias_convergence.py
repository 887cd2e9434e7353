"""The alias ends on the best complete version whatever the timing, and promoting leaves nothing behind.

Real parts: a real `mlflow server` on 127.0.0.1 (sqlite store), promotions in separate processes,
made hostile by tests/registry_chaos.py (random delays before every registry call, a promoter stalled
between its reads and its alias write, one killed right after that write, clocks minutes off).
int8pipe's code runs unchanged in them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient

from pipeline.tag_names import DECISION_TAG
from tests.conftest import ROOT, env_without_mlflow, run_args

NAME = "chaos-int8"


def _start(spec: dict[str, Any], *args: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "tests.registry_chaos", json.dumps(spec), *args]
    env = env_without_mlflow(PYTHONPATH=str(ROOT))
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _promoter(uri: str, folder: Path, label: str, score: float, **spec: Any) -> dict[str, Any]:
    """The spec of a registry_chaos ``promote`` process registering a version of NAME scored ``score``."""
    experiment = MlflowClient(uri).get_experiment_by_name("chaos")
    experiment_id = experiment.experiment_id if experiment else MlflowClient(uri).create_experiment("chaos")
    return {
        "uri": uri,
        "experiment_id": experiment_id,
        "name": NAME,
        "label": label,
        "score": score,
        "out": str(folder / f"{label}.json"),
        "log": str(folder / "alias_writes.log"),
        **spec,
    }


def _finish(proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"{what} did not finish within {timeout:.0f}s")
    assert proc.returncode == 0, err.decode()[-3000:]


def _wait_for(path: Path, procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert all(p.poll() is None for p in procs), "a promoter ended before it stalled"
        assert time.monotonic() < deadline, f"{path.name} did not appear"
        time.sleep(0.1)


@contextmanager
def _registered_models_seen(uri: str) -> Iterator[set[str]]:
    """The names of every registered model that existed at any poll while the block ran."""
    seen: set[str] = set()
    done = threading.Event()
    client = MlflowClient(uri)

    def poll() -> None:
        while not done.is_set():
            seen.update(m.name for m in client.search_registered_models())
            time.sleep(0.1)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        yield seen
    finally:
        done.set()
        watcher.join()
        seen.update(m.name for m in client.search_registered_models())


def _holder(client: MlflowClient, name: str = NAME) -> str:
    return str(client.get_model_version_by_alias(name, "candidate").version)


def _writes(log: Path) -> list[tuple[int, str, int, int]]:
    """(pid, version, ns before, ns after) of every alias write the promoters made, in log order."""
    rows = [line.split() for line in log.read_text().splitlines()]
    return [(int(pid), version, int(t0), int(t1)) for pid, version, t0, t1 in rows]


def _last_writer(log: Path) -> int:
    """The pid whose alias write returned last (the writes are seconds apart, not nanoseconds)."""
    return max(_writes(log), key=lambda w: w[3])[0]


@pytest.mark.slow
def test_many_promoters_with_random_delays_and_skewed_clocks_end_on_the_best(
    mlflow_server: str, tmp_path: Path
) -> None:
    # two equal best scores: the newer of those versions is the one (at least as good takes the alias)
    scores = {"a": 0.91, "b": 0.97, "c": 0.93, "d": 0.97, "e": 0.88, "f": 0.95, "g": 0.90, "h": 0.96}
    hostile: dict[str, dict[str, Any]] = {
        "b": {"clock_offset_s": 125},  # ahead by more than the old lock's lease
        "e": {"clock_offset_s": -3600},
        "f": {"jitter_s": 1.5},  # a slow promoter
    }
    specs = {
        k: _promoter(mlflow_server, tmp_path, k, s, **{"jitter_s": 0.3, **hostile.get(k, {})})
        for k, s in scores.items()
    }
    with _registered_models_seen(mlflow_server) as seen:
        procs = {k: _start(spec, "promote") for k, spec in specs.items()}
        for k, proc in procs.items():
            _finish(proc, 300, f"promoter {k}")
    assert seen == {NAME}  # no lock or other object nobody asked for, at any time

    client = MlflowClient(mlflow_server)
    results = {k: json.loads(Path(spec["out"]).read_text()) for k, spec in specs.items()}
    version_score = {r["version"]: scores[k] for k, r in results.items()}
    assert len(version_score) == len(scores)
    best = max(version_score, key=lambda v: (version_score[v], int(v)))
    assert _holder(client) == best
    for k, r in results.items():
        # each process's report is where the alias stood when it last read it: never a worse version
        assert version_score[r["alias_version"]] >= scores[k]
        assert (r["alias"] == "candidate") == (r["alias_version"] == r["version"])
        assert client.get_model_version(NAME, r["version"]).tags[DECISION_TAG].startswith("@candidate ")
    last = _last_writer(tmp_path / "alias_writes.log")
    by_pid = {procs[k].pid: r for k, r in results.items()}
    assert by_pid[last]["alias_version"] == best  # the last writer's report is the registry's final alias


def _digits_pipeline(folder: Path) -> Path:
    path = folder / "pipeline.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["steps"].pop("benchmark")
    cfg["steps"]["validate"].update(metric="cosine", max_drop=0.5)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_a_stalled_pipeline_blocks_nobody_and_its_stale_write_is_corrected(
    mlflow_server: str, digits_copy: Path, tmp_path: Path
) -> None:
    """`int8pipe run` twice: the worse one stalls between reading the registry and writing the alias
    (it read before the better one existed); the better one finishes meanwhile; the stalled one's
    stale write is put right by itself, and each --summary-json says where the alias stood at its exit."""
    config = _digits_pipeline(digits_copy)
    log = tmp_path / "alias_writes.log"
    stall = {"marker": str(tmp_path / "stalled"), "release": str(tmp_path / "release")}
    worse = ("steps.calibrate.method=percentile", "steps.calibrate.percentile=95")
    slow = _start(
        {"jitter_s": 0.05, "stall": stall, "log": str(log)},
        "cli",
        *run_args(config, mlflow_server, tmp_path / "slow.json", *worse),
    )
    try:
        _wait_for(Path(stall["marker"]), [slow], 300)
        fast = _start(
            {"jitter_s": 0.05, "log": str(log)}, "cli", *run_args(config, mlflow_server, tmp_path / "fast.json")
        )
        _finish(fast, 120, "a pipeline promoting while another is stalled")
    finally:
        Path(stall["release"]).touch()
    _finish(slow, 120, "the stalled pipeline")

    fast_s = json.loads((tmp_path / "fast.json").read_text())
    slow_s = json.loads((tmp_path / "slow.json").read_text())
    assert fast_s["metrics"]["int8_cosine"] > slow_s["metrics"]["int8_cosine"]
    best, stale = fast_s["registered_model"]["version"], slow_s["registered_model"]["version"]
    client = MlflowClient(mlflow_server)
    assert _holder(client, "digits-int8") == best
    assert fast_s["registered_model"]["alias"] == "candidate"  # true when it exited
    writes = _writes(log)
    assert [v for pid, v, _, _ in writes if pid == slow.pid] == [stale, best]  # its stale write, then the fix
    assert _last_writer(log) == slow.pid
    assert slow_s["registered_model"]["alias"] is None and slow_s["registered_model"]["alias_version"] == best
    decision = client.get_model_version("digits-int8", stale).tags[DECISION_TAG]
    assert decision.startswith(f"@candidate stayed on v{best}: its cosine")


@pytest.mark.slow
def test_a_promoter_killed_after_a_stale_write_leaves_nothing_and_the_next_promotion_corrects_it(
    mlflow_server: str, tmp_path: Path
) -> None:
    stall = {"marker": str(tmp_path / "stalled"), "release": str(tmp_path / "release")}
    doomed = _start(
        _promoter(mlflow_server, tmp_path, "doomed", 0.90, stall=stall, die_after_first_alias_write=True), "promote"
    )
    try:
        _wait_for(Path(stall["marker"]), [doomed], 120)
        better = _promoter(mlflow_server, tmp_path, "better", 0.95)
        _finish(_start(better, "promote"), 90, "a promotion while another promoter is stalled")
    finally:
        Path(stall["release"]).touch()
    doomed.communicate(timeout=60)
    assert doomed.returncode == -9
    client = MlflowClient(mlflow_server)
    best = json.loads(Path(better["out"]).read_text())["version"]
    assert _holder(client) != best  # the killed process's stale write is what the registry holds now
    assert [m.name for m in client.search_registered_models()] == [NAME]  # and nothing else

    after = _promoter(mlflow_server, tmp_path, "after", 0.80)
    start = time.monotonic()
    _finish(_start(after, "promote"), 90, "the next promotion")
    assert time.monotonic() - start < 60  # nothing to wait out
    result = json.loads(Path(after["out"]).read_text())
    assert _holder(client) == best == result["alias_version"] and result["alias"] is None
