"""What a step receives from the runner: its folders, its inputs, and a tracker to report through."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.mlflow_io.tracking import StepTracker
    from pipeline.settings.config import PipelineConfig
    from pipeline.settings.facts import Facts


@dataclass
class StepContext:
    pipeline: PipelineConfig
    workdir: Path  # everything written here becomes the run's artifacts
    inputs: dict[str, Path]  # hand-offs from earlier steps, by name
    upstream_metrics: dict[str, float]  # metrics of earlier steps in this pipeline
    upstream_runs: dict[str, str]  # step name -> run id
    tracker: StepTracker
    source_model: Path | None = None  # the user's model as a local ONNX file (None for a PyTorch factory)
    # where that model came from: {'onnx': path relative to the YAML} or {'mlflow': URI, and when it is a
    # registry URI 'registered_model' + 'version' as resolved for this run}, or {'pytorch': factory}
    source: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)  # non-file results for the summary

    @property
    def facts(self) -> Facts:
        """The pipeline-level facts (pipeline/settings/facts.py): what a step may know of the others' configs."""
        return self.pipeline.facts

    def input(self, name: str) -> Path:
        return self.inputs[name]

    def output(self, name: str, relpath: str) -> Path:
        """Reserve ``workdir/relpath`` as hand-off ``name`` and return its path."""
        path = self.workdir / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        self.outputs[name] = path
        return path

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log ``metrics`` on the step's run; ``step`` makes them one point of a series (e.g. an iteration)."""
        clean = {k: float(v) for k, v in metrics.items()}
        self.metrics.update(clean)
        self.tracker.log_metrics(clean, step=step)

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        self.tracker.log_table(rows, artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tracker.set_tags(tags)
