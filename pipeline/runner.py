"""Runs a validated pipeline: one parent run, one nested run per step, hand-offs and reuse."""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.config import PipelineConfig
from pipeline.context import StepContext
from pipeline.errors import ConfigError, GateFailed, fail
from pipeline.log import logger
from pipeline.schema import to_mapping
from pipeline.tracking import REUSED_FROM_TAG, REUSED_TAG, Tracker
from steps import get_step


@dataclass
class Summary:
    """What a pipeline run produced; ``int8pipe run --summary-json`` writes it."""

    run_id: str = ""
    steps: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    registered_model: dict[str, Any] | None = None
    gate: str = "passed"
    reused: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "steps": self.steps,
            "metrics": self.metrics,
            "registered_model": self.registered_model,
            "gate": self.gate,
        }


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.cache
def code_digest() -> str:
    """Digest of int8pipe's own source, so an edited checkout never reuses stale step results."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent
    for pkg in ("pipeline", "steps"):
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(f.read_bytes())
    return h.hexdigest()


def cache_key(step: str, cfg: Any, inputs: dict[str, Path], extra: dict[str, Any]) -> str:
    material = {
        "step": step,
        "config": to_mapping(cfg),
        "inputs": {k: file_digest(p) for k, p in sorted(inputs.items()) if p.is_file()},
        "extra": extra,
        "version": __version__,
        "code": code_digest(),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:32]


def run_pipeline(
    cfg: PipelineConfig,
    tracking_uri: str | None = None,
    reuse: bool = True,
    only: str | None = None,
    summary: Summary | None = None,
) -> Summary:
    """Run every configured step (or, with ``only``, that step on reused earlier ones).

    A :class:`GateFailed` or other error marks the failing step's run and the parent run FAILED and
    propagates; runs of earlier steps stay FINISHED. ``summary`` is filled in as steps finish so a
    caller can still report it after a failure.
    """
    names = list(cfg.steps)
    if only is not None and only not in names:
        fail(ConfigError, f"--only {only}: that step is not in this pipeline (it has {', '.join(names)}).")
    summary = summary if summary is not None else Summary()
    tracker = Tracker(tracking_uri, cfg.experiment)
    handoffs: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="int8pipe-") as tmp, tracker.parent_run(cfg.name, cfg.resolved()) as parent:
        summary.run_id = parent
        logger.info("pipeline %r: run %s (tracking %s)", cfg.name, parent, tracker.uri)
        for name in names:
            if only is not None and names.index(name) > names.index(only):
                break
            step = get_step(name)()
            step_cfg = cfg.steps[name]
            workdir = Path(tmp) / name
            workdir.mkdir()
            ctx = StepContext(
                pipeline=cfg,
                workdir=workdir,
                inputs=dict(handoffs),
                upstream_metrics=dict(summary.metrics),
                upstream_runs=dict(summary.steps),
                tracker=None,  # type: ignore[arg-type]  # set once the run is open
            )
            key = cache_key(name, step_cfg, handoffs, step.key_material(ctx, step_cfg))
            prior = tracker.find_reusable(name, key) if (reuse and step.reusable) else None
            if only is not None and name != only and prior is None:
                fail(
                    ConfigError,
                    f"--only {only}: step {name!r} has no finished run with this configuration to reuse; "
                    f"run the pipeline up to {name!r} first.",
                )
            with tracker.child_run(name, key) as child:
                ctx.tracker = child
                summary.steps[name] = child.run_id
                try:
                    if prior is not None:
                        origin = prior.data.tags.get(REUSED_FROM_TAG, prior.info.run_id)
                        logger.info("%s: reusing run %s (same config and inputs)", name, origin)
                        ctx.outputs = tracker.restore(prior, workdir)
                        ctx.log_metrics(dict(prior.data.metrics))
                        child.set_tags({REUSED_TAG: "true", REUSED_FROM_TAG: origin})
                        summary.reused.append(name)
                    else:
                        logger.info("%s: running", name)
                        step.run(ctx, step_cfg)
                except GateFailed:
                    summary.gate = "failed"
                    raise
                finally:
                    tracker.log_outputs(child, workdir, ctx.outputs)
                    summary.metrics.update(ctx.metrics)
                    starred = {
                        k: v for k, v in ctx.metrics.items() if any(fnmatch.fnmatch(k, p) for p in step.parent_metrics)
                    }
                    tracker.log_parent_metrics(parent, starred)
            handoffs.update(ctx.outputs)
            if "registered_model" in ctx.results:
                summary.registered_model = ctx.results["registered_model"]
    return summary
