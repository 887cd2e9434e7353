"""promote: register the INT8 model in the MLflow Model Registry; alias it only if the gate passed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Schema, TensorSpec

from pipeline import model as onnx_model
from pipeline.calibration.ranges import Ranges
from pipeline.context import StepContext
from pipeline.errors import ConfigError, fail
from pipeline.log import logger
from steps.base import Step

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig


@dataclass
class PromoteConfig:
    registered_model: str
    alias: str | None = "candidate"
    description: str | None = None


def signature(model: onnx.ModelProto) -> ModelSignature:
    """The tensor signature straight from the graph: dynamic axes become -1."""

    def specs(vis: list) -> Schema:
        out: list[Any] = []
        for vi in vis:
            tt = vi.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
            out.append(TensorSpec(dtype, shape, vi.name))
        return Schema(out)

    return ModelSignature(inputs=specs(onnx_model.graph_inputs(model)), outputs=specs(list(model.graph.output)))


class Promote(Step):
    name = "promote"
    Config = PromoteConfig
    needs_steps = ("export", "calibrate", "quantize")
    reusable = False  # a registry side effect is never replayed from a cache

    @classmethod
    def check(cls, pipeline: PipelineConfig) -> None:
        super().check(pipeline)
        cfg: PromoteConfig = pipeline.steps["promote"]
        if cfg.alias and "validate" not in pipeline.steps:
            fail(
                ConfigError,
                "steps.promote.alias is set only when the accuracy gate passes: "
                "add steps.validate, or set alias: null.",
            )

    def run(self, ctx: StepContext, cfg: PromoteConfig) -> None:
        int8 = onnx_model.load(ctx.input("int8_model"), check=False)
        ranges = Ranges.read(ctx.input("ranges"))
        up = ctx.upstream_metrics
        target = ctx.pipeline.steps["quantize"].target
        tags = {
            "int8pipe.calibration_method": ranges.method,
            "int8pipe.target": target,
            "int8pipe.fp32_sha256": ranges.model_sha256,
            "int8pipe.gate": "passed" if "validate" in ctx.pipeline.steps else "not run",
        }
        tags.update({f"int8pipe.run.{step}": run_id for step, run_id in ctx.upstream_runs.items()})
        for key in ("accuracy_drop", "cpu.int8.latency_p50_ms", "cpu.speedup"):
            if key in up:
                tags[f"int8pipe.{key}"] = f"{up[key]:.6g}"
        drop = f"accuracy drop {up['accuracy_drop']:.4f}" if "accuracy_drop" in up else "not validated"
        description = cfg.description or (
            f"INT8 Q/DQ model of pipeline '{ctx.pipeline.name}' for {target}: calibration {ranges.method} over "
            f"{ranges.num_samples} samples, {drop}."
        )
        linked = {k: v for k, v in up.items() if k.startswith(("fp32_", "int8_")) or k == "accuracy_drop"}
        result = ctx.tracker.promote(
            model=int8,
            signature=signature(int8),
            registered_model=cfg.registered_model,
            alias=cfg.alias,
            tags=tags,
            description=description,
            metrics=linked,
        )
        ctx.results["registered_model"] = result
        logger.info(
            "promote: %s version %s%s",
            result["name"],
            result["version"],
            f" @{result['alias']}" if result["alias"] else "",
        )


STEP = Promote
