"""Stores that cannot take a write: clear errors, never tracebacks.

Real parts: the CLI in a subprocess (or in-process) against a real sqlite MLflow store.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.orchestration.cli import main
from tests.conftest import ROOT, env_without_mlflow, run_args

# The CLI, with every sqlite connection capped at a page count (PRAGMA max_page_count is set per
# connection, not stored in the file, so it is applied as SQLAlchemy opens each one): sqlite then
# refuses to grow the database with its real SQLITE_FULL, "database or disk is full", exactly as
# on a full disk, without filling one.
CAPPED_CLI = """
import sys
from sqlalchemy import event
from sqlalchemy.engine import Engine

CAP = int(sys.argv[1])


@event.listens_for(Engine, "connect")
def _cap(dbapi_connection, record):
    dbapi_connection.execute(f"PRAGMA max_page_count = {CAP}")


from pipeline.orchestration.cli import main

sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_full_tracking_store_names_the_store_and_exits_2(digits_copy: Path, tmp_path: Path) -> None:
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    MlflowClient(uri).search_experiments(max_results=1)  # the schema, created at full size
    with sqlite3.connect(db) as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    (tmp_path / "capped.py").write_text(CAPPED_CLI)
    args = run_args(digits_copy / "pipeline.yaml", uri, tmp_path / "s.json", "steps.benchmark.iterations=5")
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "capped.py"), str(pages + 4), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env_without_mlflow(PYTHONPATH=str(ROOT)),
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("int8pipe: error: the MLflow tracking store") and "is full" in last
    assert str(db) in last and "--tracking-uri" in last and "Free space" in last
    # the store itself is intact: still readable, its schema whole
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_sqlite_store_in_a_read_only_folder_is_a_tracking_error(
    digits_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        code = main(run_args(digits_copy / "pipeline.yaml", f"sqlite:///{folder / 'mlflow.db'}", tmp_path / "s.json"))
    finally:
        folder.chmod(0o755)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"the folder {folder} does not exist or is not writable" in err
    assert not (folder / "mlflow.db").exists()


@pytest.mark.parametrize("value", ["0", "-64"])
def test_calibrate_memory_mb_must_be_positive(
    digits_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = run_args(digits_copy / "pipeline.yaml", uri, tmp_path / "s.json", f"steps.calibrate.memory_mb={value}")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"steps.calibrate.memory_mb: expected a positive number of MB, got {value}" in err
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run


def _can_mount_tmpfs() -> bool:
    """Whether this machine lets an unprivileged user namespace mount a tmpfs (unshare -rm)."""
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True, check=False
    )
    return probe.returncode == 0


@pytest.mark.slow
def test_a_full_temporary_folder_is_named_as_such(digits_copy: Path, tracking_uri: str, tmp_path: Path) -> None:
    """TMPDIR on a real 64 kB tmpfs (a mount namespace of its own), the store on a disk with room:
    before, "the MLflow artifact store is full" although the store had room."""
    if shutil.which("unshare") is None or not _can_mount_tmpfs():
        pytest.skip("needs unshare -rm and a tmpfs mount in a user namespace")
    small = tmp_path / "small-tmp"
    small.mkdir()
    args = " ".join(shlex.quote(a) for a in run_args(digits_copy / "pipeline.yaml", tracking_uri, tmp_path / "s.json"))
    script = f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(small))} && exec {shlex.quote(sys.executable)} " \
        f"-m pipeline {args}"  # fmt: skip
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env_without_mlflow(TMPDIR=str(small), PYTHONPATH=str(ROOT)),
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"int8pipe: error: the temporary folder {small} is full: writing to {small}/"), last
    assert "TMPDIR" in last and "artifact store" not in last and "Traceback" not in proc.stderr


def test_a_full_disk_is_blamed_on_the_folder_the_file_was_in(tmp_path: Path) -> None:
    """The working files int8pipe and libraries keep in TMPDIR (int8pipe-*, tmp*) against a store
    that happens to live under /tmp too (as a test's does)."""
    import errno
    import tempfile

    from pipeline.mlflow_io.store import store_full

    def full(path: str) -> OSError:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    work = tempfile.mkdtemp(prefix="int8pipe-")
    try:
        assert (store_full(full(f"{work}/export/model.onnx"), "") or "").startswith("the temporary folder")
    finally:
        os.rmdir(work)
    store = tmp_path / "mlartifacts" / "0" / "model.onnx"
    assert (store_full(full(str(store)), "") or "").startswith(f"the MLflow artifact store is full: writing {store}")


def _locked(db: Path, seconds: float, done: threading.Event) -> threading.Thread:
    """Another process's write in progress: an exclusive sqlite transaction held for ``seconds`` or until
    ``done`` is set."""
    ready = threading.Event()

    def hold() -> None:
        con = sqlite3.connect(db, timeout=0, isolation_level=None)
        con.execute("BEGIN EXCLUSIVE")
        ready.set()
        done.wait(seconds)
        con.execute("ROLLBACK")
        con.close()

    thread = threading.Thread(target=hold)
    thread.start()
    ready.wait(10)
    return thread


@pytest.mark.parametrize("held_s", [1.5, None])
def test_an_interrupted_run_is_closed_despite_a_locked_store_or_left_with_one_warning(
    tracking_uri: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, held_s: float | None
) -> None:
    """A sweep's trials and driver all close their runs at the same Ctrl-C; sqlite refused one of those
    writes with 'database is locked' and the trial printed a second traceback chained to its interruption.
    A lock that clears is waited out; one that does not (held past MLflow's own 20 s busy wait) leaves the
    run RUNNING, for the next run to close, with a warning, and the interruption stays the only exception."""
    from pipeline.mlflow_io import store

    client = MlflowClient(tracking_uri)
    run = client.create_run(client.create_experiment("locked"))
    if held_s is None:
        monkeypatch.setattr(store, "LOCK_RETRIES", ())  # one try: MLflow's own busy wait, then the warning
    closed = threading.Event()
    holder = _locked(Path(tracking_uri[len("sqlite:///") :]), held_s or 120.0, closed)
    try:
        with pytest.raises(KeyboardInterrupt) as caught:
            with store.closing(lambda status: client.set_terminated(run.info.run_id, status)):
                raise KeyboardInterrupt
        still_held = holder.is_alive()
    finally:
        closed.set()
        holder.join()
    assert caught.value.__context__ is None  # no exception chained to the interruption
    status = client.get_run(run.info.run_id).info.status
    if held_s is not None:
        assert status == "KILLED"
    else:
        assert still_held and status == "RUNNING"
        assert "could not mark a run KILLED" in caplog.text and "closes it as KILLED" in caplog.text


def test_a_locked_write_is_retried_and_other_errors_or_a_lasting_lock_on_a_finished_run_raise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The retry around closing a run: sqlite's own error for a busy store, raised by ``end`` itself."""
    from pipeline.mlflow_io import store

    monkeypatch.setattr(store, "LOCK_RETRIES", (0.0, 0.0))
    calls: list[str] = []

    def end_after(failures: int, error: Exception):  # type: ignore[no-untyped-def]
        def end(status: str) -> None:
            calls.append(status)
            if len(calls) <= failures:
                raise error

        return end

    locked = sqlite3.OperationalError("database is locked")
    with store.closing(end_after(2, locked)):  # two refusals, then the write goes through
        pass
    assert calls == ["FINISHED"] * 3
    calls.clear()
    with pytest.raises(sqlite3.OperationalError, match="locked"):  # still locked after every retry: raised
        with store.closing(end_after(9, locked)):
            pass
    assert calls == ["FINISHED"] * 3
    calls.clear()
    with pytest.raises(sqlite3.OperationalError, match="no such table"):  # not a lock: raised at once
        with store.closing(end_after(9, sqlite3.OperationalError("no such table: runs"))):
            pass
    assert calls == ["FINISHED"]
