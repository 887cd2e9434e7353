"""A sweep's trials: what each one is, how it ended, and which one wins.

A trial is the pipeline with one combination of the grid applied, validated as a whole before
anything runs (:func:`pipeline.settings.config.load`). An executor
(:mod:`pipeline.orchestration.executors`) runs it and records its outcome here.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.launch import own_module_command
from pipeline.mlflow_io.store import has_credentials
from pipeline.settings.config import PipelineConfig

LATENCY = "cpu.int8.latency_p50_ms"
EXIT_GATE_FAILED = 3  # cli.py's exit code for a failed gate (a trial process's)
UNGATED = "not run"  # a trial that finished without a validate step
ERROR_TAIL_LINES = 5  # of a trial process's stderr, when it has no int8pipe paragraph to quote


@dataclass
class Trial:
    overrides: dict[str, Any]  # the grid's combination, by dotted key
    config: PipelineConfig | None = None  # the trial's pipeline, validated (None only in tests of the table)
    run_id: str = ""
    gate: str = "not started"  # passed | failed | not run (finished, no validate step) | error | killed | skipped
    metrics: dict[str, float] = field(default_factory=dict)
    steps: dict[str, str] = field(default_factory=dict)
    error: str = ""

    @property
    def label(self) -> str:
        return ", ".join(f"{k.rpartition('.')[2]}={v}" for k, v in self.overrides.items()) or "defaults"

    @property
    def pipeline(self) -> PipelineConfig:
        """The trial's pipeline without its promote step: only the sweep's winner is promoted."""
        assert self.config is not None
        steps = {k: v for k, v in self.config.steps.items() if k != "promote"}
        return dataclasses.replace(self.config, steps=steps)

    def command(self, uri: str, sweep_run: str, summary_json: Path | str, reuse: bool) -> list[str]:
        """The trial as an ``int8pipe run`` process: its YAML and the overrides it was validated from.

        A URI holding a password (a database URL's) is left out: a command line is visible to every
        user of the machine, so the process gets it in its environment instead (:func:`environment`)."""
        cfg = self.config
        assert cfg is not None and cfg.source is not None
        args = [*own_module_command("pipeline"), "run", str(cfg.source)]
        args += [] if has_credentials(uri) else ["--tracking-uri", uri]
        for item in cfg.overrides:
            args += ["--set", item]
        args += ["--under", sweep_run, "--run-name", self.label, "--skip-promote", "--summary-json", str(summary_json)]
        return args + ([] if reuse else ["--no-reuse"])

    @staticmethod
    def environment(uri: str) -> dict[str, str] | None:
        """The environment of a trial process (None: this one's): the tracking URI when
        :meth:`command` left it out."""
        return {**os.environ, "MLFLOW_TRACKING_URI": uri} if has_credentials(uri) else None

    def record(self, returncode: int, summary: dict[str, Any], stderr: list[str] | None = None) -> None:
        """A trial process's outcome: its exit code, its ``--summary-json`` and its last words
        (``stderr``, its last lines), which the trials table keeps for a trial that did not pass."""
        self.run_id, self.steps = summary.get("run_id", ""), summary.get("steps", {})
        self.metrics = summary.get("metrics", {})
        words = last_words(stderr or [])
        if returncode == 0 and not self.run_id:  # it ended "well" without saying what it did
            self.gate = "error"
            self.error = (
                "the trial process exited 0 without writing its summary (no run id, no gate): something in "
                "it ended the process early" + (f"; its last words: {words}" if words else "")
            )
            return
        if returncode == 0:
            self.gate = summary.get("gate", "error")
        else:
            self.gate = "failed" if returncode == EXIT_GATE_FAILED else "error"
            self.error = words or f"the trial process exited with code {returncode}"

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
    """The best trial that passed the gate; in a sweep whose trials have no gate at all (no validate
    step), the best that finished. A trial without a gate never beats one that failed its gate."""
    gated = any(t.gate in ("passed", "failed") for t in trials)
    pool = [t for t in trials if t.gate == ("passed" if gated else UNGATED)]
    return min(pool, key=rank_key, default=None)


def last_words(lines: list[str]) -> str:
    """What a trial process said last: int8pipe's one-paragraph message (``int8pipe: ...`` to the end)
    if it printed one, else its last few lines (a traceback's end)."""
    lines = [ln.rstrip() for ln in lines if ln.strip()]
    start = max((i for i, ln in enumerate(lines) if ln.startswith("int8pipe: ")), default=None)
    tail = lines[start:] if start is not None else lines[-ERROR_TAIL_LINES:]
    return " ".join(tail)
