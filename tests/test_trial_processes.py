"""A parallel sweep's trials as processes: they start int8pipe whatever the working directory holds,
and a trial counts as passed only when it says so in its summary.

Real trial processes (``sweep.parallel: 2``) on the digits example, a real sqlite MLflow store.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import run_pipeline

pytestmark = pytest.mark.slow  # every test runs a sweep of trial processes

SOURCE = """\
import os

import numpy as np


def batches(mode):
    if mode == "vanish":  # ends the process "well" before it could write its summary
        os._exit(0)
    if mode == "boom":
        raise ValueError("the shard is missing")
    x = np.load("data/calibration.npz")["input"]
    for i in range(0, 128, 64):
        yield {"input": x[i : i + 64]}
"""


def _sweep(folder: Path, modes: list[str]) -> Path:
    """The digits pipeline (validate on cosine: every working trial passes) over a python: source
    whose ``mode`` each trial sets."""
    (folder / "source.py").write_text(SOURCE)
    path = folder / "pipeline.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["calibration"] = {"python": "source:batches", "args": {"mode": "ok"}}
    cfg["steps"] = {
        "export": {},
        "calibrate": {"method": "minmax"},
        "quantize": {},
        "validate": {"metric": "cosine", "max_drop": 0.5},
    }
    cfg["sweep"] = {"trials": [{"data.calibration.args.mode": m} for m in modes], "parallel": 2}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _table(tracking_uri: str, sweep_run: str, dst: Path) -> list[dict]:
    path = MlflowClient(tracking_uri).download_artifacts(sweep_run, "sweep/trials_table.json", str(dst))
    table = json.loads(Path(path).read_text())
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def test_trials_start_int8pipe_whatever_the_working_directory_holds(
    digits_copy: Path, tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pipeline.py in the working directory: before, `python -m pipeline` ran it in every trial
    (here it exits 0, so the trials "passed" with no run)."""
    marker = tmp_path / "shadow-ran"
    (digits_copy / "pipeline.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit(0)\n")
    monkeypatch.chdir(digits_copy)
    s = run_pipeline(_sweep(digits_copy, ["ok", "ok"]), tracking_uri, tmp_path)
    assert not marker.exists()
    assert [t["gate"] for t in s["trials"]] == ["passed", "passed"] and all(t["run_id"] for t in s["trials"])
    assert s["best"] in {t["run_id"] for t in s["trials"]} and s["gate"] == "passed"


def test_a_trial_that_ends_without_its_summary_is_an_error_with_a_reason(
    digits_copy: Path, tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trial process exiting 0 without its summary: before, it counted as passed and was selected
    (empty run id). The trials table's error column holds each errored trial's reason."""
    monkeypatch.chdir(digits_copy)
    s = run_pipeline(_sweep(digits_copy, ["vanish", "ok", "boom"]), tracking_uri, tmp_path)
    gates = [t["gate"] for t in s["trials"]]
    assert gates == ["error", "passed", "error"]
    assert s["best"] == s["trials"][1]["run_id"] != "" and s["gate"] == "passed"
    rows = _table(tracking_uri, s["run_id"], tmp_path)
    assert "exited 0 without writing its summary" in rows[0]["error"]
    assert rows[1]["error"] == "" and rows[1]["selected"]
    assert rows[2]["error"].startswith("int8pipe: error: data.calibration.python: source:batches raised ValueError")


def test_a_child_started_to_die_with_its_parent_ends_when_the_parent_is_killed(tmp_path: Path) -> None:
    """A kill -9 of a sweep driver leaves no trial running unowned: the trial gets SIGTERM at once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "sleeper.py").write_text("import time\ntime.sleep(120)\n")
    parent_code = (
        "import os, subprocess, sys, time\n"
        "from pipeline import launch\n"
        "path = sys.argv[1] + os.pathsep + os.environ.get('PYTHONPATH', '')\n"
        "env = launch.die_with({**os.environ, 'PYTHONPATH': path})\n"
        "child = subprocess.Popen(launch.own_module_command('sleeper'), env=env)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    time.sleep(1.0)  # the child has set its parent-death signal
    os.kill(child, 0)  # running
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    parent.stdout.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        if Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":
            return  # exited, waiting for init to reap it
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the child outlived its killed parent by 10 s")


def _trial_processes(driver: int) -> list[int]:
    """The driver's children that are trials (not, say, the `git` MLflow runs to date a run)."""
    try:
        children = [int(c) for c in Path(f"/proc/{driver}/task/{driver}/children").read_text().split()]
    except OSError:
        return []
    trials = []
    for pid in children:
        try:
            if b"--under" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                trials.append(pid)
        except OSError:
            pass
    return trials


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # exited, not yet reaped
    except OSError:
        return True


@pytest.mark.parametrize("moment", ["sweep run created", "trials launched", "trials starting", "a trial run created"])
def test_ctrl_c_while_trials_start_is_one_line_each_and_no_run_left_running(
    digits_copy: Path, tracking_uri: str, tmp_path: Path, moment: str
) -> None:
    """Ctrl-C (SIGINT to the terminal's process group) while a parallel sweep launches its trials.
    Before: trials still starting their interpreter died with a traceback ('Fatal Python error:
    init_import_site'), trials past it got the Ctrl-C and then the driver's SIGTERM in the middle of
    closing their runs ('During handling of the above exception...', 'database is locked'), and a
    trial's run stayed RUNNING. Moments are found by what the driver does, not by a delay a loaded
    machine would shift."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import env_without_mlflow, run_args

    cfg = yaml.safe_load((digits_copy / "pipeline.yaml").read_text())
    for step in ("benchmark", "promote"):
        cfg["steps"].pop(step)
    cfg["sweep"] = {"grid": {"steps.calibrate.method": ["minmax", "entropy", "percentile"]}, "parallel": 2}
    config = digits_copy / "pipeline.yaml"
    config.write_text(yaml.safe_dump(cfg))
    client = MlflowClient(tracking_uri)

    def run_names() -> list[str]:
        experiment = client.get_experiment_by_name(cfg["experiment"])
        return [r.info.run_name for r in client.search_runs([experiment.experiment_id])] if experiment else []

    driver = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *run_args(config, tracking_uri, tmp_path / "s.json")],
        env=env_without_mlflow(TMPDIR=str(tmp_path)),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # a process group of its own, as a shell gives a command: Ctrl-C's target
    )
    trials: set[int] = set()
    deadline = time.monotonic() + 180
    while driver.poll() is None and time.monotonic() < deadline:
        trials.update(_trial_processes(driver.pid))
        if moment == "sweep run created" and any(n.endswith("sweep (3 trials)") for n in run_names()):
            break
        if moment in ("trials launched", "trials starting") and len(trials) >= 2:
            time.sleep(1.5 if moment == "trials starting" else 0)  # importing int8pipe, then creating runs
            break
        if moment == "a trial run created" and any(n.startswith("method=") for n in run_names()):
            break
        time.sleep(0.02)
    assert driver.poll() is None, f"the sweep ended before '{moment}'"
    trials.update(_trial_processes(driver.pid))
    os.killpg(driver.pid, signal.SIGINT)
    _, err = driver.communicate(timeout=120)
    text = err.decode()
    assert driver.returncode == 130, text[-3000:]
    assert "Traceback" not in text and "During handling" not in text and "Fatal Python error" not in text, text[-4000:]
    said = [ln for ln in text.splitlines() if ln.startswith("int8pipe:")]
    assert said[-1] == "int8pipe: interrupted by SIGINT; open runs marked KILLED, temporary files removed", said
    # each trial that got as far as int8pipe says so once, before the driver's last word
    assert len(said) <= 1 + len(trials) and all("interrupted by SIGTERM" in ln for ln in said[:-1]), said
    statuses = {r.info.run_name: r.info.status for r in client.search_runs([client.get_experiment_by_name(
        cfg["experiment"]).experiment_id])}  # fmt: skip
    assert "RUNNING" not in statuses.values(), statuses
    assert statuses["digits-int8 sweep (3 trials)"] == "KILLED"
    assert all(_gone(pid) for pid in trials), "a trial process outlived the interrupted sweep"
