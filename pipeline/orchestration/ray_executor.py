"""``sweep.executor: ray``: each trial a Ray task (the Ray plumbing is :mod:`pipeline.execution.ray_cluster`).

A trial on Ray runs exactly as a trial of a local ``parallel`` sweep: the task starts
``int8pipe run CONFIG --set ... --under SWEEP_RUN --run-name ... --skip-promote --summary-json FILE``
on its node (as ``python -m pipeline`` would, without the working directory on ``sys.path``:
:mod:`pipeline.launch`) and returns the summary, so runs, reuse, metrics and the selection
are those of a local sweep. The node reads the YAML and its files at the driver's paths (a shared
filesystem, or the same checkout everywhere), or, with ``sweep.ray.upload``, from a copy of the
YAML's folder Ray ships with the task (runtime_env ``working_dir``). Trials log to the tracking
server themselves, so it must be reachable from every node: http(s):// only.

Order: without ``sweep.stop_at_first_pass`` every trial is submitted at once and the cluster's free
CPUs decide how many run. With it, trials go in their order, at most as many in flight as the
cluster had room for when the sweep started (free CPUs, and GPUs, over what a trial reserves; at
least 1), the next one only when one finishes and none finished has passed, so that no trial waits
in Ray's queue to start after one has passed. What a pass leaves unsubmitted is skipped as the
local executors skip it.

Failures: a trial whose worker or node dies is an ``error`` trial, its run FAILED with the reason
(tag ``int8pipe.error``), and the sweep goes on. Ctrl-C (or SIGTERM) on the driver cancels the
outstanding tasks: queued ones never start, running ones pass SIGTERM to their trial process,
which marks its runs KILLED as any interrupted int8pipe does; a task Ray's interrupt does not reach
within ``GENTLE_CANCEL_S`` loses its worker instead, with the same SIGTERM for its trial. Runs a
trial could not close are closed KILLED by the driver.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError, fail
from pipeline.execution.ray_cluster import connected, import_ray, resolve_address
from pipeline.log import logger
from pipeline.mlflow_io.store import redacted
from pipeline.mlflow_io.tracking import Tracker, default_uri
from pipeline.orchestration.executors import SweepRun, TrialExecutor, skip, stopped
from pipeline.orchestration.trials import Trial

if TYPE_CHECKING:
    from pipeline.settings.config import PipelineConfig

SUMMARY = "{summary-json}"  # placeholder in a trial's command for the summary file on the worker
FORWARDED_ENV_EXCLUDED = ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")
CANCEL_GRACE_S = 60.0  # after Ctrl-C, how long cancelled trials get to mark their runs KILLED
# Ray's interrupt of a running task does not always land (ray-project/ray#32954: a task waiting in
# sleep or a blocking call can run on to the end), so a task still running this long after
# ``ray.cancel`` is cancelled with force, which kills its worker; the trial process then gets SIGTERM
# as its parent-death signal and closes its runs as a dead worker's trial does.
GENTLE_CANCEL_S = 10.0
STDERR_KEPT = 40  # a trial's last stderr lines returned to the driver (its error paragraph is the last)
DEAD_TRIAL_GRACE_S = 5.0  # a dead worker's trial process (SIGTERM from its parent's death) closing its runs

# Runs a trial's command with SIGTERM as its parent-death signal (Linux), so a trial whose Ray worker
# dies stops and closes its runs instead of running on unowned. argv: worker pid, then the command.
LAUNCHER = """
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except (AttributeError, OSError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(143)
os.execv(sys.argv[2], sys.argv[2:])
"""


def check_tracking_uri(uri: str) -> None:
    """Trials log from other machines: refuse a store only this one can reach (sqlite, a path, file:)."""
    if not uri.startswith(("http://", "https://")):
        fail(
            ConfigError,
            f"sweep.executor: ray: the tracking store {redacted(uri)} can only be reached from this machine, and each "
            "trial logs its runs from the Ray node it runs on. Use an http(s):// tracking server reachable "
            "from every node: mlflow server --host 0.0.0.0 --port 5000 --backend-store-uri sqlite:///mlflow.db, "
            "then --tracking-uri http://<this host>:5000 (or MLFLOW_TRACKING_URI).",
        )


def _preflight(cfg: PipelineConfig, tracking_uri: str | None) -> str:
    """Everything a Ray sweep needs, checked before any run is created: Ray, a cluster, a tracking
    server other machines reach. Returns the cluster address."""
    assert cfg.sweep is not None
    import_ray("sweep.executor: ray")
    address = resolve_address(cfg.sweep.ray.address, "sweep.ray.address")
    check_tracking_uri(tracking_uri or default_uri())
    if cfg.sweep.ray.num_cpus < 0 or cfg.sweep.ray.num_gpus < 0:
        fail(ConfigError, "sweep.ray.num_cpus and sweep.ray.num_gpus: expected numbers >= 0.")
    return address


def forwarded_env() -> dict[str, str]:
    """MLflow settings of the driver (HTTP retries, server credentials) a trial needs on its node."""
    return {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_") and k not in FORWARDED_ENV_EXCLUDED}


def run_trial_process(args: list[str], cwd: str | None, env: dict[str, str], deadline: float) -> dict[str, Any]:
    """The Ray task of one trial (runs on a worker): the trial's ``int8pipe run`` as a child process.

    ``args[0]`` (the driver's Python) is replaced by this worker's; ``deadline`` is a wall-clock
    time after which the trial does not start (the sweep's time budget). A KeyboardInterrupt here
    (``ray.cancel``) sends the child SIGTERM and waits for it to close its runs.
    """
    if time.time() >= deadline:
        return {"skipped": True}
    import ray

    gcs = ray.get_runtime_context().gcs_address
    with tempfile.TemporaryDirectory(prefix="int8pipe-trial-") as tmp:
        out, err = Path(tmp) / "summary.json", Path(tmp) / "stderr.log"
        cmd = [sys.executable, *(str(out) if a == SUMMARY else a for a in args[1:])]
        child_env = {**os.environ, **env, "RAY_ADDRESS": gcs}  # the trial's own sharded calibration, if any
        where = cwd if cwd and os.path.isdir(cwd) else None
        with open(err, "wb") as errors:
            proc = subprocess.Popen(
                [sys.executable, "-c", LAUNCHER, str(os.getpid()), *cmd],
                stdout=subprocess.DEVNULL,
                stderr=errors,
                cwd=where,
                env=child_env,
            )
            try:
                while True:
                    try:
                        code = proc.wait(timeout=1.0)
                        break
                    except subprocess.TimeoutExpired:
                        continue
            except BaseException:  # cancelled: the trial marks its runs KILLED on SIGTERM
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=CANCEL_GRACE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                tail = err.read_text(errors="replace").strip().splitlines()[-5:]  # into the Ray worker's log
                print(f"int8pipe trial cancelled (exit {proc.returncode}):", *tail, sep="\n", file=sys.stderr)
                raise
        lines = [ln for ln in err.read_text(errors="replace").splitlines() if ln.strip()]
        summary = json.loads(out.read_text()) if out.is_file() else {}
    last = "\n".join(lines[-STDERR_KEPT:])
    return {"returncode": code, "summary": summary, "stderr": last, "host": socket.gethostname()}


def _mark_failed(tracker: Tracker, sweep_run: str, trial: Trial, reason: str) -> None:
    """The run of a trial whose worker died: FAILED with the reason, its open step runs too."""
    run_id = tracker.child_named(sweep_run, trial.label)
    if run_id is None:
        return  # it died before creating its run
    trial.run_id = run_id
    try:  # the trial process got SIGTERM when its worker died (Ray may SIGKILL it soon after)
        tracker.close_stopped(run_id, "FAILED", DEAD_TRIAL_GRACE_S)
    finally:
        tracker.fail_run(run_id, reason)


class RayTasks(TrialExecutor):
    """Every trial as a Ray task: all submitted at once, or in order a cluster's worth at a time
    (``stop_at_first_pass``)."""

    name = "ray"

    def preflight(self, config: PipelineConfig, tracking_uri: str | None) -> None:
        _preflight(config, tracking_uri)

    def run(self, trials: list[Trial], sweep: SweepRun) -> None:
        cfg, tracker, sweep_run = sweep.config, sweep.tracker, sweep.sweep_run
        assert cfg.sweep is not None and cfg.source is not None
        settings, source = cfg.sweep.ray, cfg.source
        address = resolve_address(settings.address, "sweep.ray.address")
        wall_deadline = time.time() + (sweep.deadline - time.monotonic())
        runtime_env = {"working_dir": str(cfg.base_dir)} if settings.upload else None  # uploaded on connecting
        with connected(address, "sweep.executor: ray", runtime_env) as ray:
            task = ray.remote(num_cpus=settings.num_cpus, num_gpus=settings.num_gpus, max_retries=0)(run_trial_process)
            env, cwd = forwarded_env(), None if settings.upload else os.getcwd()
            window = room(ray, settings.num_cpus, settings.num_gpus) if cfg.sweep.stop_at_first_pass else len(trials)
            queue = deque(trials)
            pending: dict[Any, Trial] = {}

            def submit() -> None:
                if sweep.passed(trials):  # the ones in flight finish; no other starts
                    stopped(list(queue))
                    queue.clear()
                while queue and len(pending) < window and time.monotonic() < sweep.deadline:
                    args = queue[0].command(sweep.uri, sweep_run, SUMMARY, sweep.reuse)
                    if settings.upload:  # the task runs in Ray's copy of the YAML's folder
                        args[args.index(str(source))] = str(source.relative_to(cfg.base_dir))
                    # popped once submitted: a Ctrl-C in between leaves it queued, hence skipped
                    pending[task.remote(args, cwd, env, wall_deadline)] = queue[0]
                    queue.popleft()

            try:
                submit()
                logger.info("sweep: %d trials for the Ray cluster at %s, %d at once", len(trials), address,
                            min(window, len(trials)))  # fmt: skip
                while pending:
                    done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
                    for ref in done:
                        _finish(ray, ref, pending.pop(ref), tracker, sweep_run)
                    if done:
                        submit()
                    elif pending:
                        time.sleep(0.5)  # waiting in Python, where a signal raises what the CLI's handler raises
            except KeyboardInterrupt:
                logger.warning("sweep: interrupted; cancelling %d Ray trial(s)", len(pending))
                for trial in queue:  # never submitted: as a cancelled task that had not started
                    trial.gate = "skipped"
                for ref in pending:
                    ray.cancel(ref)  # queued: never starts; running: KeyboardInterrupt in the task -> SIGTERM
                _, stuck = ray.wait(list(pending), num_returns=len(pending), timeout=GENTLE_CANCEL_S)
                for ref in stuck:
                    logger.warning("sweep: trial %s did not stop on ray.cancel; killing its worker", pending[ref].label)
                    ray.cancel(ref, force=True)
                ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_GRACE_S)
                for ref, trial in pending.items():
                    _cancelled(ray, ref, trial, tracker, sweep_run)
                raise
        # the time budget's: never submitted, or submitted but found the deadline passed (a trial
        # stop_at_first_pass skipped says so in its error)
        skip([*queue, *(t for t in trials if t.gate == "skipped" and not t.error)], sweep)


def room(ray: Any, num_cpus: float, num_gpus: float) -> int:
    """How many trials reserving ``num_cpus`` and ``num_gpus`` the cluster's free resources hold now (at least 1)."""
    free = ray.available_resources()
    # the epsilon: 0.3 / 0.1 is 2.9999999999999996, and three trials fit
    fits = [int(free.get(k, 0.0) / need + 1e-9) for k, need in (("CPU", num_cpus), ("GPU", num_gpus)) if need > 0]
    return max(1, min(fits, default=1 << 30))


def _cancelled(ray: Any, ref: Any, trial: Trial, tracker: Tracker, sweep_run: str) -> None:
    """A trial outstanding at Ctrl-C: its own outcome if it finished regardless, else killed (it had
    started: its runs are KILLED) or skipped (it was still queued)."""
    try:
        result = ray.get(ref, timeout=0)
    except Exception:  # cancelled, or still winding down
        result = None
    if isinstance(result, dict) and "returncode" in result:
        trial.record(result["returncode"], result["summary"], result["stderr"].splitlines())
        return
    run_id = tracker.child_named(sweep_run, trial.label)
    if run_id is None:
        trial.gate = "skipped"
        return
    trial.run_id = run_id
    trial.gate, trial.error = "killed", "cancelled: Ctrl-C or SIGTERM on the sweep's driver"
    tracker.close_stopped(run_id, "KILLED", DEAD_TRIAL_GRACE_S)


def _finish(ray: Any, ref: Any, trial: Trial, tracker: Tracker, sweep_run: str) -> None:
    try:
        result = ray.get(ref)
    except ray.exceptions.RayTaskError as exc:  # the task itself raised (e.g. the process could not start)
        trial.gate, trial.error = "error", f"the trial's Ray task failed: {exc.cause!r}"
        logger.warning("sweep: trial %s: %s", trial.label, trial.error)
        _mark_failed(tracker, sweep_run, trial, trial.error)
        return
    except ray.exceptions.RayError as exc:  # its worker process or node died
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        trial.gate, trial.error = "error", f"the Ray worker running the trial died ({type(exc).__name__}: {first})"
        logger.warning("sweep: trial %s: %s", trial.label, trial.error)
        _mark_failed(tracker, sweep_run, trial, trial.error)
        return
    if result.get("skipped"):
        trial.gate = "skipped"
        return
    trial.record(result["returncode"], result["summary"], result["stderr"].splitlines())
    if trial.error:  # the trial's own last words: int8pipe's one-paragraph error
        trial.error = f"on {result['host']}, exit {result['returncode']}: {trial.error}"
        logger.warning("sweep: trial %s failed: %s", trial.label, trial.error)
