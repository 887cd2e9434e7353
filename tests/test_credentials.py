"""A tracking URI with ``user:password@``: accepted where MLflow accepts it, and the password never
printed, logged, tagged or stored (nor put on a trial's command line).

A real ``mlflow server`` on 127.0.0.1, its sqlite database and artifact folder read byte by byte.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pipeline.mlflow_io.store import adopt_credentials, redacted
from pipeline.orchestration.cli import main
from pipeline.orchestration.runner import load_config
from pipeline.orchestration.trials import Trial

SECRET = "s3cret-Pw_9"
CREDENTIAL_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@pytest.fixture
def clean_credentials() -> Iterator[None]:
    """MLflow's credential settings, which int8pipe fills from the URI, as they were before the test."""
    before = {k: os.environ.pop(k, None) for k in CREDENTIAL_KEYS}
    yield
    for key, value in before.items():
        os.environ.pop(key, None)
        if value is not None:
            os.environ[key] = value


def _with_credentials(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://alice:{SECRET}@{rest}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _quick(folder: Path, **top: object) -> Path:
    path = folder / "pipeline.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["steps"] = {"export": {}, "calibrate": {"method": "minmax"}, "quantize": {}, "validate": {"metric": "top1"}}
    cfg.update(top)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_password_is_kept_out_of_uris_and_messages(clean_credentials: None) -> None:
    uri = _with_credentials("http://mlflow.example:5000/prefix")
    assert (
        redacted(uri) == "http://***@mlflow.example:5000/prefix" and redacted("sqlite:///a@b.db") == "sqlite:///a@b.db"
    )
    assert adopt_credentials(uri) == "http://mlflow.example:5000/prefix"  # MLflow sends them as basic auth
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice" and os.environ["MLFLOW_TRACKING_PASSWORD"] == SECRET


def test_a_trial_gets_a_database_password_in_its_environment_not_its_command_line(digits_copy: Path) -> None:
    """A command line is visible to every user of the machine (ps)."""
    cfg = load_config(_quick(digits_copy, sweep={"grid": {"steps.calibrate.method": ["minmax"]}}))
    trial = Trial(*cfg.trials[0])
    uri = _with_credentials("postgresql://db.example/mlflow")
    assert not any(SECRET in arg for arg in trial.command(uri, "0" * 32, "s.json", True))
    assert (trial.environment(uri) or {}).get("MLFLOW_TRACKING_URI") == uri
    assert "--tracking-uri" in trial.command("sqlite:///m.db", "0" * 32, "s.json", True)


@pytest.mark.parametrize("executor", [pytest.param("local", marks=pytest.mark.slow), "ray"])  # local: a 10 s wait
def test_an_unreachable_server_is_named_without_its_password(
    digits_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_credentials: None, executor: str
) -> None:
    """Before, the reachability check refused a URI with credentials and printed the password, on the
    Ray path too (whose own check names the store when it is not an http(s) server)."""
    path, where = _quick(digits_copy), f"http://127.0.0.1:{_free_port()}"
    if executor == "ray":
        pytest.importorskip("ray", reason="the Ray path's store check runs only with the [ray] extra")
        where = f"postgresql://127.0.0.1:{_free_port()}/mlflow"
        sweep = {"grid": {"steps.calibrate.method": ["minmax"]}, "executor": "ray", "ray": {"address": "127.0.0.1:1"}}
        path = _quick(digits_copy, sweep=sweep)
    assert main(["run", str(path), "--tracking-uri", _with_credentials(where)]) == 2
    err = capsys.readouterr().err
    shown = where if executor == "local" else redacted(_with_credentials(where))  # http: credentials moved out
    assert SECRET not in err and shown in err.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_server_url_with_credentials_works_and_stores_no_password(
    digits_copy: Path,
    mlflow_server: str,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    clean_credentials: None,
) -> None:
    summary = tmp_path / "s.json"
    uri = _with_credentials(mlflow_server)
    assert main(["run", str(_quick(digits_copy)), "--tracking-uri", uri, "--summary-json", str(summary)]) == 0
    out, err = capfd.readouterr()
    assert SECRET not in out + err and "tracking http://127.0.0.1:" in err
    stored = [tmp_path / "server.db", *(p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()), summary]
    assert len(stored) > 5
    assert [p for p in stored if SECRET.encode() in p.read_bytes()] == []
