from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("MLFLOW_RUN_ID", None)

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits"

BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _int8pipe_logger_restored() -> Iterator[None]:
    """An in-process ``int8pipe run`` sends int8pipe's log to stderr only (pipeline.log.configure stops it
    propagating): put the logger back as it was, so that a later test's caplog in the same worker sees it."""
    import logging

    log = logging.getLogger("int8pipe")
    handlers, propagate, level = list(log.handlers), log.propagate, log.level
    yield
    log.handlers[:] = handlers
    log.propagate = propagate
    log.setLevel(level)  # not .level =: setLevel also clears the loggers' cached isEnabledFor answers


def env_without_mlflow(**extra: str) -> dict[str, str]:
    """The environment for a subprocess: no inherited MLflow settings, this venv's tools first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({"MLFLOW_DISABLE_TELEMETRY": "true", "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}, **extra)
    return env


def server_env() -> dict[str, str]:
    """A test server's environment: its background job workers (a dozen processes) are not needed."""
    return env_without_mlflow(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (sqlite store, proxied artifacts), stopped at the end."""
    with serve(tmp_path) as url:
        yield url


@contextmanager
def serve(tmp_path: Path) -> Iterator[str]:
    """`mlflow server` with its store, artifacts and log in ``tmp_path``: its URL while it runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=server_env(),
        cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not start:\n" + (tmp_path / "server.log").read_text()[-2000:])
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def migrated_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, its schema already created. Creating the schema of a new file runs
    MLflow's migrations, ~2 s; most tests need an empty store, not a new file (the tests of new
    stores, and the quick start, make their own)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(tmp_path: Path, migrated_store: Path) -> str:
    """A private, empty MLflow store for one test."""
    shutil.copyfile(migrated_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def digits_copy(tmp_path: Path) -> Path:
    """A private copy of the digits example whose YAML a test may edit."""
    dst = tmp_path / "digits"
    shutil.copytree(DIGITS, dst, ignore=shutil.ignore_patterns("train.py", "__pycache__"))
    return dst


def npz_pipeline(
    folder: Path, model: Any, cal: dict[str, Any], val: dict[str, Any], steps: dict[str, Any], **top: Any
) -> Path:
    """Write ``folder``/pipeline.yaml running ``model`` (saved as model.onnx) on cal.npz and val.npz
    (arrays by input name) through ``steps``; ``top`` holds the other top-level keys (name, ...)."""
    import numpy as np
    import onnx
    import yaml

    onnx.save(model, str(folder / "model.onnx"))
    np.savez(folder / "cal.npz", **cal)
    np.savez(folder / "val.npz", **val)
    config = {
        **top,
        "model": {"onnx": "model.onnx"},
        "data": {"calibration": {"npz": "cal.npz"}, "validation": {"npz": "val.npz"}},
        "steps": steps,
    }
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_args(config: Path, tracking_uri: str, summary: Path, *overrides: str) -> list[str]:
    """CLI arguments for `int8pipe run` with a summary file and ``--set`` overrides."""
    args = ["run", str(config), "--tracking-uri", tracking_uri, "--summary-json", str(summary)]
    for override in overrides:
        args += ["--set", override]
    return args


def run_pipeline(config: Path, tracking_uri: str, folder: Path, *overrides: str) -> dict[str, Any]:
    """Run `int8pipe run` in-process, check it succeeded, and return its --summary-json."""
    from pipeline.orchestration.cli import main

    summary = folder / "s.json"
    assert main(run_args(config, tracking_uri, summary, *overrides)) == 0
    return json.loads(summary.read_text())
