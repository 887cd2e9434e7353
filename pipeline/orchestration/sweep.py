"""Sweeps: one trial per combination of the grid, nested under one sweep run; only the best promoted.

Each trial is the pipeline with its combination applied as ``--set`` overrides and without its
promote step. Steps whose config and inputs are equal across trials run once and are reused (the
cache key); a method-only sweep calibrates once and rethresholds the stored histograms. The
selected trial is the gate-passing one with the most INT8 nodes; ties go to the smallest accuracy
drop, then the lower latency. On a time budget, Ctrl-C or a failed trial, the trials finished so far
are still compared, tabled and (except after Ctrl-C) the best of them promoted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.analysis import plots
from pipeline.errors import GateFailed, Int8PipeError
from pipeline.log import logger
from pipeline.mlflow_io.tracking import Tracker
from pipeline.orchestration.runner import Summary, run_pipeline
from pipeline.settings.config import PipelineConfig
from pipeline.tag_names import BEST_RUN_TAG, BEST_TRIAL_TAG, SWEEP_TAG

LATENCY = "cpu.int8.latency_p50_ms"


@dataclass
class Trial:
    overrides: dict[str, Any]
    run_id: str = ""
    gate: str = "not run"  # passed | failed | error | skipped
    metrics: dict[str, float] = field(default_factory=dict)
    steps: dict[str, str] = field(default_factory=dict)
    error: str = ""

    @property
    def label(self) -> str:
        return ", ".join(f"{k.rpartition('.')[2]}={v}" for k, v in self.overrides.items())

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "overrides": self.overrides,
            "metrics": self.metrics,
            "gate": self.gate,
            "steps": self.steps,
        }


def rank_key(t: Trial) -> tuple[float, float, float]:
    """Coverage first (what users deploy for, within their max_drop), then accuracy, then speed."""
    m = t.metrics
    return (-m.get("int8_nodes", 0.0), m.get("accuracy_drop", math.inf), m.get(LATENCY, math.inf))


def select_best(trials: list[Trial]) -> Trial | None:
    return min((t for t in trials if t.gate == "passed"), key=rank_key, default=None)


def _without_promote(cfg: PipelineConfig) -> PipelineConfig:
    return dataclasses.replace(cfg, steps={k: v for k, v in cfg.steps.items() if k != "promote"})


def _run_local(trial: Trial, cfg: PipelineConfig, uri: str | None, reuse: bool, sweep_run: str) -> None:
    summary = Summary()
    try:
        run_pipeline(_without_promote(cfg), uri, reuse=reuse, summary=summary, under=sweep_run, run_name=trial.label)
        trial.gate = "passed"
    except GateFailed as exc:
        trial.gate, trial.error = "failed", str(exc)
    except Int8PipeError as exc:
        trial.gate, trial.error = "error", str(exc)
        logger.warning("sweep: trial %s failed: %s", trial.label, exc)
    except Exception as exc:  # a bug in one trial must not cost the others; its traceback is logged
        trial.gate, trial.error = "error", f"{type(exc).__name__}: {exc}"
        logger.exception("sweep: trial %s raised", trial.label)
    trial.run_id, trial.metrics, trial.steps = summary.run_id, summary.metrics, summary.steps


def apply_result(trial: Trial, returncode: int, summary: dict[str, Any]) -> None:
    """A trial process's outcome: its exit code (0 passed, 3 gate failed) and --summary-json."""
    trial.run_id, trial.steps = summary.get("run_id", ""), summary.get("steps", {})
    trial.metrics = summary.get("metrics", {})
    trial.gate = {0: "passed", 3: "failed"}.get(returncode, "error")


def _trial_command(cfg: PipelineConfig, trial: Trial, uri: str, sweep_run: str, out: Path) -> list[str]:
    assert cfg.source is not None
    args = [sys.executable, "-m", "pipeline", "run", str(cfg.source), "--tracking-uri", uri]
    for item in [*cfg.overrides, "sweep=null", *(f"{k}={json.dumps(v)}" for k, v in trial.overrides.items())]:
        args += ["--set", item]
    return args + ["--under", sweep_run, "--run-name", trial.label, "--skip-promote", "--summary-json", str(out)]


def _run_parallel(
    cfg: PipelineConfig, trials: list[Trial], uri: str, sweep_run: str, deadline: float, reuse: bool
) -> None:
    """Trials as processes on this machine, at most ``sweep.parallel`` at once."""
    assert cfg.sweep is not None
    pending = list(trials)
    running: dict[subprocess.Popen[bytes], tuple[Trial, Path]] = {}
    with tempfile.TemporaryDirectory(prefix="int8pipe-sweep-") as tmp:
        try:
            while pending or running:
                while pending and len(running) < cfg.sweep.parallel and time.monotonic() < deadline:
                    trial = pending.pop(0)
                    out = Path(tmp) / f"trial{trials.index(trial)}.json"
                    cmd = _trial_command(cfg, trial, uri, sweep_run, out) + ([] if reuse else ["--no-reuse"])
                    running[subprocess.Popen(cmd, stdout=subprocess.DEVNULL)] = (trial, out)
                if not running:
                    break
                time.sleep(0.2)
                for proc in [p for p in running if p.poll() is not None]:
                    trial, out = running.pop(proc)
                    apply_result(trial, proc.returncode, json.loads(out.read_text()) if out.is_file() else {})
        finally:
            for proc in running:  # Ctrl-C: the trials get SIGTERM and mark their own runs KILLED
                proc.terminate()
            for proc in running:
                proc.wait()
    for trial in pending:
        trial.gate = "skipped"


def run_sweep(
    cfg: PipelineConfig, tracking_uri: str | None, reuse: bool = True, summary: Summary | None = None
) -> Summary:
    """Run every trial of ``cfg.trials`` under one sweep run, compare them, promote the best."""
    assert cfg.sweep is not None
    summary = summary if summary is not None else Summary()
    if cfg.sweep.executor == "ray":  # Ray, a cluster and a tracking server every node reaches, before any run
        from pipeline.orchestration.distributed import preflight

        preflight(cfg, tracking_uri)
    tracker = Tracker(tracking_uri, cfg.experiment)
    tracker.close_abandoned()
    trials = [Trial(overrides) for overrides, _ in cfg.trials]
    summary.trials = trials
    budget = cfg.sweep.time_budget_s
    deadline = time.monotonic() + (budget if budget is not None else math.inf)
    resolved = cfg.resolved() | {"sweep": dataclasses.asdict(cfg.sweep)}
    with tracker.parent_run(cfg.name, resolved, f"{cfg.name} sweep ({len(trials)} trials)") as sweep_run:
        summary.run_id = sweep_run
        tracker.client.set_tag(sweep_run, SWEEP_TAG, "true")
        logger.info("sweep %r: run %s, %d trials", cfg.name, sweep_run, len(trials))
        interrupted = False
        try:
            if cfg.sweep.executor == "ray":
                from pipeline.orchestration.distributed import run_trials

                run_trials(cfg, trials, tracker.uri, sweep_run, deadline, reuse, tracker.client)
            elif cfg.sweep.parallel > 1:
                _run_parallel(cfg, trials, tracker.uri, sweep_run, deadline, reuse)
            else:
                for i, (trial, (_, trial_cfg)) in enumerate(zip(trials, cfg.trials)):
                    if time.monotonic() >= deadline:
                        left = len(trials) - i
                        logger.warning("sweep: time budget of %ss spent; %d trial(s) not started", budget, left)
                        for rest in trials[i:]:
                            rest.gate = "skipped"
                        break
                    logger.info("sweep: trial %d/%d: %s", i + 1, len(trials), trial.label)
                    _run_local(trial, trial_cfg, tracker.uri, reuse, sweep_run)
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            best = select_best(trials)
            _report(tracker, sweep_run, trials, best)
            summary.best = best.run_id if best else None
            summary.gate = "passed" if best else "failed"
            if best is not None:
                summary.metrics = dict(best.metrics)
                summary.steps = dict(best.steps)
        if best is not None and "promote" in cfg.steps and not interrupted:
            best_cfg = cfg.trials[trials.index(best)][1]
            promoted = run_pipeline(best_cfg, tracker.uri, reuse=True, only="promote", under=sweep_run,
                                    run_name=f"promote: {best.label}")  # fmt: skip
            summary.registered_model = promoted.registered_model
            summary.steps["promote"] = promoted.steps["promote"]
        if best is None:  # inside the run: the sweep run ends FAILED
            raise GateFailed(
                f"sweep {cfg.name!r}: no trial passed the accuracy gate ({len(trials)} in the grid). The table "
                "sweep/trials_table.json on the sweep run shows each one's gate, metric and error."
            )
    return summary


def _report(tracker: Tracker, sweep_run: str, trials: list[Trial], best: Trial | None) -> None:
    """The trade-off table and plot on the sweep run, and the best trial's numbers as its metrics."""
    rows = [
        {
            "trial": t.label,
            "gate": t.gate,
            "selected": t is best,
            "int8_nodes": t.metrics.get("int8_nodes"),
            "accuracy_drop": t.metrics.get("accuracy_drop"),
            "accuracy_drop_se": t.metrics.get("accuracy_drop_se"),  # drops closer than ~2 of these are a tie
            "latency_p50_ms": t.metrics.get(LATENCY),
            "run_id": t.run_id,
            "error": t.error[:300],
        }
        for t in trials
    ]
    child = tracker.step_tracker(sweep_run)
    child.log_table(rows, "sweep/trials_table.json")
    with tempfile.TemporaryDirectory() as tmp:
        done = [t for t in trials if "accuracy_drop" in t.metrics]
        if done:
            path = Path(tmp) / "tradeoff.png"
            plots.tradeoff(
                [t.label for t in done],
                [t.metrics.get("int8_nodes", 0.0) for t in done],
                [t.metrics["accuracy_drop"] for t in done],
                [t is best for t in done],
                path,
            )
            tracker.client.log_artifact(sweep_run, str(path), "sweep")
    metrics = {"trials": float(len(trials)), "trials_passed": float(sum(t.gate == "passed" for t in trials))}
    if best is not None:
        metrics |= {k: v for k, v in best.metrics.items() if k in ("int8_nodes", "accuracy_drop", LATENCY)}
        tracker.client.set_tag(sweep_run, BEST_RUN_TAG, best.run_id)
        tracker.client.set_tag(sweep_run, BEST_TRIAL_TAG, best.label)
        logger.info("sweep: best trial %s (run %s)", best.label, best.run_id)
    child.log_metrics(metrics)
