"""validate: FP32 vs INT8 on the validation set, the accuracy gate, and where the error comes from.

For ``target: tensorrt`` the INT8 model runs with graph optimisations off: ORT then executes each
QuantizeLinear/DequantizeLinear in float, which is the arithmetic TensorRT performs. ORT's fused
int8 kernels on x86 without VNNI saturate and would charge TensorRT for a CPU artefact.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline import data, evaluation, plots, runtime
from pipeline import model as onnx_model
from pipeline.calibration.collect import expose
from pipeline.context import StepContext
from pipeline.errors import ConfigError, DataError, GateFailed, fail
from pipeline.log import logger, progress
from pipeline.quantization import dequantized_names
from steps.base import Step

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig


LAYER_CHUNK = 2  # samples per call while comparing every tensor


@dataclass
class ValidateConfig:
    metric: str = "top1"  # top1 | top5 | agreement | cosine | "pkg.mod:fn"
    max_drop: float = 0.01
    batch_size: int = 64
    output: str | None = None  # model output to score; default: the first
    layer_samples: int = 64  # samples used for the per-layer error table


class Validate(Step):
    name = "validate"
    Config = ValidateConfig
    needs_steps = ("export", "calibrate", "quantize")
    needs_data = ("validation",)
    parent_metrics = ("fp32_*", "int8_*", "accuracy_drop")

    @classmethod
    def check(cls, pipeline: PipelineConfig) -> None:
        super().check(pipeline)
        cfg: ValidateConfig = pipeline.steps["validate"]
        if cfg.metric not in evaluation.BUILTIN_METRICS and ":" not in cfg.metric:
            fail(
                ConfigError,
                f"steps.validate.metric: {cfg.metric!r} is neither one of "
                f"{', '.join(evaluation.BUILTIN_METRICS)} nor 'pkg.mod:function'.",
            )
        if cfg.max_drop < 0:
            fail(ConfigError, f"steps.validate.max_drop: expected >= 0, got {cfg.max_drop}.")

    def key_material(self, ctx: StepContext, cfg: Any) -> dict[str, Any]:
        src = ctx.pipeline.data.validation
        assert src is not None
        target = ctx.pipeline.steps["quantize"].target
        return {"data": data.source_digest(src, data.search_dirs(ctx.pipeline.base_dir)), "target": target}

    def _batches(self, ctx: StepContext, cfg: ValidateConfig, specs: data.Specs) -> Iterator[data.Batch]:
        src = ctx.pipeline.data.validation
        assert src is not None
        return data.batches(src, cfg.batch_size, specs, data.search_dirs(ctx.pipeline.base_dir), "data.validation")

    def run(self, ctx: StepContext, cfg: ValidateConfig) -> None:
        fp32_path, int8_path = ctx.input("fp32_model"), ctx.input("int8_model")
        exact = ctx.pipeline.steps["quantize"].target == "tensorrt"
        fp32_model = onnx_model.load(fp32_path, check=False)
        specs = onnx_model.input_specs(fp32_model)
        fp32 = runtime.session(fp32_path)
        int8 = runtime.session(int8_path, optimize=not exact)
        output = cfg.output or fp32.get_outputs()[0].name
        if output not in [o.name for o in fp32.get_outputs()]:
            fail(ConfigError, f"steps.validate.output: the model has no output {output!r}.")
        cmp = evaluation.Comparison()
        for batch in progress(self._batches(ctx, cfg, specs), "validation batches"):
            feeds = {k: v for k, v in batch.items() if k != data.LABELS}
            (a,) = fp32.run([output], feeds)
            (b,) = int8.run([output], feeds)
            cmp.add(a, b, batch.get(data.LABELS))
        ref, out, labels = cmp.arrays()
        metric = cfg.metric
        if metric in evaluation.BUILTIN_METRICS:
            if metric in ("top1", "top5") and labels is None:
                fail(
                    DataError,
                    f"steps.validate.metric {metric} needs labels: add a 'labels' array to data.validation, "
                    "or use metric: agreement.",
                )
            fp32_score = evaluation.score(metric, ref, labels, ref)
            int8_score = evaluation.score(metric, out, labels, ref)
        else:
            fn = data.import_object(metric, data.search_dirs(ctx.pipeline.base_dir), "steps.validate.metric")
            fp32_score, int8_score = evaluation.custom_score(fn, ref, labels), evaluation.custom_score(fn, out, labels)
            metric = metric.rpartition(":")[2]
        drop = fp32_score - int8_score
        cosines = evaluation.cosine_rows(ref, out)
        agreement = evaluation.score("agreement", out, None, ref)
        layers = self._layer_errors(ctx, cfg, fp32_model, fp32_path, int8_path, exact, specs)
        sqnr_min = min((r["sqnr_db"] for r in layers), default=math.inf)
        metrics = {
            f"fp32_{metric}": fp32_score,
            f"int8_{metric}": int8_score,
            "accuracy_drop": drop,
            "top1_agreement": agreement,
            "cosine_min": float(cosines.min()),
            "cosine_mean": float(cosines.mean()),
            "sqnr_db_min": sqnr_min if math.isfinite(sqnr_min) else 999.0,
        }
        passed = drop <= cfg.max_drop
        report = {
            "metric": metric,
            "max_drop": cfg.max_drop,
            "passed": passed,
            "samples": len(ref),
            "int8_execution": "exact Q/DQ in float (graph optimisations off)" if exact else "onnxruntime optimised",
            "metrics": metrics,
            "layers": layers,
        }
        ctx.output("validation_report", "validation/report.json").write_text(json.dumps(report, indent=1))
        ctx.log_metrics(metrics)
        logger.info(
            "validate: fp32 %s %.4f, int8 %.4f, drop %.4f (max %.4f)",
            metric,
            fp32_score,
            int8_score,
            drop,
            cfg.max_drop,
        )
        if not passed:
            fail(
                GateFailed,
                f"accuracy gate failed: {metric} dropped by {drop:.4f} (FP32 {fp32_score:.4f} -> INT8 "
                f"{int8_score:.4f}), more than steps.validate.max_drop={cfg.max_drop}. Try another "
                "steps.calibrate.method, or keep the layers with the lowest SQNR in validation/layer_errors_table.json "
                "in FP32 with steps.quantize.exclude.",
            )

    def _layer_errors(
        self,
        ctx: StepContext,
        cfg: ValidateConfig,
        fp32_model: Any,
        fp32_path: Any,
        int8_path: Any,
        exact: bool,
        specs: data.Specs,
    ) -> list[dict[str, Any]]:
        int8_model = onnx_model.load(int8_path, check=False)
        int8_tensors = {o for n in int8_model.graph.node for o in n.output}
        tensors = [t for t in onnx_model.activation_tensors(fp32_model) if t in int8_tensors]
        seen_as = dequantized_names(int8_model)
        producer = onnx_model.producers(fp32_model)
        a = runtime.session(expose(fp32_model, tensors))
        int8_names = [seen_as.get(t, t) for t in tensors]
        b = runtime.session(expose(int8_model, int8_names), optimize=not exact)
        acc = {t: evaluation.ErrorAccumulator() for t in tensors}
        seen = 0
        # tiny chunks: every tensor of both models is alive at once here
        for feeds in data.rechunk(self._batches(ctx, cfg, specs), LAYER_CHUNK):
            if seen >= cfg.layer_samples:
                break
            feeds = {k: v[: cfg.layer_samples - seen] for k, v in feeds.items()}
            seen += len(next(iter(feeds.values())))
            for t, x, y in zip(tensors, a.run(tensors, feeds), b.run(int8_names, feeds)):
                acc[t].update(x, y)
        rows: list[dict[str, Any]] = [
            {
                "tensor": t,
                "producer": producer.get(t, ""),
                "int8_value": "dequantized" if t in seen_as else "float",
                "sqnr_db": acc[t].sqnr_db,
                "cosine": acc[t].cosine,
                "max_abs_err": acc[t].max_abs_err,
            }
            for t in tensors
        ]
        finite = [dict(r, sqnr_db=min(r["sqnr_db"], 999.0)) for r in rows]
        if finite:
            ctx.log_table(finite, "validation/layer_errors_table.json")
            plots.bars(
                [r["tensor"] for r in finite],
                [r["sqnr_db"] for r in finite],
                ctx.workdir / "validation" / "layer_sqnr.png",
                "FP32 vs INT8 per tensor (higher is better)",
                "SQNR (dB)",
            )
        return finite


STEP = Validate
