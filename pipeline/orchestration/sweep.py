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
import math
import tempfile
import time
from pathlib import Path

from pipeline.analysis import plots
from pipeline.errors import GateFailed
from pipeline.log import logger
from pipeline.mlflow_io.tracking import Tracker, ui_line
from pipeline.orchestration.executors import InProcess, Processes, SweepRun, TrialExecutor
from pipeline.orchestration.runner import Summary, run_pipeline
from pipeline.orchestration.trials import LATENCY, Trial, rank_key, select_best
from pipeline.settings.config import PipelineConfig
from pipeline.tag_names import BEST_RUN_TAG, BEST_TRIAL_TAG, SWEEP_TAG


def run_sweep(
    cfg: PipelineConfig, tracking_uri: str | None, reuse: bool = True, summary: Summary | None = None
) -> Summary:
    """Run every trial of ``cfg.trials`` under one sweep run, compare them, promote the best."""
    assert cfg.sweep is not None
    summary = summary if summary is not None else Summary()
    executor = executor_for(cfg)
    executor.preflight(cfg, tracking_uri)  # e.g. Ray: a cluster and a tracking server every node reaches
    tracker = Tracker(tracking_uri, cfg.experiment)
    tracker.close_abandoned()
    trials = [Trial(overrides, trial_cfg) for overrides, trial_cfg in cfg.trials]
    summary.trials = trials
    budget = cfg.sweep.time_budget_s
    deadline = time.monotonic() + (budget if budget is not None else math.inf)
    resolved = cfg.resolved() | {"sweep": dataclasses.asdict(cfg.sweep)}
    with tracker.parent_run(cfg.name, resolved, f"{cfg.name} sweep ({len(trials)} trials)") as sweep_run:
        summary.run_id = sweep_run
        tracker.set_tags(sweep_run, {SWEEP_TAG: "true"})
        logger.info("sweep %r: run %s, %d trials", cfg.name, sweep_run, len(trials))
        logger.info("sweep %r: %s", cfg.name, ui_line(tracker.uri, tracker.experiment_id, sweep_run))
        interrupted = False
        try:
            sweep = SweepRun(cfg, tracker.uri, sweep_run, deadline, reuse, tracker)
            executor.run(trials, sweep)
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            best = select_best(trials)
            _report(tracker, sweep_run, trials, best, cfg.sweep.stop_at_first_pass)
            summary.best = best.run_id if best else None
            summary.gate = best.gate if best else "failed"  # passed, or not run (no validate step)
            if best is not None:
                summary.metrics = dict(best.metrics)
                summary.steps = dict(best.steps)
        if best is not None and "promote" in cfg.steps and not interrupted:
            assert best.config is not None
            promoted = run_pipeline(
                best.config, tracker.uri, reuse=True, only="promote", under=sweep_run, run_name=f"promote: {best.label}"
            )
            summary.registered_model = promoted.registered_model
            summary.steps["promote"] = promoted.steps["promote"]
        if best is None:  # inside the run: the sweep run ends FAILED
            raise GateFailed(
                f"sweep {cfg.name!r}: no trial passed the accuracy gate ({len(trials)} in the grid). The table "
                "sweep/trials_table.json on the sweep run shows each one's gate, metric and error."
            )
    return summary


def executor_for(config: PipelineConfig) -> TrialExecutor:
    """The executor ``sweep.executor`` and ``sweep.parallel`` ask for."""
    assert config.sweep is not None
    if config.sweep.executor == "ray":
        from pipeline.orchestration.ray_executor import RayTasks  # Ray's module loads only when asked for

        return RayTasks()
    return Processes() if config.sweep.parallel > 1 else InProcess()


def why(t: Trial, best: Trial | None, first_pass: bool) -> str:
    """The trials table's account of each trial against the selected one."""
    if t is best:
        if first_pass:
            return "selected: the first trial to pass the gate"
        return "selected: passed with the most INT8 nodes, then the smallest drop, then the lowest latency"
    if t.gate == "passed" and best is not None:
        mine, theirs = rank_key(t), rank_key(best)
        if mine[0] != theirs[0]:
            return "passed, with fewer INT8 nodes than the selected trial"
        return "passed, with a larger drop than the selected trial" if mine[1] != theirs[1] else "passed, slower"
    if t.gate == "failed":
        return f"gate failed (drop {t.metrics['accuracy_drop']:.4f})" if "accuracy_drop" in t.metrics else "gate failed"
    return t.error if t.gate == "skipped" and t.error else t.gate


def _report(tracker: Tracker, sweep_run: str, trials: list[Trial], best: Trial | None, first_pass: bool) -> None:
    """The trade-off table and plot on the sweep run, and the best trial's numbers as its metrics."""
    rows = [
        {
            "trial": t.label,
            "gate": t.gate,
            "selected": t is best,
            "why": why(t, best, first_pass),
            "int8_nodes": t.metrics.get("int8_nodes"),
            "recovered_fp_nodes": t.metrics.get("recovered_fp_nodes"),  # the nodes recovery kept float
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
                [int(t.metrics.get("recovered_fp_nodes", 0)) for t in done],
            )
            tracker.log_artifact(sweep_run, path, "sweep")
    metrics = {"trials": float(len(trials)), "trials_passed": float(sum(t.gate == "passed" for t in trials))}
    if best is not None:
        metrics |= {k: v for k, v in best.metrics.items() if k in ("int8_nodes", "accuracy_drop", LATENCY)}
        tracker.set_tags(sweep_run, {BEST_RUN_TAG: best.run_id, BEST_TRIAL_TAG: best.label})
        logger.info("sweep: best trial %s (run %s)", best.label, best.run_id)
    child.log_metrics(metrics)
