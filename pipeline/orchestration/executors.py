"""How a sweep's trials run: the one extension point for executors.

Every executor receives the validated trials and fills in each one's outcome; a trial it did not
start before the sweep's deadline is ``skipped``. ``sweep.executor`` and ``sweep.parallel`` pick
one (:func:`pipeline.orchestration.sweep.executor_for`):

- :class:`InProcess`: one trial after another in this process (``parallel: 1``, the default);
- :class:`Processes`: up to ``parallel`` trials at once, each an ``int8pipe run`` process;
- :class:`~pipeline.orchestration.ray_executor.RayTasks`: each trial a Ray task (``executor: ray``).

Trials started as processes are rebuilt there from their YAML and the overrides they were
validated from (``Trial.command``), so a trial's runs are the same whichever executor ran it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, ClassVar

from pipeline import launch
from pipeline.errors import GateFailed, Int8PipeError
from pipeline.log import logger
from pipeline.orchestration.runner import Summary, run_pipeline
from pipeline.orchestration.trials import Trial

if TYPE_CHECKING:
    from pipeline.mlflow_io.tracking import Tracker
    from pipeline.settings.config import PipelineConfig


@dataclass
class SweepRun:
    """What every executor needs of the sweep: where its trials log, under which run, until when."""

    config: PipelineConfig  # the sweep's own pipeline (sweep settings, YAML, overrides)
    uri: str  # the tracking URI, as every trial process receives it
    sweep_run: str  # run id the trials nest under
    deadline: float  # time.monotonic() after which no trial starts
    reuse: bool
    tracker: Tracker  # the sweep's: trials' runs are looked up and closed through it

    def passed(self, done: list[Trial]) -> bool:
        """Whether the sweep stops here: ``stop_at_first_pass`` and one of ``done`` passed."""
        assert self.config.sweep is not None
        return self.config.sweep.stop_at_first_pass and any(t.gate == "passed" for t in done)


class TrialExecutor:
    """Runs a sweep's trials; subclasses say how."""

    name: ClassVar[str]

    def preflight(self, config: PipelineConfig, tracking_uri: str | None) -> None:
        """Everything this executor needs, checked before the sweep creates any run."""

    def run(self, trials: list[Trial], sweep: SweepRun) -> None:
        raise NotImplementedError


class InProcess(TrialExecutor):
    name = "in-process"

    def run(self, trials: list[Trial], sweep: SweepRun) -> None:
        for i, trial in enumerate(trials):
            if time.monotonic() >= sweep.deadline:
                skip(trials[i:], sweep)
                return
            if sweep.passed(trials[:i]):
                stopped(trials[i:])
                return
            logger.info("sweep: trial %d/%d: %s", i + 1, len(trials), trial.label)
            self._run_one(trial, sweep)

    @staticmethod
    def _run_one(trial: Trial, sweep: SweepRun) -> None:
        summary = Summary()
        try:
            run_pipeline(
                trial.pipeline,
                sweep.uri,
                reuse=sweep.reuse,
                summary=summary,
                under=sweep.sweep_run,
                run_name=trial.label,
            )
            trial.gate = summary.gate  # passed, or not run when the pipeline has no validate step
        except GateFailed as exc:
            trial.gate, trial.error = "failed", str(exc)
        except Int8PipeError as exc:
            trial.gate, trial.error = "error", str(exc)
            logger.warning("sweep: trial %s failed: %s", trial.label, exc)
        except Exception as exc:  # a bug in one trial must not cost the others; its traceback is logged
            trial.gate, trial.error = "error", f"{type(exc).__name__}: {exc}"
            logger.exception("sweep: trial %s raised", trial.label)
        trial.run_id, trial.metrics, trial.steps = summary.run_id, summary.metrics, summary.steps


class Processes(TrialExecutor):
    """Trials as processes on this machine, at most ``sweep.parallel`` at once."""

    name = "processes"

    def run(self, trials: list[Trial], sweep: SweepRun) -> None:
        assert sweep.config.sweep is not None
        parallel = sweep.config.sweep.parallel
        pending = list(trials)
        running: dict[subprocess.Popen[bytes], tuple[Trial, Path, _StderrTail]] = {}
        with tempfile.TemporaryDirectory(prefix="int8pipe-sweep-") as tmp:
            try:
                while pending or running:
                    if sweep.passed(trials):  # the running ones finish; no other starts
                        stopped(pending)
                        pending = []
                    while pending and len(running) < parallel and time.monotonic() < sweep.deadline:
                        trial = pending.pop(0)
                        out = Path(tmp) / f"trial{trials.index(trial)}.json"
                        cmd = trial.command(sweep.uri, sweep.sweep_run, out, sweep.reuse)
                        env = launch.die_with(trial.environment(sweep.uri))  # a kill -9 of this driver ends it
                        # its own session: a terminal's Ctrl-C reaches this driver alone, which stops the
                        # trial with one SIGTERM. A trial that got the Ctrl-C itself died in its
                        # interpreter's start-up with a traceback, or got the SIGTERM on top of it.
                        proc = subprocess.Popen(
                            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True
                        )
                        running[proc] = (trial, out, _StderrTail(proc))
                    if not running:
                        break
                    time.sleep(0.2)
                    for proc in [p for p in running if p.poll() is not None]:
                        trial, out, tail = running.pop(proc)
                        summary = json.loads(out.read_text()) if out.is_file() else {}
                        trial.record(proc.returncode, summary, tail.lines())
                        if trial.error:
                            logger.warning("sweep: trial %s: %s", trial.label, trial.error)
            finally:
                for proc in running:  # Ctrl-C: the trials get SIGTERM and mark their own runs KILLED
                    proc.terminate()
                for proc, (trial, out, tail) in running.items():
                    _interrupted(proc, trial, out, tail, sweep)
        skip(pending, sweep)


STOP_GRACE_S = 30.0  # for a trial to close its runs after SIGTERM (a long ONNX Runtime call delays it)


def _interrupted(proc: subprocess.Popen[bytes], trial: Trial, out: Path, tail: _StderrTail, sweep: SweepRun) -> None:
    """A trial running when the sweep was interrupted: its own outcome if it ended by itself meanwhile,
    else ``killed``, its runs closed KILLED here when it could not (the signal came as it created them,
    or it outlived the grace), or ``skipped`` when it stopped before creating any."""
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    words = tail.lines()  # its last line is printed before the driver's
    if proc.returncode not in (128 + signal.SIGTERM, -signal.SIGTERM, -signal.SIGKILL):
        trial.record(proc.returncode, json.loads(out.read_text()) if out.is_file() else {}, words)
        return
    try:
        run_id = sweep.tracker.child_named(sweep.sweep_run, trial.label)
        if run_id is None:
            trial.gate = "skipped"
            return
        trial.run_id, trial.gate, trial.error = run_id, "killed", "stopped: the sweep's driver was interrupted"
        sweep.tracker.close_stopped(run_id, "KILLED", grace_s=0)
    except Exception as exc:  # the store failing now must not hide the interrupt behind a traceback
        logger.warning("sweep: could not close the runs of trial %s: %s", trial.label, str(exc).splitlines()[0][:300])


class _StderrTail:
    """A trial process's stderr, passed on to this process's line by line as it comes (its log stays
    live) while its last lines are kept: the trials table quotes them for a trial that errored."""

    KEPT = 40

    def __init__(self, proc: subprocess.Popen[bytes]):
        assert proc.stderr is not None
        self._kept: deque[str] = deque(maxlen=self.KEPT)
        self._thread = threading.Thread(target=self._pump, args=(proc.stderr,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[bytes]) -> None:
        with stream:
            for raw in iter(stream.readline, b""):
                line = raw.decode(errors="replace")
                sys.stderr.write(line)
                self._kept.append(line)

    def lines(self) -> list[str]:
        """The last lines, once the process has closed its stderr (it has exited)."""
        self._thread.join(timeout=10.0)
        return list(self._kept)


def stopped(trials: list[Trial]) -> None:
    """Trials not started because an earlier one passed (``sweep.stop_at_first_pass``)."""
    if trials:
        logger.info("sweep: a trial passed the gate; %d trial(s) not started (stop_at_first_pass)", len(trials))
    for trial in trials:
        trial.gate, trial.error = "skipped", "not run: an earlier trial passed the gate (stop_at_first_pass)"


def skip(trials: list[Trial], sweep: SweepRun) -> None:
    """Trials the time budget left unstarted."""
    if trials:
        assert sweep.config.sweep is not None
        budget = sweep.config.sweep.time_budget_s
        logger.warning("sweep: time budget of %ss spent; %d trial(s) not started", budget, len(trials))
    for trial in trials:
        trial.gate = "skipped"
