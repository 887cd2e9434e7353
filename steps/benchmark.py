"""benchmark: FP32 and INT8 latency per execution provider and batch size, on this machine.

The INT8 model runs with ORT's full optimisations (its real int8 kernels): what a deployment on
this provider would see. A provider that is not really available is reported as such and gets no
numbers; a silent CPU fallback never passes for a GPU result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pipeline.analysis import plots
from pipeline.errors import BackendUnavailable, ConfigError, fail
from pipeline.execution import cpu_kernels, environment, runtime
from pipeline.graph import model as onnx_model
from pipeline.graph.layout import Layout
from pipeline.log import logger
from pipeline.sources import data
from steps.base import Step
from steps.context import StepContext

if TYPE_CHECKING:
    from pipeline.settings.config import PipelineConfig


@dataclass
class BenchmarkConfig:
    providers: list[Literal["cpu", "cuda", "tensorrt"]] = field(default_factory=lambda: ["cpu"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    iterations: int = 100
    warmup: int = 10
    threads: int | None = None
    # input -> full shape, batch on its sample axis (replaced by each batch size); needed for an input
    # with symbolic dims besides the batch when there is no data to take a real shape from
    shapes: dict[str, list[int]] = field(default_factory=dict)


SHAPES_KEY = "steps.benchmark.shapes"


def placement_note(provider: str, target: str | None, speedup: float) -> str | None:
    """Why an INT8 model built for TensorRT runs slower than FP32 on ONNX Runtime's CPU provider, or None.

    ORT's CPU int8 kernels (QLinearConv, QLinearMatMul) replace a DequantizeLinear -> op ->
    QuantizeLinear group; TensorRT's placement quantizes a layer's inputs and leaves its output float,
    so on ORT CPU every layer dequantizes and runs in float, plus the Q/DQ nodes themselves.
    """
    if provider != "cpu" or target != "tensorrt" or speedup >= 1.0:
        return None
    return (
        f"INT8 runs at {speedup:.2f}x FP32's speed on ONNX Runtime's CPU provider: target: tensorrt places "
        "Q/DQ on layer inputs only (TensorRT's placement), and ORT's CPU int8 kernels need the layer's "
        "output quantized too, so it dequantizes and computes in float (and the FP16 float regions TensorRT "
        "runs natively are converted on an x86 CPU). For CPU serving use steps.quantize.target: onnxruntime "
        "(or mode: dynamic); TensorRT itself runs this model in INT8."
    )


def data_sample(pipeline: PipelineConfig, specs: data.Specs, size: int) -> tuple[data.Batch | None, str | None]:
    """The model inputs of one real batch (at most ``size`` samples) of data.validation, else
    data.calibration, and which source it came from; (None, None) without data."""
    for which in ("validation", "calibration"):
        src = getattr(pipeline.data, which)
        if src is None:
            continue
        batches = data.batches(src, size, specs, data.search_dirs(pipeline.base_dir), f"data.{which}")
        try:
            batch = next(batches)
        finally:
            close = getattr(batches, "close", None)  # a generator: let the source release its files now
            if close is not None:
                close()
        return {k: v for k, v in batch.items() if k != data.LABELS}, f"data.{which}"
    return None, None


def data_layout(pipeline: PipelineConfig) -> Layout:
    """The batch axes and constants of the source :func:`data_sample` reads (default: axis 0)."""
    return Layout.of(pipeline.data.validation or pipeline.data.calibration)


def _without(shape: Any, axis: int | None) -> list[Any]:
    """``shape`` with the sample axis left out (a constant's shape whole)."""
    return [d for i, d in enumerate(shape) if i != axis]


def _with_batch(rest: list[Any], axis: int | None, batch: Any) -> list[Any]:
    """One sample's shape with ``batch`` put back on the sample axis (a constant's unchanged)."""
    return list(rest) if axis is None else [*rest[:axis], batch, *rest[axis:]]


def input_shapes(
    specs: data.Specs,
    shapes: dict[str, list[int]],
    sample: data.Batch | None,
    source: str | None,
    layout: Layout | None = None,
    key: str = SHAPES_KEY,
) -> dict[str, tuple[list[int], str]]:
    """Per input: the shape of one sample (batch dim left out; a constant's whole shape) and where it
    comes from: ``shapes`` (the YAML's ``key``, steps.benchmark.shapes), the real ``sample``, or the
    model when every other dim is fixed. The batch dim is the data source's declared sample axis
    (``layout``)."""
    layout = layout or Layout()
    unknown = [k for k in shapes if k not in specs]
    if unknown:
        fail(
            ConfigError,
            f"{key}.{unknown[0]}: the model has no input {unknown[0]!r}; its inputs are {list(specs)}.",
        )
    out: dict[str, tuple[list[int], str]] = {}
    for name, (dims, _) in specs.items():
        axis = layout.axis(name)
        where = "batch first" if axis == 0 else ("a constant" if axis is None else f"batch on axis {axis}")
        if name in shapes:
            shape = shapes[name]
            if (
                len(shape) != len(dims)
                or any(d <= 0 for d in shape)
                or any(
                    isinstance(d, int) and d > 0 and d != s for d, s in zip(_without(dims, axis), _without(shape, axis))
                )
            ):
                fail(
                    ConfigError,
                    f"{key}.{name}: {shape} does not fit the model's input {name!r} of shape {dims}; give "
                    f"{len(dims)} positive dims ({where}), equal to the model's where it fixes them.",
                )
            out[name] = (_without(shape, axis), key)
        elif sample is not None and source is not None:
            out[name] = (_without(sample[name].shape, axis), source)
        elif all(isinstance(d, int) and d > 0 for i, d in enumerate(dims) if i != axis):
            out[name] = (_without(dims, axis), "model")
        else:
            fail(
                ConfigError,
                f"{key.rpartition('.')[0]}: input {name!r} has shape {dims}, whose dims besides the batch are not all "
                "fixed, and there is no data.validation or data.calibration to take a real shape from; set "
                f"{key}: {{{name}: [1, ...]}} (the full shape, batch first).",
            )
    return out


def benchmark_feeds(
    specs: data.Specs,
    shapes: dict[str, tuple[list[int], str]],
    batch: int,
    sample: data.Batch | None = None,
    seed: int = 0,
    layout: Layout | None = None,
) -> dict[str, np.ndarray]:
    """Inputs of ``batch`` samples on each input's sample axis: the real ``sample`` repeated to the
    batch size where its shape is the one benchmarked, random values of the shape otherwise. A
    constant keeps its shape (and its real value, when the data holds it)."""
    layout = layout or Layout()
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (_, dtype) in specs.items():
        rest, axis = shapes[name][0], layout.axis(name)
        real = sample.get(name) if sample is not None else None
        if real is not None and _without(real.shape, axis) == rest:
            feeds[name] = real if axis is None else layout.repeat({name: real}, batch)[name]
        else:
            feeds[name] = np.asarray(rng.standard_normal(_with_batch(rest, axis, batch))).astype(dtype)
    return feeds


class Benchmark(Step):
    name = "benchmark"
    Config = BenchmarkConfig
    needs_steps = ("export", "quantize")
    # the first batch size's figures; the per-batch-size ones (.bs8.) stay on the step run
    parent_metrics = tuple(
        f"{p}.{m}"
        for p in ("cpu", "cuda", "tensorrt")
        for m in ("fp32.latency_p50_ms", "int8.latency_p50_ms", "speedup")
    )
    next_artifact = "benchmark/report.json"

    @classmethod
    def check(cls, pipeline: PipelineConfig) -> None:
        """The counts, at config time: a benchmark that cannot time anything must not wait for the
        steps before it to run (minutes on a real model) to say so."""
        super().check(pipeline)
        cfg: BenchmarkConfig = pipeline.steps["benchmark"]
        if not cfg.batch_sizes or min(cfg.batch_sizes) <= 0:
            fail(ConfigError, f"steps.benchmark.batch_sizes: expected a list of positive sizes, got {cfg.batch_sizes}.")
        if cfg.iterations < 1:
            fail(
                ConfigError, f"steps.benchmark.iterations: expected >= 1 (timed runs per model), got {cfg.iterations}."
            )
        if cfg.warmup < 0:
            fail(ConfigError, f"steps.benchmark.warmup: expected >= 0 (untimed runs first), got {cfg.warmup}.")
        if cfg.threads is not None and cfg.threads < 1:
            fail(
                ConfigError,
                f"steps.benchmark.threads: expected >= 1 or null (ONNX Runtime's choice), got {cfg.threads}.",
            )

    def key_material(self, ctx: StepContext, cfg: Any) -> dict[str, Any]:
        env = environment.fingerprint()
        key = {"cpu": env["cpu"]["model"], "ort": env["onnxruntime"], "gpus": env["gpus"]}
        src = ctx.pipeline.data.validation or ctx.pipeline.data.calibration
        if src is not None:  # the input shapes (and values) come from it
            key["data"] = data.source_digest(src, data.search_dirs(ctx.pipeline.base_dir))
        return key

    def run(self, ctx: StepContext, cfg: BenchmarkConfig) -> None:
        env = environment.fingerprint()
        ctx.output("environment", "benchmark/environment.json").write_text(json.dumps(env, indent=1))
        ctx.set_tags(cpu_kernels.tags(cpu_kernels.this_machine()))  # the int8 kernels the latencies were taken on
        models = {"fp32": ctx.input("fp32_model"), "int8": ctx.input("int8_model")}
        facts = ctx.facts
        target = None if "quantize" not in ctx.pipeline.steps or facts.mode == "dynamic" else facts.target
        specs = onnx_model.input_specs(onnx_model.load(models["fp32"], check=False))
        sample, source = data_sample(ctx.pipeline, specs, max(cfg.batch_sizes))
        layout = data_layout(ctx.pipeline)
        shapes = input_shapes(specs, cfg.shapes, sample, source, layout)
        report: dict[str, Any] = {
            "iterations": cfg.iterations,
            "warmup": cfg.warmup,
            "inputs": {
                k: {"shape": _with_batch(rest, layout.axis(k), "batch"), "from": how}
                for k, (rest, how) in shapes.items()
            },
            "providers": {},
        }
        metrics: dict[str, float] = {}
        for provider in cfg.providers:
            try:
                sessions = {p: runtime.session(path, provider, threads=cfg.threads) for p, path in models.items()}
            except BackendUnavailable as exc:
                logger.warning("benchmark: %s skipped: %s", provider, exc)
                report["providers"][provider] = {"status": "unavailable", "reason": str(exc)}
                continue
            entry: dict[str, Any] = {
                "status": "ok",
                "session_providers": sessions["fp32"].get_providers(),
                "results": [],
            }
            for i, bs in enumerate(cfg.batch_sizes):
                feeds = benchmark_feeds(specs, shapes, bs, sample, layout=layout)
                p50 = {}
                for precision, sess in sessions.items():
                    lat = runtime.time_session(sess, feeds, cfg.iterations, cfg.warmup)
                    row: dict[str, Any] = {
                        "precision": precision,
                        "batch_size": bs,
                        "shapes": {k: list(v.shape) for k, v in feeds.items()},
                        "latency_p50_ms": float(np.median(lat)),
                        "latency_p99_ms": float(np.percentile(lat, 99)),
                        "latency_mean_ms": float(lat.mean()),
                    }
                    row["throughput"] = bs * 1000.0 / row["latency_p50_ms"]
                    entry["results"].append(row)
                    p50[precision] = row["latency_p50_ms"]
                    logger.info("benchmark: %s %s bs=%d p50 %.3f ms", provider, precision, bs, row["latency_p50_ms"])
                    for key in ("latency_p50_ms", "latency_p99_ms", "throughput"):
                        metrics[f"{provider}.{precision}.bs{bs}.{key}"] = row[key]
                        if i == 0:  # the first batch size is the headline number
                            metrics[f"{provider}.{precision}.{key}"] = row[key]
                metrics[f"{provider}.bs{bs}.speedup"] = p50["fp32"] / p50["int8"]
                if i == 0:
                    metrics[f"{provider}.speedup"] = p50["fp32"] / p50["int8"]
                    note = placement_note(provider, target, metrics[f"{provider}.speedup"])
                    if note is not None:
                        logger.warning("benchmark: %s", note)
                        entry["note"] = note
            report["providers"][provider] = entry
        ctx.output("benchmark_report", "benchmark/report.json").write_text(json.dumps(report, indent=1))
        labels = [k.removesuffix(".latency_p50_ms") for k in metrics if ".bs" in k and k.endswith("latency_p50_ms")]
        plots.bars(
            labels,
            [metrics[f"{k}.latency_p50_ms"] for k in labels],
            ctx.workdir / "benchmark" / "latency.png",
            "median latency",
            "ms",
        )
        ctx.log_metrics(metrics)


STEP = Benchmark
