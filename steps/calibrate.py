"""calibrate: per-tensor symmetric ranges from calibration data (or a legacy TensorRT cache).

Outputs, all derived from ``ranges.json``: TensorRT's ``calibration.cache``, ONNX Runtime's TensorRT
EP table ``calibration.flatbuffers``, ``dynamic_ranges.json`` for ``setDynamicRange`` users, an MLflow
table of every tensor and histogram plots of the tensors clipped most.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipeline.analysis import plots
from pipeline.calibration import flatbuffers_table, trt_cache
from pipeline.calibration.calibrator import Calibration, calibrate, load_histograms, rethreshold, save_histograms
from pipeline.calibration.collect import DEFAULT_MEMORY_MB
from pipeline.calibration.methods import METHODS
from pipeline.calibration.ranges import Ranges, TensorRange
from pipeline.errors import CalibrationError, ConfigError, fail
from pipeline.graph import model as onnx_model
from pipeline.graph.layout import Layout
from pipeline.log import logger
from pipeline.settings.schema import to_mapping
from pipeline.sources import data
from pipeline.tag_names import CALIBRATION_METHOD_TAG, METHOD_TAG, THRESHOLDS_FROM_TAG
from pipeline.transforms.quantization import quantized_activations
from steps.base import Step
from steps.context import StepContext

if TYPE_CHECKING:
    from pipeline.settings.config import PipelineConfig

DEFAULT_TRT_VERSION = "10.14.1"
CLIPPED_RATIO = 0.9  # a tensor counts as clipped when amax < 0.9 * max |x|


def _histograms(method: str) -> bool:
    """Whether ``method`` reads histograms (``auto``: a sweep over methods that mostly do)."""
    return method not in METHODS or METHODS[method].needs_histograms


@dataclass
class CalibrateRay:
    """``steps.calibrate.ray``: the cluster a sharded calibration (``workers > 1``) runs on."""

    address: str | None = None  # host:port of `ray start --head`; default $RAY_ADDRESS (set inside a Ray sweep)
    num_cpus: float = 1.0  # CPUs each calibration worker reserves


@dataclass
class CalibrateConfig:
    # mse by evidence (README, "Choosing the calibration method"); auto: every method from one calibration,
    # the best by the validate metric (a sweep over the method)
    method: Literal["minmax", "entropy", "percentile", "mse", "auto"] = "mse"
    batch_size: int = 32
    num_bins: int = 2048
    percentile: float = 99.99
    from_cache: str | None = None
    trt_version: str = DEFAULT_TRT_VERSION
    plots: int = 6
    minmax_inputs: bool = True  # graph inputs keep max |x| (see calibrator.calibrate)
    passes: Literal[1, 2] = 2  # 2: exact histograms; 1: one streaming pass, for read-once sources
    tensors: Literal["quantized", "all"] = "quantized"  # which tensors get the histogram method
    # activation memory while calibrating: the samples per ONNX Runtime call are sized to stay within it
    memory_mb: int = DEFAULT_MEMORY_MB
    # > 1: that many Ray workers each calibrate a shard of the data (pipeline/calibration/sharded.py);
    # the ranges are identical to one process's
    workers: int = 1
    ray: CalibrateRay = field(default_factory=CalibrateRay)


def _from_cache(path: Path, model_path: Path, trt_version: str) -> Calibration:
    start = time.perf_counter()
    cache = trt_cache.read(path)
    warning = trt_cache.portability_warning(cache.version, trt_version)
    if warning:
        logger.warning("calibrate: %s", warning)
    model = onnx_model.load(model_path, check=False)
    sha = onnx_model.sha256(model_path)
    sidecar = path.parent / "ranges.json"
    if sidecar.is_file():  # written by int8pipe: it knows which model the cache belongs to
        Ranges.read(sidecar).check_model(sha, f"steps.calibrate.from_cache ({path})")
    tensors = onnx_model.activation_tensors(model)
    producer = onnx_model.producers(model)
    amax = {k: v for k, v in cache.amax.items() if v is not None}
    covered = [t for t in tensors if t in amax]
    if len(covered) < len([a for a in amax if a]) / 2:
        fail(
            CalibrationError,
            f"steps.calibrate.from_cache: only {len(covered)} of the cache's {len(amax)} tensors exist in this "
            "model; the cache was made for a different model or export.",
        )
    missing = [t for t in tensors if t not in amax]
    if missing:
        logger.warning("calibrate: %d tensors have no range in the cache and stay FP32: %s", len(missing), missing[:8])
    ranges = Ranges(
        method="from_cache",
        params={"cache": str(path), "cache_version": cache.version, "algorithm": cache.algorithm, "missing": missing},
        model_sha256=sha,
        data_digest=onnx_model.sha256(path),
        num_samples=0,
        environment={},
    )
    for t in covered:
        ranges.tensors[t] = TensorRange(-amax[t], amax[t], amax[t], amax[t], 0.0, producer.get(t, ""))
    return Calibration(ranges, {}, time.perf_counter() - start)


class Calibrate(Step):
    name = "calibrate"
    Config = CalibrateConfig
    needs_steps = ("export",)
    parent_metrics = ("calibration_seconds", "tensors_clipped")
    dataset, dataset_samples = "calibration", "num_samples"
    next_artifact = "calibration/calibration.cache"

    @classmethod
    def label(cls, cfg: CalibrateConfig) -> str:
        method = "from_cache" if cfg.from_cache else cfg.method
        return f"{method} {cfg.percentile}" if method == "percentile" else method

    @classmethod
    def run_tags(cls, cfg: CalibrateConfig, pipeline: PipelineConfig) -> dict[str, str]:
        # the registry version's name for it; int8pipe.method stays for one release, then goes
        method = "from_cache" if cfg.from_cache else cfg.method
        return {CALIBRATION_METHOD_TAG: method, METHOD_TAG: method}

    @classmethod
    def summary_line(cls, cfg: CalibrateConfig) -> str:
        return f"Calibration: {'a TensorRT cache' if cfg.from_cache else cfg.method}."

    @classmethod
    def check(cls, pipeline: PipelineConfig) -> None:
        super().check(pipeline)
        cfg: CalibrateConfig = pipeline.steps["calibrate"]
        trt_cache.encode_version(cfg.trt_version)
        if cfg.from_cache:
            p = (pipeline.base_dir / cfg.from_cache).resolve()
            if not p.is_file():
                fail(ConfigError, f"steps.calibrate.from_cache: file not found: {p}.")
            cfg.from_cache = str(p)
        elif pipeline.data.calibration is None:
            fail(ConfigError, "steps.calibrate needs data.calibration (or steps.calibrate.from_cache).")
        if cfg.memory_mb <= 0:
            fail(ConfigError, f"steps.calibrate.memory_mb: expected a positive number of MB, got {cfg.memory_mb}.")
        if cfg.batch_size <= 0 or cfg.num_bins < 128:
            fail(ConfigError, "steps.calibrate: batch_size must be positive and num_bins at least 128.")
        if not 0 < cfg.percentile <= 100:
            fail(ConfigError, f"steps.calibrate.percentile: expected 0 < p <= 100, got {cfg.percentile}.")
        if cfg.workers < 1:
            fail(ConfigError, f"steps.calibrate.workers: expected a positive integer, got {cfg.workers}.")
        if cfg.workers > 1 and not cfg.from_cache:
            if cfg.passes == 1 and _histograms(cfg.method):
                fail(
                    ConfigError,
                    "steps.calibrate.workers > 1 needs passes: 2 (or method: minmax): single-pass histograms "
                    "depend on the order batches arrive in, so shards cannot be merged exactly.",
                )
            from pipeline.execution.ray_cluster import import_ray, resolve_address

            import_ray("steps.calibrate.workers > 1")
            if not pipeline.in_ray_sweep:  # a Ray sweep's trial gets the sweep's cluster in $RAY_ADDRESS
                resolve_address(cfg.ray.address, "steps.calibrate.ray.address")

    def cache_config(self, cfg: CalibrateConfig) -> Any:
        # The measurements (min/max, and histograms for every method but minmax) do not depend on the
        # method or the percentile: a run made for one histogram method serves the others.
        if cfg.from_cache:
            return cfg
        m = to_mapping(cfg)
        m.pop("percentile")
        m.pop("plots")
        m.pop("workers")  # sharded or not, the ranges are the same
        m.pop("ray")
        if cfg.passes == 2:  # exact histograms: the chunk size, so the memory budget, changes nothing
            m.pop("memory_mb")
        # one histogram pass serves every histogram method: they differ only in the threshold read off it
        m["method"] = "histogram" if _histograms(cfg.method) else cfg.method
        return m

    def fallback_configs(self, cfg: CalibrateConfig) -> list[Any]:
        if cfg.from_cache or cfg.method != "minmax":
            return []
        return [dict(self.cache_config(cfg), method="histogram")]  # max |x| is recorded there too

    @staticmethod
    def _same_thresholds(ranges: Ranges, cfg: CalibrateConfig) -> bool:
        return bool(cfg.from_cache) or (ranges.method, ranges.params.get("percentile")) == (
            cfg.method,
            cfg.percentile if cfg.method == "percentile" else None,
        )

    def reuse_note(self, ctx: StepContext, cfg: CalibrateConfig) -> str:
        ranges = Ranges.read(ctx.outputs["ranges"])
        if self._same_thresholds(ranges, cfg):
            return "same config and inputs"
        before = _thresholds(ranges.method, ranges.params.get("percentile"))
        now = _thresholds(cfg.method, cfg.percentile)
        return f"same inputs and measurements; its {before} thresholds are replaced by {now}'s"

    def on_reuse(self, ctx: StepContext, cfg: CalibrateConfig) -> None:
        ranges = Ranges.read(ctx.outputs["ranges"])
        if self._same_thresholds(ranges, cfg):
            return
        stored = ctx.outputs.get("histograms")
        hists = load_histograms(stored) if stored is not None and stored.is_file() else {}
        logger.info("calibrate: %s thresholds from the reused run's histograms (no inference)", cfg.method)
        new = rethreshold(ranges, hists, cfg.method, cfg.percentile)
        seconds = ctx.metrics.get("calibration_seconds", 0.0)
        self._write(ctx, cfg, Calibration(new, hists, seconds), trt_cache.ALGORITHMS[cfg.method])
        ctx.set_tags({THRESHOLDS_FROM_TAG: ranges.method})

    def key_material(self, ctx: StepContext, cfg: Any) -> dict[str, Any]:
        src = ctx.pipeline.data.calibration
        if cfg.from_cache:
            return {"cache": onnx_model.sha256(cfg.from_cache)}
        assert src is not None
        return {"data": data.source_digest(src, data.search_dirs(ctx.pipeline.base_dir)), "target": ctx.facts.target}

    def run(self, ctx: StepContext, cfg: CalibrateConfig) -> None:
        model_path = ctx.input("fp32_model")
        if cfg.from_cache:
            cal = _from_cache(Path(cfg.from_cache), model_path, cfg.trt_version)
            algorithm = trt_cache.open_cache(cfg.from_cache)[0].algorithm  # the header line only
        else:
            src = ctx.pipeline.data.calibration
            assert src is not None
            model = onnx_model.load(model_path, check=False)
            specs = onnx_model.input_specs(model)
            dirs = data.search_dirs(ctx.pipeline.base_dir)
            histogram_tensors = None if cfg.tensors == "all" else quantized_activations(model, ctx.facts.target)
            options: dict[str, Any] = {
                "method": cfg.method,
                "num_bins": cfg.num_bins,
                "percentile": cfg.percentile,
                "passes": cfg.passes,
                "minmax_inputs": cfg.minmax_inputs,
                "histogram_tensors": histogram_tensors,
                "memory_mb": cfg.memory_mb,
            }
            if cfg.workers > 1:
                from pipeline.calibration.sharded import calibrate_sharded
                from pipeline.execution.ray_cluster import resolve_address

                address = resolve_address(cfg.ray.address, "steps.calibrate.ray.address")
                cal = calibrate_sharded(
                    model_path,
                    src,
                    **options,
                    batch_size=cfg.batch_size,
                    specs=specs,
                    dirs=dirs,
                    what="data.calibration",
                    workers=cfg.workers,
                    address=address,
                    num_cpus=cfg.ray.num_cpus,
                )
            else:
                read = lambda: data.batches(src, cfg.batch_size, specs, dirs, "data.calibration")  # noqa: E731
                cal = calibrate(model_path, read, **options, layout=Layout.of(src))
            warn_blank_inputs(cal.ranges, list(specs), Layout.of(src))
            algorithm = trt_cache.ALGORITHMS[cfg.method]
        self._write(ctx, cfg, cal, algorithm)

    def _write(self, ctx: StepContext, cfg: CalibrateConfig, cal: Calibration, algorithm: str) -> None:
        ranges = cal.ranges
        ranges.write(ctx.output("ranges", "calibration/ranges.json"))
        if cal.histograms:  # lets a sweep over methods rethreshold without running inference again
            save_histograms(cal.histograms, ctx.output("histograms", "calibration/histograms.npz"))
        amax = ranges.amax()
        cache = trt_cache.from_amax(amax, cfg.trt_version, algorithm)
        text = cache.text()
        ctx.output("trt_cache", "calibration/calibration.cache").write_text(text)
        # the same lines under a name MLflow's UI previews (it shows no file ending in .cache)
        (ctx.workdir / "calibration" / "calibration.cache.txt").write_text(text)
        flatbuffers_table.write(amax, ctx.output("ort_trt_table", "calibration/calibration.flatbuffers"))
        ctx.output("dynamic_ranges", "calibration/dynamic_ranges.json").write_text(json.dumps(amax, indent=1))
        rows: list[dict[str, Any]] = [
            {
                "tensor": name,
                "producer": r.producer,
                "method": r.method,
                "min": r.min,
                "max": r.max,
                "amax": r.amax,
                "minmax_amax": r.minmax_amax,
                "amax_ratio": r.amax / r.minmax_amax if r.minmax_amax else 1.0,
                "clipped_fraction": r.clipped_fraction,
            }
            for name, r in ranges.tensors.items()
        ]
        if rows:
            ctx.log_table(rows, "calibration/ranges_table.json")
        clipped = [r for r in rows if r["amax_ratio"] < CLIPPED_RATIO]
        worst = sorted(rows, key=lambda r: r["amax_ratio"])[: cfg.plots]
        items = [
            (
                r["tensor"],
                cal.histograms[r["tensor"]].counts,
                cal.histograms[r["tensor"]].width,
                r["amax"],
                r["minmax_amax"],
            )
            for r in worst
            if r["tensor"] in cal.histograms
        ]
        plot_path = ctx.workdir / "calibration" / "histograms.png"
        plots.histograms(items, plot_path, ranges.method)
        logger.info(
            "calibrate: %s over %d samples, %d tensors, %d clipped below %.0f%% of max |x|, %.1fs",
            ranges.method,
            ranges.num_samples,
            len(rows),
            len(clipped),
            CLIPPED_RATIO * 100,
            cal.seconds,
        )
        ctx.log_metrics(
            {
                "num_samples": ranges.num_samples,
                "num_tensors": len(rows),
                "calibration_seconds": cal.seconds,
                "tensors_clipped": len(clipped),
            }
            | (
                {"calibration_chunk": cal.chunk, "activation_mb_per_sample": cal.sample_bytes / 1e6}
                if cal.chunk
                else {}
            )
        )


def warn_blank_inputs(ranges: Ranges, inputs: list[str], layout: Layout) -> list[str]:
    """Warn about model inputs that were 0 in every calibration sample (returned): such data gives the
    input no scale, so everything reading it stays FP32, and it is far more often a broken source (a
    blank image folder, a wrong key or scale, a loader returning zeros) than the model's real input.
    Constants are left out: an all-zero initial state is a real value."""
    blank = [
        name
        for name in inputs
        if name in ranges.tensors and name not in layout.constants and ranges.tensors[name].minmax_amax == 0
    ]
    if blank:
        logger.warning(
            "calibrate: model input(s) %s were 0 in every one of the %d calibration samples, so they get no "
            "INT8 scale and the nodes reading them stay FP32. Check data.calibration: a blank or all-black "
            "image set, a wrong npz key or scale, a loader returning zeros.",
            ", ".join(repr(n) for n in blank),
            ranges.num_samples,
        )
    return blank


def _thresholds(method: str, percentile: float | None) -> str:
    """A method as the log names its thresholds: a percentile says which."""
    return f"{method} {percentile:g}" if method == "percentile" and percentile is not None else method


STEP = Calibrate
