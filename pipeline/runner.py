"""Runs a validated pipeline: one parent run, one nested run per step, hand-offs and reuse."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import __version__, data
from pipeline import model as onnx_model
from pipeline.config import PipelineConfig
from pipeline.context import StepContext
from pipeline.errors import ConfigError, GateFailed, fail
from pipeline.log import logger
from pipeline.schema import to_mapping
from pipeline.tracking import REUSED_FROM_TAG, REUSED_TAG, Tracker, download_onnx, is_outage, log_dataset
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
    trials: list[Any] | None = None  # a sweep's (pipeline.sweep.Trial)
    best: str | None = None  # a sweep's selected trial run

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "run_id": self.run_id,
            "steps": self.steps,
            "metrics": self.metrics,
            "registered_model": self.registered_model,
            "gate": self.gate,
        }
        if self.trials is not None:
            out |= {"trials": [t.to_json() for t in self.trials], "best": self.best}
        return out


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def code_digest() -> str:
    """Digest of int8pipe's own source, so an edited checkout never reuses stale step results.

    Read anew each time (a few ms): a sweep's trial processes and its driver must agree on it even
    when the checkout changed while the driver was running."""
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


def source_model(cfg: PipelineConfig, tracker: Tracker, folder: Path) -> Path | None:
    """The user's model as a local ONNX file, checked before any run starts (None for PyTorch).

    A registry model is downloaded here once; an already-quantized model is refused by name.
    """
    src = cfg.model
    if src.pytorch is not None:
        return None
    if src.onnx:
        path, label = Path(src.onnx), src.onnx
    else:
        assert src.mlflow is not None
        path, label = download_onnx(src.mlflow, folder / "source", tracker.uri), src.mlflow
    model = onnx_model.load(path, label=label)
    onnx_model.refuse_quantized(model, label, "model")
    specs = onnx_model.input_specs(model)
    for which in ("calibration", "validation"):
        src = getattr(cfg.data, which)
        if src is not None and not (which == "calibration" and _from_cache(cfg)):
            data.preflight(src, specs, data.search_dirs(cfg.base_dir), f"data.{which}")
    return path


def _from_cache(cfg: PipelineConfig) -> bool:
    calibrate = cfg.steps.get("calibrate")
    return calibrate is not None and bool(calibrate.from_cache)


def run_pipeline(
    cfg: PipelineConfig,
    tracking_uri: str | None = None,
    reuse: bool = True,
    only: str | None = None,
    summary: Summary | None = None,
    under: str | None = None,
    run_name: str | None = None,
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
    tracker = Tracker(tracking_uri, cfg.experiment, under=under)
    if under is None:
        tracker.close_abandoned()
    handoffs: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="int8pipe-") as tmp:
        model_file = source_model(cfg, tracker, Path(tmp))
        label = run_name or cfg.label()
        with tracker.parent_run(cfg.name, cfg.resolved(), label) as parent:
            summary.run_id = parent
            logger.info("pipeline %r: run %s (tracking %s)", label, parent, tracker.uri)
            tracker.client.set_tag(parent, "mlflow.note.content", describe(cfg))
            for key, value in run_tags(cfg).items():
                tracker.client.set_tag(parent, key, value)
            try:
                _run_steps(cfg, tracker, parent, Path(tmp), model_file, names, reuse, only, summary, handoffs)
            finally:
                if "validate" in summary.steps:
                    tracker.client.set_tag(parent, "int8pipe.gate", summary.gate)
    return summary


# step -> the data source whose digest its cache key holds
DATASETS = {"calibrate": "calibration", "validate": "validation"}


def _log_datasets(cfg: PipelineConfig, step: str, material: dict[str, Any], ctx: StepContext, child: Any) -> None:
    which = DATASETS.get(step)
    src = getattr(cfg.data, which) if which else None
    if which is None or src is None or "data" not in material:
        return
    source = src.npz or src.python or (src.images.dir if src.images else None) or next(iter((src.npy or {}).values()))
    samples = ctx.metrics.get("num_samples") if step == "calibrate" else ctx.metrics.get("validation_samples")
    log_dataset(
        child.client,
        [child.run_id, child.parent_run_id],
        which,
        str(source),
        material["data"],
        int(samples) if samples is not None else None,
    )


def run_tags(cfg: PipelineConfig) -> dict[str, str]:
    """Tags the runs table can filter and group pipelines by."""
    tags = {}
    if "calibrate" in cfg.steps:
        c = cfg.steps["calibrate"]
        tags["int8pipe.method"] = "from_cache" if c.from_cache else c.method
    if "quantize" in cfg.steps:
        tags["int8pipe.target"] = cfg.steps["quantize"].target
    return tags


def describe(cfg: PipelineConfig) -> str:
    """The run description MLflow shows on the run page."""
    source = cfg.model.onnx or cfg.model.mlflow or (cfg.model.pytorch.factory if cfg.model.pytorch else "")
    lines = [f"int8pipe pipeline **{cfg.name}** on `{Path(str(source)).name if cfg.model.onnx else source}`."]
    if "calibrate" in cfg.steps:
        c = cfg.steps["calibrate"]
        lines.append(f"Calibration: {'a TensorRT cache' if c.from_cache else c.method}.")
    if "quantize" in cfg.steps:
        q = cfg.steps["quantize"]
        lines.append(f"Quantized for {q.target}, {q.activation_scheme} activations, per-channel {q.per_channel}.")
    if "validate" in cfg.steps:
        v = cfg.steps["validate"]
        lines.append(f"Gate: {v.metric} may drop by at most {v.max_drop}.")
    return " ".join(lines)


def _run_steps(
    cfg: PipelineConfig,
    tracker: Tracker,
    parent: str,
    tmp: Path,
    model_file: Path | None,
    names: list[str],
    reuse: bool,
    only: str | None,
    summary: Summary,
    handoffs: dict[str, Path],
) -> None:
    for name in names:
        if only is not None and names.index(name) > names.index(only):
            break
        step = get_step(name)()
        step_cfg = cfg.steps[name]
        workdir = tmp / name
        workdir.mkdir()
        ctx = StepContext(
            pipeline=cfg,
            workdir=workdir,
            inputs=dict(handoffs),
            upstream_metrics=dict(summary.metrics),
            upstream_runs=dict(summary.steps),
            tracker=None,  # type: ignore[arg-type]  # set once the run is open
            source_model=model_file,
        )
        reusable = step.can_reuse(ctx, step_cfg)
        material = step.key_material(ctx, step_cfg)
        key = cache_key(name, step.cache_config(step_cfg), handoffs, material)
        prior = None
        if reuse and reusable:
            keys = [key] + [cache_key(name, c, handoffs, material) for c in step.fallback_configs(step_cfg)]
            prior = next((r for r in (tracker.find_reusable(name, k) for k in keys) if r is not None), None)
        if only is not None and name != only and prior is None and reusable:
            fail(
                ConfigError,
                f"--only {only}: step {name!r} has no finished run with this configuration to reuse; "
                f"run the pipeline up to {name!r} first.",
            )
        with tracker.child_run(name, key) as child:
            ctx.tracker = child
            summary.steps[name] = child.run_id
            outage = False
            try:
                if prior is not None:
                    origin = prior.data.tags.get(REUSED_FROM_TAG, prior.info.run_id)
                    logger.info("%s: reusing run %s (same config and inputs)", name, origin)
                    ctx.outputs = tracker.restore(prior, workdir)
                    ctx.log_metrics(dict(prior.data.metrics))
                    child.set_tags({REUSED_TAG: "true", REUSED_FROM_TAG: origin})
                    step.on_reuse(ctx, step_cfg)
                    summary.reused.append(name)
                else:
                    logger.info("%s: running", name)
                    step.run(ctx, step_cfg)
                _log_datasets(cfg, name, material, ctx, child)
            except GateFailed:
                summary.gate = "failed"
                raise
            except Exception as exc:
                outage = is_outage(exc)  # then nothing more can be logged: each call would wait out retries
                raise
            finally:
                summary.metrics.update(ctx.metrics)
                if not outage:
                    tracker.log_outputs(child, workdir, ctx.outputs)
                    starred = {
                        k: v
                        for k, v in ctx.metrics.items()
                        if any(fnmatch.fnmatch(k, p) for p in step.parent_metrics)
                    }
                    tracker.log_parent_metrics(parent, starred)
        handoffs.update(ctx.outputs)
        if "registered_model" in ctx.results:
            summary.registered_model = ctx.results["registered_model"]
