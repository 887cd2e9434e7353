"""Runs a validated pipeline: one parent run, one nested run per step, hand-offs and reuse."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import __version__
from pipeline.errors import ConfigError, GateFailed, fail
from pipeline.graph import model as onnx_model
from pipeline.log import logger
from pipeline.mlflow_io.store import blame_workdir, is_outage, redacted
from pipeline.mlflow_io.tracking import (
    DeferredStepTracker,
    StepTracker,
    Tracker,
    download_onnx,
    flatten_params,
    ui_line,
)
from pipeline.settings import config
from pipeline.settings.config import PipelineConfig
from pipeline.settings.schema import to_mapping
from pipeline.sources import data
from pipeline.sources.kinds import kind_of
from pipeline.tag_names import (
    GATE_TAG,
    PIPELINE_TAG,
    REGISTERED_VERSION_TAG,
    REUSED_FROM_TAG,
    REUSED_TAG,
)
from steps import CATALOG, Step
from steps.context import StepContext

if TYPE_CHECKING:
    from mlflow.entities import Run


@dataclass
class Summary:
    """What a pipeline run produced; ``int8pipe run --summary-json`` writes it."""

    run_id: str = ""
    steps: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    registered_model: dict[str, Any] | None = None
    # passed | failed | not run: "passed" only once a validate step finished (run or reused), so a
    # pipeline without one, or one that stopped before it, never claims a gate it did not pass
    gate: str = "not run"
    reused: list[str] = field(default_factory=list)
    trials: list[Any] | None = None  # a sweep's (pipeline.orchestration.sweep.Trial)
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
    root = Path(__file__).resolve().parents[2]  # the checkout: pipeline/orchestration/runner.py
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


def model_reference(cfg: PipelineConfig, tracker: Tracker) -> dict[str, str]:
    """Where the FP32 model comes from, as the INT8 model version records it: the file's absolute path
    (the YAML's own path, often a bare ``model.onnx``, says nothing once read away from the YAML), or
    the registry URI with the version it names right now (an alias may move later)."""
    resolved = cfg.resolved()["model"]
    which = next(k for k in ("onnx", "mlflow", "pytorch") if resolved.get(k) is not None)
    if which == "pytorch":
        return {"pytorch": str(resolved["pytorch"]["factory"])}
    if which == "onnx":
        return {"onnx": str(Path(str(cfg.model.onnx)).resolve())}  # the config resolved it against the YAML
    ref = {which: str(resolved[which])}
    if which == "mlflow":
        version = tracker.registered_version(ref["mlflow"])
        if version is not None:
            ref["registered_model"], ref["version"] = version
    return ref


def source_model(cfg: PipelineConfig, tracker: Tracker, folder: Path, ref: dict[str, str]) -> Path | None:
    """The user's model as a local ONNX file, checked before any run starts (None for PyTorch).

    A registry model is downloaded here once, as the version ``ref`` resolved; an already-quantized
    model is refused by name.
    """
    src = cfg.model
    if src.pytorch is not None:
        return None
    if src.onnx:
        path, label = Path(src.onnx), src.onnx
    else:
        assert src.mlflow is not None
        uri = f"models:/{ref['registered_model']}/{ref['version']}" if "version" in ref else src.mlflow
        path, label = download_onnx(uri, folder / "source", tracker.uri), src.mlflow
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

    With ``only``, the step joins the pipeline run that already holds the earlier steps with the same
    cache keys (reopened, its status restored afterwards); a new pipeline run is opened only when
    there is none, so repeated ``--only`` calls do not stack up parent runs.
    """
    names = list(cfg.steps)
    if only is not None and only not in names:
        fail(ConfigError, f"--only {only}: that step is not in this pipeline (it has {', '.join(names)}).")
    if only is not None:
        names = names[: names.index(only) + 1]
    summary = summary if summary is not None else Summary()
    tracker = Tracker(tracking_uri, cfg.experiment, under=under)
    if under is None:
        tracker.close_abandoned()
    run = _Run(cfg, tracker, reuse, only, summary)
    with tempfile.TemporaryDirectory(prefix="int8pipe-") as tmp:
        run.tmp = Path(tmp)
        run.source = model_reference(cfg, tracker)
        run.model_file = source_model(cfg, tracker, run.tmp, run.source)
        restored: list[_Prepared] = []
        existing = None
        if only is not None and under is None and tracker.outer_run_id is None:
            # Earlier steps are restored before any run is opened: their cache keys decide which
            # pipeline run this step belongs to.
            for name in names[:-1]:
                p = run.prepare(name)
                if p.prior is None:  # a step that is never reused (e.g. a PyTorch export) runs again
                    break
                run.reuse(p, DeferredStepTracker())
                restored.append(p)
            if len(restored) == len(names) - 1:
                existing = _pipeline_run_holding(tracker, cfg, restored)
        label = run_name or pipeline_label(cfg)
        if existing is not None:
            parent_run = tracker.reopen_parent(existing.run_id, cfg.resolved())
        else:
            parent_run = tracker.parent_run(cfg.name, cfg.resolved(), label)
        with parent_run as parent:
            summary.run_id = parent
            note = describe(cfg)
            if existing is not None:
                label = existing.name
                logger.info(
                    "pipeline %r: adding step %s to run %s (tracking %s)", label, only, parent, redacted(tracker.uri)
                )
                note = existing.note(only or "", cfg, tracker.get_run(parent))
            else:
                logger.info("pipeline %r: run %s (tracking %s)", label, parent, redacted(tracker.uri))
            if under is None:  # a sweep's trial: the sweep names its own run
                logger.info("pipeline %r: %s", label, ui_line(tracker.uri, tracker.experiment_id, parent))
            tracker.set_tags(parent, {"mlflow.note.content": note, **run_tags(cfg)})
            try:
                for p in restored:
                    if existing is not None:  # already among the reopened run's children
                        summary.steps[p.name] = existing.children[p.name]
                        summary.metrics.update(p.ctx.metrics)
                        run.finished(p.name)
                    else:
                        run.in_child_run(parent, p)
                for name in names[len(restored) :]:
                    run.in_child_run(parent, run.prepare(name))
            finally:
                if "validate" in summary.steps:
                    tracker.set_tags(parent, {GATE_TAG: summary.gate})
                reg = summary.registered_model
                if reg is not None:  # the run page shows no "Registered models" for a child's version
                    uri = f"models:/{reg['name']}/{reg['version']}"
                    tracker.set_tags(parent, {REGISTERED_VERSION_TAG: uri})
                    tracker.link_version_model(parent, reg["name"], str(reg["version"]))
    return summary


@dataclass
class _Prepared:
    """One step about to run or be reused: its context, cache key and the finished run matching it."""

    name: str
    step: Any
    cfg: Any
    ctx: StepContext
    key: str
    material: dict[str, Any]
    prior: Run | None


@dataclass
class _Existing:
    """A finished pipeline run that already holds the earlier steps of an ``--only`` call."""

    run_id: str
    name: str
    children: dict[str, str]  # step -> its run under this pipeline run

    def note(self, step: str, cfg: PipelineConfig, run: Run) -> str:
        """The run description, with a line saying what ``--only`` added and which config it used."""
        before = run.data.tags.get("mlflow.note.content", describe(cfg))
        params: dict[str, str] = {}
        flatten_params("", cfg.resolved(), params)
        logged = run.data.params
        changed = [
            f"{k}={v} (logged param: {logged[k]})" for k, v in params.items() if logged.get(k, v[:6000]) != v[:6000]
        ]
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        line = f"`--only {step}` added a {step} run on {stamp}" + (f" with {', '.join(changed)}." if changed else ".")
        return f"{before}\n\n{line}"


def _pipeline_run_holding(tracker: Tracker, cfg: PipelineConfig, restored: list[_Prepared]) -> _Existing | None:
    """The pipeline run of this experiment whose child runs hold every restored step with the same
    cache key: the parent of the last restored step's reused run first, then others, newest first."""
    if not restored:
        return None
    last = restored[-1]
    assert last.prior is not None
    candidates = [last.prior.data.tags.get("mlflow.parentRunId")]
    candidates += [r.data.tags.get("mlflow.parentRunId") for r in tracker.finished_runs(last.name, last.key)]
    seen: set[str] = set()
    for run_id in candidates:
        if not run_id or run_id in seen:
            continue
        seen.add(run_id)
        run = tracker.get_run(run_id)
        if (
            run.info.experiment_id != tracker.experiment_id
            or run.info.status == "RUNNING"  # another process is still writing it
            or "mlflow.parentRunId" in run.data.tags  # a sweep's trial belongs to its sweep
            or run.data.tags.get(PIPELINE_TAG) != cfg.name
        ):
            continue
        children = tracker.finished_children(run_id)
        held = {p.name: children.get((p.name, p.key)) for p in restored}
        if all(held.values()):
            return _Existing(run_id, run.info.run_name, {k: v for k, v in held.items() if v})
    return None


class _Run:
    """The state of one pipeline run while its steps are prepared, reused or run."""

    def __init__(self, cfg: PipelineConfig, tracker: Tracker, reuse: bool, only: str | None, summary: Summary):
        self.cfg = cfg
        self.tracker = tracker
        self.reuse_runs = reuse
        self.only = only
        self.summary = summary
        self.handoffs: dict[str, Path] = {}
        self.tmp = Path()
        self.model_file: Path | None = None
        self.source: dict[str, str] = {}

    def prepare(self, name: str) -> _Prepared:
        """The step's context and cache key, and the finished run it may reuse."""
        step = CATALOG[name]()
        step_cfg = self.cfg.steps[name]
        workdir = self.tmp / name
        if workdir.exists():  # prepared once already by an --only call that found nothing to restore
            shutil.rmtree(workdir)
        workdir.mkdir()
        ctx = StepContext(
            pipeline=self.cfg,
            workdir=workdir,
            inputs=dict(self.handoffs),
            upstream_metrics=dict(self.summary.metrics),
            upstream_runs=dict(self.summary.steps),
            tracker=None,  # type: ignore[arg-type]  # set once the run is open
            source_model=self.model_file,
            source=self.source,
        )
        reusable = step.can_reuse(ctx, step_cfg)
        material = step.key_material(ctx, step_cfg)
        key = cache_key(name, step.cache_config(step_cfg), self.handoffs, material)
        prior = None
        if self.reuse_runs and reusable:
            keys = [key] + [cache_key(name, c, self.handoffs, material) for c in step.fallback_configs(step_cfg)]
            prior = next((r for r in (self.tracker.find_reusable(name, k) for k in keys) if r is not None), None)
        if self.only is not None and name != self.only and prior is None and reusable:
            fail(
                ConfigError,
                f"--only {self.only}: step {name!r} has no finished run with this configuration to reuse; "
                f"run the pipeline up to {name!r} first.",
            )
        return _Prepared(name, step, step_cfg, ctx, key, material, prior)

    def reuse(self, p: _Prepared, tracker: StepTracker) -> None:
        """Stand a finished run in for the step: its outputs restored, its metrics and tags repeated."""
        assert p.prior is not None
        p.ctx.tracker = tracker
        origin = p.prior.data.tags.get(REUSED_FROM_TAG, p.prior.info.run_id)
        p.ctx.outputs = self.tracker.restore(p.prior, p.ctx.workdir)
        logger.info("%s: reusing run %s (%s)", p.name, origin, p.step.reuse_note(p.ctx, p.cfg))
        p.ctx.log_metrics(dict(p.prior.data.metrics))
        p.ctx.set_tags({REUSED_TAG: "true", REUSED_FROM_TAG: origin})
        p.step.on_reuse(p.ctx, p.cfg)
        self.summary.reused.append(p.name)
        self.summary.metrics.update(p.ctx.metrics)
        self.handoffs.update(p.ctx.outputs)

    def finished(self, name: str) -> None:
        """A step ended well (ran, or a finished run stands in for it): a validate step's gate passed,
        since only a validate run that passed its gate finishes."""
        if name == "validate":
            self.summary.gate = "passed"

    def in_child_run(self, parent: str, p: _Prepared) -> None:
        """Run, reuse, or (for a step restored before its run existed) record the step in a child run."""
        summary = self.summary
        with self.tracker.child_run(p.name, p.key) as child:
            summary.steps[p.name] = child.run_id
            outage = False
            try:
                if isinstance(p.ctx.tracker, DeferredStepTracker):
                    p.ctx.tracker.replay(child)
                    p.ctx.tracker = child
                elif p.prior is not None:
                    self.reuse(p, child)
                else:
                    p.ctx.tracker = child
                    logger.info("%s: running", p.name)
                    p.step.run(p.ctx, p.cfg)
                _log_datasets(self.cfg, type(p.step), p.material, p.ctx, child)
                self.finished(p.name)
            except GateFailed:
                summary.gate = "failed"
                raise
            except Exception as exc:
                outage = is_outage(exc)  # then nothing more can be logged: each call would wait out retries
                blame_workdir(exc, p.ctx.workdir)
                raise
            finally:
                summary.metrics.update(p.ctx.metrics)
                if not outage:
                    self.tracker.log_outputs(child, p.ctx.workdir, p.ctx.outputs)
                    starred = {
                        k: v
                        for k, v in p.ctx.metrics.items()
                        if any(fnmatch.fnmatch(k, pat) for pat in p.step.parent_metrics)
                    }
                    self.tracker.log_parent_metrics(parent, starred)
        self.handoffs.update(p.ctx.outputs)
        if "registered_model" in p.ctx.results:
            summary.registered_model = p.ctx.results["registered_model"]


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """The pipeline YAML at ``path``, overridden and validated, with the steps int8pipe ships."""
    return config.load(path, overrides, steps=CATALOG)


def _log_datasets(
    cfg: PipelineConfig, step: type[Step], material: dict[str, Any], ctx: StepContext, child: StepTracker
) -> None:
    which = step.dataset
    src = getattr(cfg.data, which) if which else None
    if which is None or src is None or "data" not in material:
        return
    source = kind_of(src).uri(src)
    samples = ctx.metrics.get(step.dataset_samples)
    child.log_dataset(which, str(source), material["data"], int(samples) if samples is not None else None)


def pipeline_label(cfg: PipelineConfig) -> str:
    """What tells this pipeline's runs apart in the runs table, e.g. ``digits (mse, tensorrt)``."""
    parts = [part for name, step_cfg in cfg.steps.items() if (part := CATALOG[name].label(step_cfg))]
    return f"{cfg.name} ({', '.join(parts)})" if parts else cfg.name


def run_tags(cfg: PipelineConfig) -> dict[str, str]:
    """Tags the runs table can filter and group pipelines by."""
    tags: dict[str, str] = {}
    for name, step_cfg in cfg.steps.items():
        tags |= CATALOG[name].run_tags(step_cfg, cfg)
    return tags


def describe(cfg: PipelineConfig) -> str:
    """The run description MLflow shows on the run page."""
    source = cfg.model.onnx or cfg.model.mlflow or (cfg.model.pytorch.factory if cfg.model.pytorch else "")
    lines = [f"int8pipe pipeline **{cfg.name}** on `{Path(str(source)).name if cfg.model.onnx else source}`."]
    lines += [line for name, step_cfg in cfg.steps.items() if (line := CATALOG[name].summary_line(step_cfg))]
    return " ".join(lines)
