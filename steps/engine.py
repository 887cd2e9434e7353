"""engine: the strongly typed TensorRT engine of the INT8 Q/DQ model, and the FP16 engine of the same
FP32 model beside it, where TensorRT and a CUDA GPU exist; elsewhere it says why it skipped and does
nothing else.

What only the built engine can say: which layers really run in INT8 (the inspector's layer JSON, mapped
back to ONNX node names), and whether the INT8 engine is faster than the FP16 engine a user already
has (CUDA-event timing after warm-up, in repeats). TensorRT 11 builds every network strongly typed, so
the float regions of the Q/DQ model run in the type the model writes them in; the layer table shows
that type per layer.
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from pipeline.analysis import engine_layers, latency
from pipeline.calibration.ranges import Ranges
from pipeline.errors import ConfigError, GateFailed, fail
from pipeline.execution import environment, tensorrt_engine
from pipeline.graph import model as onnx_model
from pipeline.log import logger
from pipeline.sources import data
from pipeline.tag_names import ENGINE_DEVICE_TAG, ENGINE_SKIP_REASON_TAG, ENGINE_TAG, ENGINE_TENSORRT_TAG
from pipeline.transforms import quantization
from steps import benchmark
from steps.base import Step
from steps.context import StepContext

if TYPE_CHECKING:
    from pipeline.settings.config import PipelineConfig

SHAPES_KEY = "steps.engine.shapes"
SPEED_KEY = "steps.promote.require_int8_faster_than_fp16"
REPORT = "engine/report.json"
ENGINES = ("int8", "fp16")  # the Q/DQ model as quantized, and the FP32 model with its float computation in FP16


@dataclass
class EngineConfig:
    batch_size: int = 1  # the engines are built for, and timed at, this batch
    iterations: int = 200  # timed inferences per repeat
    warmup: int = 50  # untimed inferences before the first repeat
    repeats: int = 5  # timing repeats; their medians' spread says how steady the figure is
    workspace_mb: int | None = None  # the builder's workspace pool limit (None: TensorRT's default)
    # input -> full shape, batch on its sample axis (replaced by batch_size), as steps.benchmark.shapes
    shapes: dict[str, list[int]] = field(default_factory=dict)


def _report(ctx: StepContext) -> dict[str, Any]:
    path = ctx.inputs.get("engine_report") or ctx.outputs.get("engine_report")
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def _tags(report: dict[str, Any]) -> dict[str, str]:
    """The engine run's tags, from its report (also when the run is reused)."""
    if report.get("status") != "built":
        return {ENGINE_TAG: "skipped", ENGINE_SKIP_REASON_TAG: str(report.get("reason", ""))}
    return {ENGINE_TAG: "built", ENGINE_DEVICE_TAG: report["device"], ENGINE_TENSORRT_TAG: report["tensorrt"]}


def fp16_baseline(fp32: onnx.ModelProto, ranges: Path | None) -> onnx.ModelProto:
    """The FP32 model with its float computation in FP16 (FP32 inputs and outputs): the FP16 engine a
    user would otherwise deploy. Tensors whose calibrated range FP16 cannot hold stay FP32."""
    from pipeline.transforms.float_precision import lower_float_regions

    activation_max = None
    if ranges is not None and ranges.is_file():
        activation_max = {n: max(abs(t.min), abs(t.max)) for n, t in Ranges.read(ranges).tensors.items()}
    return lower_float_regions(fp32, "fp16", activation_max)


class Engine(Step):
    name = "engine"
    Config = EngineConfig
    needs_steps = ("export", "quantize")
    parent_metrics = (
        "engine.int8.latency_p50_ms",
        "engine.fp16.latency_p50_ms",
        "engine.int8_vs_fp16_speedup",
        "engine.int8.layers_int8",
        "engine.int8.layers_fp16",
        "engine.int8.layers_fp32",
    )
    next_artifact = REPORT  # always there: built (with the speedup) or skipped (with why)

    @classmethod
    def check(cls, pipeline: PipelineConfig) -> None:
        super().check(pipeline)
        facts = pipeline.facts
        if facts.target != "tensorrt" or facts.mode != "static":
            fail(
                ConfigError,
                "steps.engine builds TensorRT engines of the Q/DQ model: it needs steps.quantize.target: tensorrt "
                f"and mode: static (this pipeline has target {facts.target}, mode {facts.mode}).",
            )
        cfg: EngineConfig = pipeline.steps["engine"]
        if min(cfg.batch_size, cfg.iterations, cfg.repeats) <= 0 or cfg.warmup < 0:
            fail(ConfigError, "steps.engine: batch_size, iterations and repeats must be positive, warmup >= 0.")

    @classmethod
    def summary_line(cls, cfg: EngineConfig) -> str:
        return "Where TensorRT and a GPU exist, the INT8 engine is built and timed against the FP16 engine."

    def key_material(self, ctx: StepContext, cfg: EngineConfig) -> dict[str, Any]:
        # what decides the result besides the models: the TensorRT, the GPU and CUDA bindings (a
        # skipped run is reused only where they are as absent as they were), and the input data
        key: dict[str, Any] = {
            "gpus": environment.gpus(),
            **{dist: _version(dist) for dist in ("tensorrt", "cuda-python", "torch")},
        }
        src = ctx.pipeline.data.validation or ctx.pipeline.data.calibration
        if src is not None:
            key["data"] = data.source_digest(src, data.search_dirs(ctx.pipeline.base_dir))
        return key

    def on_reuse(self, ctx: StepContext, cfg: EngineConfig) -> None:
        ctx.set_tags(_tags(_report(ctx)))

    def run(self, ctx: StepContext, cfg: EngineConfig) -> None:
        here = tensorrt_engine.availability()
        out = ctx.output("engine_report", REPORT)
        if not here.ok:
            logger.warning("engine: skipped, nothing built or timed: %s", here.reason)
            report: dict[str, Any] = {"status": "skipped", "reason": here.reason}
            out.write_text(json.dumps(report, indent=1))
            ctx.set_tags(_tags(report))
            return
        report = self.build_and_time(ctx, cfg, here)
        out.write_text(json.dumps(report, indent=1))
        ctx.set_tags(_tags(report))

    def build_and_time(self, ctx: StepContext, cfg: EngineConfig, here: tensorrt_engine.Availability) -> dict[str, Any]:
        fp32 = onnx_model.load(ctx.input("fp32_model"), check=False)
        int8 = onnx_model.load(ctx.input("int8_model"), check=False)
        specs = onnx_model.input_specs(fp32)
        sample, source = benchmark.data_sample(ctx.pipeline, specs, cfg.batch_size)
        layout = benchmark.data_layout(ctx.pipeline)
        shapes = benchmark.input_shapes(specs, cfg.shapes, sample, source, layout, key=SHAPES_KEY)
        feeds = benchmark.benchmark_feeds(specs, shapes, cfg.batch_size, sample, layout=layout)
        fp16 = fp16_baseline(fp32, ctx.inputs.get("ranges"))
        # logged with the run, not handed on: a later step (promote) reads only the report, and a reused
        # run need not download two engines to stand in
        folder = ctx.workdir / "engine"
        onnx_model.save_checked(fp16, folder / "model_fp16.onnx")
        quantized = [r["node"] for r in quantization.node_table(fp32, int8) if r["precision"] == "int8"]
        report: dict[str, Any] = {
            "status": "built",
            "tensorrt": here.tensorrt,
            "device": here.device,
            "batch_size": cfg.batch_size,
            "inputs": {k: list(v.shape) for k, v in feeds.items()},
            "timing": {"iterations": cfg.iterations, "warmup": cfg.warmup, "repeats": cfg.repeats},
            "engines": {},
        }
        metrics: dict[str, float] = {}
        rows: list[dict[str, Any]] = []
        stats: dict[str, latency.LatencyStats] = {}
        for which, model in (("int8", int8), ("fp16", fp16)):
            logger.info("engine: building the %s engine (TensorRT %s, %s)", which, here.tensorrt, here.device)
            built = tensorrt_engine.build(
                model.SerializeToString(), {k: tuple(v.shape) for k, v in feeds.items()}, cfg.workspace_mb
            )
            (folder / f"model_{which}.plan").write_bytes(built.plan)
            (folder / f"inspector_{which}.json").write_text(built.inspector_json)
            info = engine_layers.parse(built.inspector_json, {n.name for n in model.graph.node})
            counts = info.counts()
            times = tensorrt_engine.time_engine(built.plan, feeds, cfg.iterations, cfg.warmup, cfg.repeats)
            stats[which] = latency.summarize(times, cfg.batch_size)
            metrics |= stats[which].metrics(f"engine.{which}")
            metrics |= {f"engine.{which}.layers_{k}": float(v) for k, v in counts.items()}
            rows += [{"engine": which, **row} for row in info.table()]
            entry: dict[str, Any] = {
                "build_seconds": built.build_seconds,
                "plan_mb": len(built.plan) / 2**20,
                "schema": info.schema,
                "tensorrt_warnings": built.warnings[:20],  # what the builder warned about, e.g. a layer left float
                "layers": counts,
                "latency": stats[which].to_json(),
            }
            if which == "int8":
                missed = info.not_int8(quantized)
                entry["quantized_nodes_not_int8"] = missed
                metrics["engine.int8.quantized_nodes_not_int8"] = float(len(missed))
                if missed:
                    logger.warning(
                        "engine: %d node(s) the Q/DQ model quantizes run in no INT8 engine layer: %s",
                        len(missed),
                        ", ".join(missed[:8]) + (" ..." if len(missed) > 8 else ""),
                    )
            report["engines"][which] = entry
            logger.info(
                "engine: %s p50 %.3f ms (p99 %.3f, repeats within %.1f%%); layers %s",
                which,
                stats[which].p50_ms,
                stats[which].p99_ms,
                100 * stats[which].repeat_spread,
                {k: v for k, v in counts.items() if v},
            )
        speedup = latency.speedup(stats["fp16"], stats["int8"])
        metrics["engine.int8_vs_fp16_speedup"] = speedup
        report["int8_vs_fp16_speedup"] = speedup
        ctx.log_table(rows, "engine/layers_table.json")
        ctx.log_metrics(metrics)
        return report


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def require_int8_faster(ctx: StepContext) -> None:
    """promote's check for ``require_int8_faster_than_fp16``: refuse (a failed gate) when the engine
    step measured the INT8 engine no faster than the FP16 one; where the step built nothing (no
    TensorRT or no GPU here) the requirement is off for this run, with a warning saying why."""
    report = _report(ctx)
    if report.get("status") != "built":
        why = report.get("reason") or "the engine step left no report"
        logger.warning(
            "promote: %s is off for this run: the engine step measured no engine (%s); promoting on accuracy alone.",
            SPEED_KEY,
            why,
        )
        return
    int8, fp16 = (report["engines"][k]["latency"] for k in ENGINES)
    speedup = report["int8_vs_fp16_speedup"]
    if speedup > 1.0:
        logger.info("promote: the INT8 engine runs %.2fx the FP16 engine's speed (%s)", speedup, SPEED_KEY)
        return
    fail(
        GateFailed,
        f"{SPEED_KEY}: the INT8 engine is not faster than the FP16 engine of the same FP32 model on "
        f"{report['device']} (TensorRT {report['tensorrt']}, batch {report['batch_size']}): p50 {int8['p50_ms']:.3f} "
        f"ms against {fp16['p50_ms']:.3f} ms ({speedup:.2f}x; the repeats' medians spread "
        f"{100 * int8['repeat_spread']:.1f}% and {100 * fp16['repeat_spread']:.1f}%). Nothing was registered. "
        "engine/layers_table.json shows which layers run in INT8 and which float layers sit between them "
        "(reformats, FP32 float regions); deploy the FP16 engine, or set the key false to register anyway.",
    )


STEP = Engine
