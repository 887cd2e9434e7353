from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("MLFLOW_RUN_ID", None)

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits"


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def digits_copy(tmp_path: Path) -> Path:
    """A private copy of the digits example whose YAML a test may edit."""
    dst = tmp_path / "digits"
    shutil.copytree(DIGITS, dst, ignore=shutil.ignore_patterns("train.py", "__pycache__"))
    return dst


def run_args(config: Path, tracking_uri: str, summary: Path, *overrides: str) -> list[str]:
    """CLI arguments for `int8pipe run` with a summary file and ``--set`` overrides."""
    args = ["run", str(config), "--tracking-uri", tracking_uri, "--summary-json", str(summary)]
    for override in overrides:
        args += ["--set", override]
    return args


def run_pipeline(config: Path, tracking_uri: str, folder: Path, *overrides: str) -> dict[str, Any]:
    """Run `int8pipe run` in-process, check it succeeded, and return its --summary-json."""
    from pipeline.cli import main

    summary = folder / "s.json"
    assert main(run_args(config, tracking_uri, summary, *overrides)) == 0
    return json.loads(summary.read_text())
