from __future__ import annotations

import os
import shutil
from pathlib import Path

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
