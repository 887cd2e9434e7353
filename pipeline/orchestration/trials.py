"""A sweep's trials: what each one is, how it ended, and which one wins.

A trial is the pipeline with one combination of the grid applied, validated as a whole before
anything runs (:func:`pipeline.settings.config.load`). An executor
(:mod:`pipeline.orchestration.executors`) runs it and records its outcome here.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.settings.config import PipelineConfig

LATENCY = "cpu.int8.latency_p50_ms"
EXIT_GATES = {0: "passed", 3: "failed"}  # a trial process's exit code -> its gate (cli.py's exit codes)


@dataclass
class Trial:
    overrides: dict[str, Any]  # the grid's combination, by dotted key
    config: PipelineConfig | None = None  # the trial's pipeline, validated (None only in tests of the table)
    run_id: str = ""
    gate: str = "not run"  # passed | failed | error | killed | skipped
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
        """The trial as an ``int8pipe run`` process: its YAML and the overrides it was validated from."""
        cfg = self.config
        assert cfg is not None and cfg.source is not None
        args = [sys.executable, "-m", "pipeline", "run", str(cfg.source), "--tracking-uri", uri]
        for item in cfg.overrides:
            args += ["--set", item]
        args += ["--under", sweep_run, "--run-name", self.label, "--skip-promote", "--summary-json", str(summary_json)]
        return args + ([] if reuse else ["--no-reuse"])

    def record(self, returncode: int, summary: dict[str, Any]) -> None:
        """A trial process's outcome: its exit code and its ``--summary-json``."""
        self.run_id, self.steps = summary.get("run_id", ""), summary.get("steps", {})
        self.metrics = summary.get("metrics", {})
        self.gate = EXIT_GATES.get(returncode, "error")

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
