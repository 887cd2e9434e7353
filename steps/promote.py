"""promote: register the INT8 model in the MLflow Model Registry; alias it only if the gate passed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx

from pipeline.calibration.ranges import Ranges
from pipeline.errors import ConfigError, fail
from pipeline.execution import runtime
from pipeline.graph import model as onnx_model
from pipeline.log import logger
from pipeline.mlflow_io import names
from pipeline.sources import data
from pipeline.tag_names import CALIBRATION_METHOD_TAG, GATE_TAG, PRECISION_TAG, TARGET_TAG
from steps import version_notes
from steps.base import Step, require_step
from steps.context import StepContext

if TYPE_CHECKING:
    from pipeline.settings.config import PipelineConfig


@dataclass
class PromoteConfig:
    registered_model: str
    alias: str | None = "candidate"
    description: str | None = None
    # better: the alias goes to the best validated version on the newest version's metric and
    # validation data; always: to the newest validated version (pipeline/mlflow_io/registry.choose)
    policy: Literal["better", "always"] = "better"
    # refuse unless the engine step measured the INT8 engine faster than the FP16 one (off, and saying
    # so, where the engine step built nothing: no TensorRT or no GPU)
    require_int8_faster_than_fp16: bool = False


class Promote(Step):
    name = "promote"
    Config = PromoteConfig
    needs_steps = ("export", "quantize")
    reusable = False  # a registry side effect is never replayed from a cache

    @classmethod
    def check(cls, pipeline: PipelineConfig) -> None:
        super().check(pipeline)
        cfg: PromoteConfig = pipeline.steps["promote"]
        # MLflow checks these only when they are written: after every other step has run
        problem = names.registered_model_problem(cfg.registered_model)
        if problem:
            fail(ConfigError, f"steps.promote.registered_model: {problem}.")
        problem = names.alias_problem(cfg.alias) if cfg.alias else None
        if problem:
            fail(ConfigError, f"steps.promote.alias: {problem}.")
        if cfg.alias and "validate" not in pipeline.steps:
            fail(
                ConfigError,
                "steps.promote.alias is set only when the accuracy gate passes: "
                "add steps.validate, or set alias: null.",
            )
        if cfg.require_int8_faster_than_fp16:
            require_step("promote.require_int8_faster_than_fp16", "engine", pipeline)

    def run(self, ctx: StepContext, cfg: PromoteConfig) -> None:
        from pipeline.mlflow_io.registry import Score

        if cfg.require_int8_faster_than_fp16:
            from steps.engine import require_int8_faster

            require_int8_faster(ctx)
        int8 = onnx_model.load(ctx.input("int8_model"), check=False)
        ranges = Ranges.read(ctx.inputs["ranges"]) if "ranges" in ctx.inputs else None
        # mode: dynamic has no calibration: its activation ranges are taken per batch at run time
        method = ranges.method if ranges is not None else "dynamic (run-time ranges)"
        fp32_sha = ranges.model_sha256 if ranges is not None else onnx_model.sha256(ctx.input("fp32_model"))
        up = ctx.upstream_metrics
        target = ctx.facts.target
        gate_metric = ctx.facts.gate_metric
        # what people filter the version list on; the metric and its value come with the score, and
        # the rest is in the description (version_notes), one tag per fact made a screen per version
        tags = {
            GATE_TAG: "passed" if gate_metric is not None else "not run",
            TARGET_TAG: target,
            PRECISION_TAG: ctx.facts.precision,
            CALIBRATION_METHOD_TAG: method,
        }
        int8_sha = onnx_model.sha256(ctx.input("int8_model"))
        score = None
        if gate_metric is not None:
            name = gate_metric.rpartition(":")[2]
            src = ctx.pipeline.data.validation
            assert src is not None
            digest = data.source_digest(src, data.search_dirs(ctx.pipeline.base_dir))
            score = Score(gate_metric, up[f"int8_{name}"], digest)
        drop = f"accuracy drop {up['accuracy_drop']:.4f}" if "accuracy_drop" in up else "not validated"
        if "validation_samples" in up:  # how much the drop can be trusted
            drop += f" on {up['validation_samples']:.0f} validation samples"
        calibration = (
            f"calibration {ranges.method} over {ranges.num_samples} samples"
            if ranges is not None
            else "ONNX Runtime dynamic quantization (activation ranges per batch at run time)"
        )
        description = cfg.description or (
            f"{ctx.facts.precision.upper()} model of pipeline '{ctx.pipeline.name}' for {target} "
            f"({ctx.facts.float_precision.upper()} float layers): {calibration}, {drop}."
        )
        description += "\n\n" + parent_line(fp32_source(ctx), fp32_sha)
        description += "\n\n" + version_notes.details(ctx, int8_sha, score.data_digest if score else None)
        linked = {k: v for k, v in up.items() if k.startswith(("fp32_", "int8_")) or k == "accuracy_drop"}
        result = ctx.tracker.promote(
            model=int8,
            input_example=input_example(ctx, int8) or None,
            registered_model=cfg.registered_model,
            alias=cfg.alias,
            policy=cfg.policy,
            score=score,
            int8_sha256=int8_sha,
            tags=tags,
            description=description,
            metrics=linked,
            evidence=evidence(ctx.upstream_runs, skipped=_skipped_evidence(ctx)),
            # ORT's int8 kernels are CPU kernels; a TensorRT model is served by a GPU provider
            providers=serving_providers(ctx.facts.cpu_kernels),
        )
        ctx.results["registered_model"] = result
        where = (
            f" @{result['alias']}" if result["alias"] else (f"; @{cfg.alias} {result['decision']}" if cfg.alias else "")
        )
        logger.info("promote: %s version %s%s", result["name"], result["version"], where)


# what the version page links to, and the logged model carries under evidence/:
# name -> (step, artifact path in that step's run, file name under evidence/)
EVIDENCE = {
    "calibration_cache": ("calibrate", "calibration/calibration.cache", "calibration.cache"),
    "ranges": ("calibrate", "calibration/ranges.json", "ranges.json"),
    "layer_errors": ("validate", "validation/layer_errors_table.json", "layer_errors.json"),
    "gate_report": ("validate", "validation/report.json", "gate_report.json"),
}


def evidence(runs: dict[str, str], skipped: tuple[str, ...] = ()) -> list[tuple[str, str, str, str]]:
    """(name, run id, artifact path, file name) of each piece of evidence this pipeline produced."""
    return [
        (name, runs[step], path, file)
        for name, (step, path, file) in EVIDENCE.items()
        if step in runs and name not in skipped
    ]


def _skipped_evidence(ctx: StepContext) -> tuple[str, ...]:
    """The evidence validate chose not to compute (no per-layer table on a passed gate)."""
    path = ctx.inputs.get("validation_report")
    report = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    return ("layer_errors",) if report.get("layer_report") == "skipped" else ()


def serving_providers(cpu_target: bool) -> list[str]:
    """The execution providers MLflow's pyfunc opens the version with: the CPU for target onnxruntime;
    for tensorrt, CUDA first where this ONNX Runtime has it (a GPU build), else the CPU only, so that
    loading it where it was registered does not warn about a provider that is not there."""
    if cpu_target:
        return ["CPUExecutionProvider"]
    available = runtime.ort().get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def fp32_source(ctx: StepContext) -> dict[str, str]:
    """The FP32 parent: its YAML path or registry URI, and the version that URI named."""
    src = ctx.source
    out = {"source": next((src[k] for k in ("onnx", "mlflow", "pytorch") if k in src), "")}
    if "version" in src:
        out["version"] = f"models:/{src['registered_model']}/{src['version']}"
    return out


def parent_line(source: dict[str, str], sha256: str) -> str:
    where = f"`{source['source']}`" + (f" ({source['version']})" if "version" in source else "")
    return f"FP32 parent: {where}, SHA-256 of the exported FP32 model `{sha256}`."


def input_example(ctx: StepContext, model: onnx.ModelProto) -> dict[str, Any]:
    """One real sample per model input: from validate's samples, else the first data batch."""
    names = [vi.name for vi in onnx_model.graph_inputs(model)]
    samples = ctx.inputs.get("validation_samples")
    if samples is not None and samples.is_file():
        with np.load(samples, allow_pickle=False) as z:
            if all(f"input.{n}" in z.files for n in names):
                return {n: z[f"input.{n}"][:1] for n in names}
    src = ctx.pipeline.data.validation or ctx.pipeline.data.calibration
    if src is None:
        return {}
    specs = onnx_model.input_specs(model)
    batch = next(data.batches(src, 1, specs, data.search_dirs(ctx.pipeline.base_dir), "input example"))
    return {n: batch[n][:1] for n in names}


STEP = Promote
