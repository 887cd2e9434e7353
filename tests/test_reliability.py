"""Interruptions, dead processes, tracking outages and concurrent pipelines, with real subprocesses."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import env_without_mlflow, run_args, run_pipeline, server_env

pytestmark = pytest.mark.slow  # pipelines, MLflow servers and racing processes in subprocesses

SLOW_SOURCE = """
import time
from pathlib import Path
from typing import IO
import numpy as np

def batches(started, delay):
    with np.load(Path(__file__).with_name("data") / "calibration.npz") as z:
        x = z["input"][:512]
    for i in range(0, len(x), 32):
        if i >= 64:  # past the first batch, which int8pipe reads to check the data before any run
            Path(started).write_text("calibrating")
            time.sleep(delay)
        yield {"input": x[i : i + 32]}
"""


def _slow_pipeline(folder: Path, started: Path, delay: float = 0.5) -> Path:
    """The digits pipeline whose calibration source takes ``delay`` seconds per batch."""
    (folder / "slowdata.py").write_text(SLOW_SOURCE)
    path = folder / "pipeline.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["steps"].pop("benchmark")
    cfg["data"]["calibration"] = {
        "python": "slowdata:batches",
        "args": {"started": str(started), "delay": delay},
        "deps": ["slowdata.py", "data/calibration.npz"],
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(config: Path, uri: str, tmp: Path, summary: Path) -> subprocess.Popen[bytes]:
    env = env_without_mlflow(TMPDIR=str(tmp))
    args = [sys.executable, "-m", "pipeline", *run_args(config, uri, summary)]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(proc.communicate()[1].decode()[-3000:])
        assert time.monotonic() < deadline, "the pipeline never reached calibration"
        time.sleep(0.05)


def _runs(client: MlflowClient) -> dict[str, str]:
    """run name -> status, for every run of every experiment."""
    exps = [e.experiment_id for e in client.search_experiments()]
    return {r.info.run_name: r.info.status for r in client.search_runs(exps)}


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_marks_runs_killed_and_cleans_up(
    digits_copy: Path, tracking_uri: str, tmp_path: Path, sig: int, code: int
) -> None:
    started, private_tmp = tmp_path / "started", tmp_path / "tmp"
    private_tmp.mkdir()
    config = _slow_pipeline(digits_copy, started)
    proc = _start(config, tracking_uri, private_tmp, tmp_path / "s.json")
    _wait_for(started, proc)
    sent = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 10
    assert proc.returncode == code
    lines = [ln for ln in err.decode().splitlines() if ln.startswith("int8pipe:")]
    assert lines == [
        f"int8pipe: interrupted by {signal.Signals(sig).name}; open runs marked KILLED, temporary files removed"
    ]
    assert "Traceback" not in err.decode()
    runs = _runs(MlflowClient(tracking_uri))
    parent = runs["digits-int8 (entropy, tensorrt)"]
    assert runs["export"] == "FINISHED" and runs["calibrate"] == "KILLED" and parent == "KILLED"
    # work folders and the calibration spill are gone (a library's own `.ses` file may stay)
    assert [p.name for p in private_tmp.iterdir() if p.name.startswith("int8pipe")] == []


def test_a_second_signal_during_the_clean_up_is_ignored(digits_copy: Path, tracking_uri: str, tmp_path: Path) -> None:
    """Ctrl-C, then SIGTERM after SIGTERM while the runs are being closed (a sweep driver stopping its
    trials, `timeout`, Kubernetes): before, only a second SIGINT was ignored, and a SIGTERM cut the
    clean-up short with a second traceback chained to the first."""
    started = tmp_path / "started"
    config = _slow_pipeline(digits_copy, started)
    proc = _start(config, tracking_uri, tmp_path, tmp_path / "s.json")
    _wait_for(started, proc)
    assert proc.stderr is not None
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(ln.decode() for ln in proc.stderr or []), daemon=True)
    reader.start()
    proc.send_signal(signal.SIGINT)
    # a storm until int8pipe's last word: some land in the clean-up, however long it takes here
    while proc.poll() is None and not any(ln.startswith("int8pipe:") for ln in said):
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.02)
    proc.wait(timeout=30)
    reader.join(timeout=10)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    err = "".join(said)
    # 130: the first signal's. One sent just before the last word may still land once Python, exiting,
    # has handed the signals back to the system; that ends the process by SIGTERM after the clean-up.
    assert proc.returncode in (130, -signal.SIGTERM), err[-3000:]
    assert "Traceback" not in err and "During handling" not in err and "race condition" not in err, err[-3000:]
    assert [ln for ln in err.splitlines() if ln.startswith("int8pipe:")] == [
        "int8pipe: interrupted by SIGINT; open runs marked KILLED, temporary files removed"
    ]
    runs = _runs(MlflowClient(tracking_uri))
    assert runs["calibrate"] == "KILLED" and runs["digits-int8 (entropy, tensorrt)"] == "KILLED", runs


def test_runs_of_a_killed_process_are_closed_by_the_next_run(
    digits_copy: Path, tracking_uri: str, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    config = _slow_pipeline(digits_copy, started, delay=0.3)
    proc = _start(config, tracking_uri, tmp_path, tmp_path / "s.json")
    _wait_for(started, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    client = MlflowClient(tracking_uri)
    assert _runs(client)["calibrate"] == "RUNNING"  # what kill -9 leaves
    killed = {n: r for n, r in _runs(client).items()}
    assert killed["digits-int8 (entropy, tensorrt)"] == "RUNNING"
    (digits_copy / "slowdata.py").write_text(SLOW_SOURCE.replace("time.sleep(delay)", "pass"))
    summary = run_pipeline(config, tracking_uri, tmp_path)
    exps = [e.experiment_id for e in client.search_experiments()]
    statuses = [r.info.status for r in client.search_runs(exps)]
    assert "RUNNING" not in statuses and statuses.count("KILLED") == 2
    calibrate = client.get_run(summary["steps"]["calibrate"])
    assert calibrate.data.tags.get("int8pipe.reused") != "true"  # a killed run is never reused


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_tracking_server_fails_fast(digits_copy: Path, tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(digits_copy / "pipeline.yaml"), "--tracking-uri", uri],
        env=env_without_mlflow(),
        capture_output=True,
        timeout=120,
    )
    # the check itself is bounded at 10 s; MLflow's own retries would take minutes. The rest is python
    # start-up, which takes 20-30 s on a 2-core machine under load
    assert time.monotonic() - start < 60
    err = proc.stderr.decode()
    assert proc.returncode == 2 and f"the MLflow tracking server {uri} does not answer" in err
    assert "Traceback" not in err and len([ln for ln in err.splitlines() if ln.startswith("int8pipe:")]) == 1


def _wait_healthy(uri: str, server: subprocess.Popen[bytes]) -> None:
    import urllib.request

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("mlflow server did not start")


def _mlflow_server(port: int, tmp_path: Path, log: IO[str], new_session: bool = False) -> subprocess.Popen[bytes]:
    """A real ``mlflow server`` on 127.0.0.1 with a sqlite store under ``tmp_path``, its output in ``log``."""
    from tests.conftest import BIN

    return subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=server_env(), cwd=tmp_path, start_new_session=new_session,
    )  # fmt: skip


def _stop_group(server: subprocess.Popen[bytes]) -> None:
    """Stop a server started in its own session, worker included: killing only ``mlflow server`` left its
    uvicorn worker running after the test (found still serving after a CI run)."""
    for sig in (signal.SIGCONT, signal.SIGTERM):
        with contextlib.suppress(ProcessLookupError):  # the group may be gone already
            os.killpg(server.pid, sig)
    try:
        server.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)  # whatever of the group is still there


def test_tracking_server_outage_mid_run_is_bounded(digits_copy: Path, tmp_path: Path) -> None:

    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    server = _mlflow_server(port, tmp_path, log)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(uri, server)
        started = tmp_path / "started"
        config = _slow_pipeline(digits_copy, started, delay=0.2)
        proc = _start(config, uri, tmp_path, tmp_path / "s.json")
        _wait_for(started, proc, timeout=120)
        server.terminate()
        server.wait(timeout=30)
        stopped = time.monotonic()
        _, err = proc.communicate(timeout=240)
        elapsed = time.monotonic() - stopped
    finally:
        if server.poll() is None:
            server.kill()
        log.close()
    text = err.decode()
    assert proc.returncode == 2, text[-3000:]
    assert "stopped answering during the run" in text and "Traceback" not in text
    assert "tracking server not answering; retrying /api/2.0/mlflow/" in text  # visible while it lasts
    assert elapsed < 120, elapsed
    # the paragraph is the last word: nothing retries after it (MLflow ending its open runs at exit)
    assert "retrying" not in text.split("stopped answering during the run")[1], text[-1500:]


def test_a_hung_tracking_server_ends_the_run_in_bounded_time(digits_copy: Path, tmp_path: Path) -> None:
    """A server frozen mid-run (SIGSTOP): the kernel still accepts connections, nothing answers. Before,
    the run waited out every retry of every request (259 s) and printed retries after its last word.
    The settings are the user's (small, so the test is quick): int8pipe's defaults must not override them."""

    port, timeout_s, retries = _free_port(), 4, 1
    log = open(tmp_path / "server.log", "w")
    server = _mlflow_server(port, tmp_path, log, new_session=True)  # SIGSTOP to its group reaches the worker
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(uri, server)
        started = tmp_path / "started"
        config = _slow_pipeline(digits_copy, started, delay=0.2)
        env = env_without_mlflow(
            TMPDIR=str(tmp_path),
            MLFLOW_HTTP_REQUEST_TIMEOUT=str(timeout_s),
            MLFLOW_HTTP_REQUEST_MAX_RETRIES=str(retries),
        )
        args = [sys.executable, "-m", "pipeline", *run_args(config, uri, tmp_path / "s.json")]
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _wait_for(started, proc, timeout=120)
        os.killpg(server.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        _, err = proc.communicate(timeout=180)
        elapsed = time.monotonic() - frozen
        os.killpg(server.pid, signal.SIGCONT)
        time.sleep(3)  # for whatever queued while it slept
        runs = _runs(MlflowClient(uri))
    finally:
        _stop_group(server)
        log.close()
    text = err.decode()
    # the rest of the calibration (~3 s), one request's 2 tries of 4 s, exit; with MLflow's own
    # settings this was minutes, with int8pipe's defaults in place of the user's over a minute
    assert timeout_s * (retries + 1) <= elapsed < 35, (elapsed, text[-2000:])
    assert proc.returncode == 2 and "Traceback" not in text, text[-3000:]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    paragraph = lines[-1]  # the last word: no retry line (the heartbeat's, MLflow's at exit) after it
    assert [ln for ln in lines if ln.startswith("int8pipe:")] == [paragraph]
    assert paragraph.startswith(f"int8pipe: error: the MLflow tracking server {uri} stopped answering"), paragraph
    assert f"no reply within {timeout_s} s, {retries + 1} time(s)" in paragraph
    assert "stay as they are" in paragraph and "run again" in paragraph
    # the step cut short is not FINISHED (it would be reused); the one before it stays FINISHED
    assert runs["export"] == "FINISHED"
    assert runs["calibrate"] == "RUNNING" and runs["digits-int8 (entropy, tensorrt)"] == "RUNNING", runs


def test_mlflow_requests_are_bounded_unless_the_user_set_them(
    tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What bounds a hung server (README, Reliability): 2 tries of 30 s per request by default; the
    user's own setting wins (the test of a frozen server above runs on such settings)."""
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    from pipeline.mlflow_io.tracking import Tracker

    for setting in (MLFLOW_HTTP_REQUEST_TIMEOUT, MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR):
        monkeypatch.setenv(setting.name, "0")  # recorded, so that the test leaves the environment as it was
        monkeypatch.delenv(setting.name)
    Tracker(tracking_uri, "bounds")
    assert (MLFLOW_HTTP_REQUEST_TIMEOUT.get(), MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()) == (30, 1)
    assert MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 1
    monkeypatch.setenv(MLFLOW_HTTP_REQUEST_TIMEOUT.name, "300")
    monkeypatch.setenv(MLFLOW_HTTP_REQUEST_MAX_RETRIES.name, "5")
    Tracker(tracking_uri, "bounds")
    assert (MLFLOW_HTTP_REQUEST_TIMEOUT.get(), MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()) == (300, 5)


def test_fresh_sqlite_store_shared_by_concurrent_pipelines(digits_copy: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    config = digits_copy / "pipeline.yaml"
    cfg = yaml.safe_load(config.read_text())
    for step in ("benchmark", "promote", "validate"):
        cfg["steps"].pop(step)
    config.write_text(yaml.safe_dump(cfg))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pipeline", *run_args(config, uri, tmp_path / f"s{i}.json")],
            env=env_without_mlflow(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in range(3)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-3000:]
    ids = {json.loads((tmp_path / f"s{i}.json").read_text())["run_id"] for i in range(3)}
    assert len(ids) == 3


def _log_same_dataset(uri: str, run_ids: list[str], source: str, barrier: Any) -> None:
    from pipeline.mlflow_io.tracking import log_dataset

    client = MlflowClient(uri)
    for run_id in run_ids:
        barrier.wait(timeout=60)  # every process inserts at the same moment: the race a parallel sweep runs into
        try:
            log_dataset(client, [run_id], "calibration", source, "ab" * 16, 8)
        except BaseException:
            barrier.abort()  # the others stop waiting for this process in the next round
            raise


def test_runs_logging_the_same_dataset_at_once_all_get_it(tmp_path: Path) -> None:
    """Parallel trials log the same calibration dataset; MLflow's SQL store may see two inserts of one
    row. Every run must end up with the dataset, none with an IntegrityError."""
    import multiprocessing

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    source = tmp_path / "cal.npz"
    np.savez(source, x=np.zeros((8, 2), np.float32))
    # the race is timing-dependent: three rounds, each in a fresh experiment (a new dataset row), six
    # processes inserting at once; the processes are started once (each start imports MLflow)
    rounds = [client.create_experiment(f"race-{k}") for k in range(3)]
    runs = [[client.create_run(experiment).info.run_id for experiment in rounds] for _ in range(6)]
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(runs))
    procs = [ctx.Process(target=_log_same_dataset, args=(uri, ids, str(source), barrier)) for ids in runs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * len(runs)
    for r in (r for ids in runs for r in ids):
        assert [d.dataset.name for d in client.get_run(r).inputs.dataset_inputs] == ["calibration"]


def test_a_run_from_another_pid_namespace_with_our_hostname_is_judged_by_its_heartbeat(tracking_uri: str) -> None:
    """Two containers on one host (or two hosts) may share a hostname and a pid: a pid is only looked up
    where the run was started in this boot and PID namespace; anything else goes by its heartbeat."""
    import socket
    import time

    from mlflow import MlflowClient

    from pipeline.mlflow_io.store import owner_tags, pid_namespace
    from pipeline.mlflow_io.tracking import STALE_AFTER_S, Tracker
    from pipeline.tag_names import HEARTBEAT_TAG, HOST_TAG, PID_NAMESPACE_TAG, PID_TAG

    tracker = Tracker(tracking_uri, "owners")
    client = MlflowClient(tracking_uri)
    assert pid_namespace() and owner_tags()[PID_NAMESPACE_TAG] == pid_namespace()
    dead_pid = "4194303:1"  # above any pid_max this kernel hands out: no such process here
    now = time.time()

    def running(namespace: str, beat: float) -> str:
        tags = {HOST_TAG: socket.gethostname(), PID_NAMESPACE_TAG: namespace, PID_TAG: dead_pid,
                HEARTBEAT_TAG: repr(beat)}  # fmt: skip
        return client.create_run(tracker.experiment_id, tags=tags).info.run_id

    neighbour = running("another-boot/pid:[4026531836]", now)  # alive elsewhere: its heartbeat is fresh
    ours_dead = running(pid_namespace(), now)  # our namespace, and the pid is gone
    neighbour_stale = running("another-boot/pid:[4026531836]", now - STALE_AFTER_S - 60)
    closed = set(tracker.close_abandoned())
    assert closed == {ours_dead, neighbour_stale}
    assert client.get_run(neighbour).info.status == "RUNNING"


# A calibration source that, like onnxruntime's C extension initialising when a SIGTERM lands, turns the
# interruption into an error of its own ("ImportError: initialization failed"), the interruption its cause.
WRAPPING_SOURCE = """
import os, signal, time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def batches():
    if not (HERE / "checked").exists():  # the first call is the start-up check of the data: real samples
        (HERE / "checked").write_text("")
        data = np.load(HERE / "data" / "calibration.npz")
        yield {k: data[k][:8] for k in data.files}
        return
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    except BaseException as exc:
        raise ImportError("initialization failed") from exc
    yield {}
"""


def test_an_interruption_a_library_wraps_in_its_own_error_is_still_an_interruption(
    digits_copy: Path, tmp_path: Path, tracking_uri: str
) -> None:
    """Seen in a sweep trial stopped while importing onnxruntime: exit 1 and a traceback, its run FAILED."""
    (digits_copy / "wrapping.py").write_text(WRAPPING_SOURCE)
    path = digits_copy / "pipeline.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["calibration"] = {"python": "wrapping:batches", "deps": ["wrapping.py"]}
    path.write_text(yaml.safe_dump(cfg))
    proc = _start(path, tracking_uri, tmp_path, tmp_path / "s.json")
    _, err = proc.communicate(timeout=300)
    text = err.decode()
    assert proc.returncode == 143, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert text.strip().splitlines()[-1] == (
        "int8pipe: interrupted by SIGTERM; open runs marked KILLED, temporary files removed"
    )
    runs = _runs(MlflowClient(tracking_uri))
    assert runs.get("export") == "FINISHED" and runs.get("calibrate") == "KILLED", runs
    assert runs["digits-int8 (entropy, tensorrt)"] == "KILLED", runs
