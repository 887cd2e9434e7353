"""The optional C extension: built where a compiler exists, skipped (not fatal) where none does; the
optional extras: only those that export from PyTorch pull it."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
needs_setuptools = pytest.mark.skipif(
    importlib.util.find_spec("setuptools") is None, reason="setuptools is not installed in this environment"
)


def build_ext(tmp_path: Path, cc: str | None) -> tuple[subprocess.CompletedProcess[str], list[Path]]:
    env = dict(os.environ)
    if cc is not None:
        env["CC"] = cc
    out = tmp_path / "lib"
    res = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(out), "--build-temp", str(tmp_path / "t")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return res, sorted(out.rglob("_histogram*")) if out.exists() else []


@needs_setuptools
def test_install_without_a_compiler_still_succeeds(tmp_path: Path) -> None:
    res, built = build_ext(tmp_path, cc="false")  # a "compiler" that always fails
    assert res.returncode == 0, res.stderr
    assert built == []
    assert "_histogram" in res.stderr  # setuptools names the extension it skipped


@needs_setuptools
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler here")
def test_extension_builds_with_a_compiler(tmp_path: Path) -> None:
    res, built = build_ext(tmp_path, cc=None)
    assert res.returncode == 0, res.stderr
    assert [p.name.split(".")[0] for p in built] == ["_histogram"]


# what pulls PyTorch into an environment: torch itself, and packages that require it
PULLS_TORCH = ("torch", "efficientnet-lite-pytorch")


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].strip().lower()


def test_only_the_pytorch_extras_pull_pytorch() -> None:
    """pip takes PyPI's CUDA build of torch (3 GB) when an extra pulls it on a machine without it: an
    extra a CPU user needs for something else (the OCR example's photos, Ray, the tests) must not."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pulling = {name for name, reqs in extras.items() if any(_requirement_name(r) in PULLS_TORCH for r in reqs)}
    assert pulling == {"torch", "efficientnet"}
    assert not any(_requirement_name(r) in PULLS_TORCH for r in extras["bench"])


def test_the_cpu_wheel_advice_is_where_the_pytorch_extras_are_first_named() -> None:
    readme = (ROOT / "README.md").read_text()
    sections = readme.split("\n## ")
    first = next(s for s in sections if "`[torch]`" in s or "`[efficientnet]`" in s or ".[efficientnet" in s)
    assert "download.pytorch.org/whl/cpu" in first, first[:200]
