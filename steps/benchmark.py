"""benchmark: FP32 and INT8 latency per execution provider and batch size, on this machine.

The INT8 model runs with ORT's full optimisations (its real int8 kernels): what a deployment on
this provider would see. A provider that is not really available is reported as such and gets no
numbers; a silent CPU fallback never passes for a GPU result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from pipeline import environment, plots, runtime
from pipeline import model as onnx_model
from pipeline.context import StepContext
from pipeline.errors import BackendUnavailable, ConfigError, fail
from pipeline.log import logger
from steps.base import Step


@dataclass
class BenchmarkConfig:
    providers: list[Literal["cpu", "cuda", "tensorrt"]] = field(default_factory=lambda: ["cpu"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    iterations: int = 100
    warmup: int = 10
    threads: int | None = None


def random_feeds(specs: dict[str, Any], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (dims, dtype) in specs.items():
        shape = [batch] + [d if isinstance(d, int) and d > 0 else 1 for d in dims[1:]]
        feeds[name] = rng.standard_normal(shape).astype(dtype)
    return feeds


class Benchmark(Step):
    name = "benchmark"
    Config = BenchmarkConfig
    needs_steps = ("export", "quantize")
    parent_metrics = ("*.latency_p50_ms", "*.speedup")

    def key_material(self, ctx: StepContext, cfg: Any) -> dict[str, Any]:
        env = environment.fingerprint()
        return {"cpu": env["cpu"]["model"], "ort": env["onnxruntime"], "gpus": env["gpus"]}

    def run(self, ctx: StepContext, cfg: BenchmarkConfig) -> None:
        if not cfg.batch_sizes or min(cfg.batch_sizes) <= 0 or cfg.iterations <= 0:
            fail(ConfigError, "steps.benchmark: batch_sizes must be positive and iterations > 0.")
        env = environment.fingerprint()
        ctx.output("environment", "benchmark/environment.json").write_text(json.dumps(env, indent=1))
        models = {"fp32": ctx.input("fp32_model"), "int8": ctx.input("int8_model")}
        specs = onnx_model.input_specs(onnx_model.load(models["fp32"], check=False))
        report: dict[str, Any] = {"iterations": cfg.iterations, "warmup": cfg.warmup, "providers": {}}
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
                feeds = random_feeds(specs, bs)
                p50 = {}
                for precision, sess in sessions.items():
                    lat = runtime.time_session(sess, feeds, cfg.iterations, cfg.warmup)
                    row: dict[str, Any] = {
                        "precision": precision,
                        "batch_size": bs,
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
