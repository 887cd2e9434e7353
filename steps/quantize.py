"""quantize: the INT8 model.

``mode: static`` (default): explicit Q/DQ built from ``ranges.json`` (never by calibrating again) by
the recipe in :mod:`pipeline.transforms.recipe` (equalization, smoothing, Q/DQ, float paths, GPTQ, shifted
inputs, bias correction), which this step configures and records. A float model the recipe changed
(equalization, smoothing) is handed on as ``float_model`` too: recovery reverts a node to *its* float
weights. ``mode: dynamic``: ONNX Runtime's
dynamic quantization (pipeline.dynamic), no ranges needed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import onnx

from pipeline.analysis import strongly_typed
from pipeline.calibration.ranges import Ranges
from pipeline.errors import ConfigError, ModelError, fail
from pipeline.execution import cpu_kernels
from pipeline.graph import model as onnx_model
from pipeline.graph.layout import Layout
from pipeline.log import logger
from pipeline.sources import data
from pipeline.tag_names import AUTO_CHOICES_TAG, CPU_FLEET_TAG, GRAPH_KIND_TAG, TARGET_TAG, WEIGHT_SCHEME_TAG
from pipeline.transforms import dynamic, recipe, roles
from pipeline.transforms.float_precision import Lowered
from pipeline.transforms.quantization import QuantizeOptions, node_table
from steps.base import Step, require_step
from steps.context import StepContext

if TYPE_CHECKING:
    from pipeline.settings.config import PipelineConfig
    from pipeline.settings.facts import Facts


# the keys whose ``auto`` QuantizeConfig.for_graph decides, in the order the run's tag lists them
AUTO_KEYS = ("shift_activations", "bias_correction", "smoothing", "depthwise_scales")


@dataclass
class Exclude:
    nodes: list[str] = field(default_factory=list)
    op_types: list[str] = field(default_factory=list)


@dataclass
class Smoothing:
    # Defaults by measurement (all-MiniLM-L6-v2, benchmarks/results/minilm_peers.md): 0.95 and minmax
    # took the TensorRT model's embedding cosine from 0.967 to 0.997; 0.5 or mse thresholds on the
    # smoothed tensors did worse. Conv inputs are left out: smoothing never paid on the CNNs measured.
    alpha: float = 0.95  # 0: all of the spread stays in the activation, 1: all of it moves to the weights
    op_types: list[str] = field(default_factory=lambda: ["MatMul", "Gemm"])
    samples: int = 128  # calibration samples the per-channel maxima come from
    method: Literal["minmax", "entropy", "percentile", "mse"] = "minmax"  # thresholds of the smoothed tensors


@dataclass
class QuantizeConfig:
    target: Literal["tensorrt", "onnxruntime"] = "tensorrt"
    # static: Q/DQ from the calibrated ranges; dynamic: ORT's run-time activation ranges (CPU, onnxruntime only)
    mode: Literal["static", "dynamic"] = "static"
    per_channel: bool = True
    exclude: Exclude = field(default_factory=Exclude)
    # auto: symmetric for tensorrt (its only INT8 scheme), asymmetric uint8 for onnxruntime (its default)
    activations: Literal["auto", "symmetric", "asymmetric"] = "auto"
    # MatMuls of two activations (attention's Q·Kᵀ and P·V) stay float unless this is true
    activation_matmuls: bool = False
    # LayerNorm/InstanceNorm/GroupNorm/unfolded BatchNorm stay float unless this is true (onnxruntime target)
    normalization: bool = False
    # cross-layer equalization of Conv pairs, for per-tensor weights (per_channel: false)
    equalization: bool = False
    # per-channel activation outliers moved into the weights (SmoothQuant); null: off; auto: with its
    # defaults on attention graphs, off on the others
    smoothing: Smoothing | Literal["auto"] | None = "auto"
    # depthwise Conv inputs get one scale per channel: each channel divided by its max |x| before the
    # quantizer, the depthwise weights multiplied back (pipeline/transforms/depthwise_scales.py);
    # auto: on for target tensorrt with per-channel INT8 weights and calibration samples
    depthwise_scales: bool | Literal["auto"] = "auto"
    # Conv inputs that are (almost) one-signed quantized as x - c, c paid back in the bias: 8 bits, not 7;
    # auto: on wherever activations are symmetric (target tensorrt)
    shift_activations: bool | Literal["auto"] = "auto"
    # the mean output shift of each INT8 Conv/Gemm, measured on calibration samples, folded into its bias;
    # auto: on, except on attention graphs (where it measured worse)
    bias_correction: bool | Literal["auto"] = "auto"
    bias_correction_samples: int = 64  # the networks that chose the defaults measured on at most 64
    # nearest: each weight to its nearest INT8 value; gptq: each Conv's weights rounded together for the
    # least output error on calibration samples (pipeline/transforms/weight_rounding.py)
    weight_rounding: Literal["nearest", "gptq"] = "nearest"
    weight_rounding_samples: int = 128
    # target onnxruntime: the CPUs the model must compute the same on (pipeline/execution/cpu_kernels.py ISAS);
    # null: all of them. A CPU without VNNI in the list gets weights ORT's kernels cannot saturate.
    cpu_fleet: list[str] | None = None
    # what the quantized layers compute in: int8, or fp8 (E4M3, scale amax/448; Hopper/Ada/Blackwell, target tensorrt)
    precision: Literal["int8", "fp8"] = "int8"
    # what the layers left float compute in (TensorRT 11 runs each layer in the type the model writes):
    # auto: fp16 for tensorrt (FP32 kept where FP16 cannot hold the values), fp32 for onnxruntime
    float_precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    # nodes whose float computation stays FP32 whatever float_precision says (e.g. named by a validate overflow)
    keep_fp32_nodes: list[str] = field(default_factory=list)

    def for_graph(self, kind: str, has_samples: bool = True) -> QuantizeConfig:
        """This config with every ``auto`` decided for a graph of ``kind`` (roles.graph_kind); without
        calibration samples (``from_cache``) the options that measure on them stay off.

        By measurement on seven networks (benchmarks/results/defaults_across_networks.md): shifted
        activations took every CNN and detector measured up (a layout detector's F1 0.70 -> 0.92),
        and on MiniLM smoothing with bias correction off matched NNCF's transformer preset (0.969)."""
        attention = kind == "attention"
        smoothing = self.smoothing
        if smoothing == "auto":
            smoothing = Smoothing() if attention and has_samples else None
        shift = self.shift_activations
        if shift == "auto":  # the INT8 grid's lost half; E4M3 is not a uniform grid
            shift = self.activation_scheme == "symmetric" and self.precision == "int8"
        bias = self.bias_correction
        if bias == "auto":
            bias = not attention and has_samples
        depthwise = self.depthwise_scales
        if depthwise == "auto":  # a no-op on graphs without depthwise Convs; on ORT's CPU kernels the Mul cost
            # 70% more latency (it splits the fused QLinearConv chain) for no accuracy with u8 activations
            depthwise = self.target == "tensorrt" and self.per_channel and self.precision == "int8" and has_samples
        return dataclasses.replace(
            self, smoothing=smoothing, shift_activations=shift, bias_correction=bias, depthwise_scales=depthwise
        )

    def auto_choices(self, kind: str, has_samples: bool = True) -> str:
        """What ``auto`` became for this graph, for the run's tag and log line."""
        return self.decided(self.for_graph(kind, has_samples))

    def decided(self, done: QuantizeConfig) -> str:
        """``key=on|off`` for each of this config's ``auto`` keys, as ``done`` (its for_graph) set them."""
        keys = [k for k in AUTO_KEYS if getattr(self, k) == "auto"]
        return ", ".join(f"{k}={'off' if getattr(done, k) in (None, False) else 'on'}" for k in keys)

    def as_recipe(self, facts: Facts) -> recipe.Recipe:
        """These keys, every ``auto`` decided (:meth:`for_graph`), as the static recipe takes them.

        The weight scheme is a pipeline fact."""
        opts = QuantizeOptions(
            target=self.target,
            per_channel=self.per_channel,
            exclude_nodes=tuple(self.exclude.nodes),
            exclude_op_types=tuple(self.exclude.op_types),
            activations=self.activation_scheme,
            activation_matmuls=self.activation_matmuls,
            normalization=self.normalization,
            weights=facts.weight_scheme.name,
        )
        s = self.smoothing
        if isinstance(s, str) or any(getattr(self, k) == "auto" for k in AUTO_KEYS):
            raise ValueError("QuantizeConfig.as_recipe: decide the auto keys first, with for_graph(kind)")
        return recipe.Recipe(
            quantize=opts,
            equalization=self.equalization,
            shift_activations=bool(self.shift_activations),
            smoothing=recipe.Smoothing(s.alpha, tuple(s.op_types), s.samples, s.method) if s is not None else None,
            depthwise_scales=bool(self.depthwise_scales),
            bias_correction=bool(self.bias_correction),
            bias_correction_samples=self.bias_correction_samples,
            weight_rounding=self.weight_rounding,
            weight_rounding_samples=self.weight_rounding_samples,
            precision=self.precision,
            float_precision=self.float_scheme,
            keep_fp32_nodes=tuple(self.keep_fp32_nodes),
        )

    @property
    def float_scheme(self) -> str:
        if self.float_precision != "auto":
            return self.float_precision
        return "fp16" if self.target == "tensorrt" else "fp32"

    @property
    def activation_scheme(self) -> str:
        if self.activations != "auto":
            return self.activations
        return "symmetric" if self.target == "tensorrt" else "asymmetric"


class Quantize(Step):
    name = "quantize"
    Config = QuantizeConfig
    needs_steps = ("export",)  # and calibrate in static mode; dynamic mode takes ranges at run time
    parent_metrics = ("size_mb_fp32", "size_mb_int8", "int8_nodes", "fp_nodes")
    next_artifact = "model/model_int8.onnx"

    @classmethod
    def label(cls, cfg: QuantizeConfig) -> str:
        return f"{cfg.target} dynamic" if cfg.mode == "dynamic" else cfg.target

    @classmethod
    def run_tags(cls, cfg: QuantizeConfig, pipeline: PipelineConfig) -> dict[str, str]:
        facts = pipeline.facts
        tags = {TARGET_TAG: facts.target}
        if facts.cpu_kernels:  # the CPUs it computes the same on decide its weights
            tags[WEIGHT_SCHEME_TAG] = facts.weight_scheme.name
        return tags

    @classmethod
    def summary_line(cls, cfg: QuantizeConfig) -> str:
        return f"Quantized for {cfg.target}, {cfg.activation_scheme} activations, per-channel {cfg.per_channel}."

    @classmethod
    def check(cls, pipeline: PipelineConfig) -> None:
        super().check(pipeline)
        cfg: QuantizeConfig = pipeline.steps["quantize"]
        if cfg.mode != "dynamic":
            require_step(cls.name, "calibrate", pipeline)
        if cfg.target == "tensorrt" and cfg.activations == "asymmetric":
            fail(
                ConfigError,
                "steps.quantize.activations: asymmetric needs target: onnxruntime; TensorRT runs INT8 "
                "activations only with zero point 0. Use activations: symmetric (or auto).",
            )

        if cfg.shift_activations is True and cfg.activation_scheme != "symmetric":
            fail(
                ConfigError,
                "steps.quantize.shift_activations: shifts inputs onto a symmetric grid (zero point 0), but "
                "activations are asymmetric here, which already use the whole grid. Drop shift_activations or "
                "set activations: symmetric.",
            )
        cls._check_precisions(cfg)
        if cfg.mode == "dynamic" and cfg.target != "onnxruntime":
            fail(
                ConfigError,
                "steps.quantize.mode: dynamic needs target: onnxruntime; TensorRT runs INT8 only from explicit "
                "Q/DQ (mode: static).",
            )
        if cfg.cpu_fleet is not None:
            if cfg.target == "tensorrt":
                fail(
                    ConfigError,
                    "steps.quantize.cpu_fleet: names the CPUs that run the model through ONNX Runtime's int8 "
                    "kernels, but target is tensorrt (a GPU). Use target: onnxruntime, or drop cpu_fleet.",
                )
            allowed = [*cpu_kernels.ISAS, cpu_kernels.ALL]
            unknown = [n for n in cfg.cpu_fleet if n not in allowed]
            if unknown or not cfg.cpu_fleet:
                what = f"unknown ISA {unknown[0]!r}" if unknown else "the list is empty"
                fail(
                    ConfigError,
                    f"steps.quantize.cpu_fleet: {what}; "
                    f"expected a list of {', '.join(allowed)} (null or [all]: every CPU, the safe default).",
                )
        smooth = cfg.smoothing if cfg.smoothing != "auto" else None
        if smooth is not None and not 0.0 <= smooth.alpha <= 1.0:
            fail(ConfigError, f"steps.quantize.smoothing.alpha: expected a number in [0, 1], got {smooth.alpha}.")
        if smooth is not None and smooth.samples <= 0:
            fail(ConfigError, f"steps.quantize.smoothing.samples: expected a positive number, got {smooth.samples}.")
        if cfg.depthwise_scales is True and not cfg.per_channel:
            fail(
                ConfigError,
                "steps.quantize.depthwise_scales: moves each input channel's range into its depthwise weights, "
                "which needs one weight scale per channel, but per_channel is false. Set per_channel: true, or "
                "depthwise_scales: false.",
            )
        if cfg.weight_rounding_samples <= 0:
            fail(
                ConfigError,
                f"steps.quantize.weight_rounding_samples: expected a positive number of samples, "
                f"got {cfg.weight_rounding_samples}.",
            )
        if cfg.bias_correction_samples <= 0:
            fail(
                ConfigError,
                f"steps.quantize.bias_correction_samples: expected a positive number of samples, "
                f"got {cfg.bias_correction_samples} (to turn bias correction off, set bias_correction: false).",
            )

    @staticmethod
    def _check_precisions(cfg: QuantizeConfig) -> None:
        if cfg.precision == "fp8" and cfg.target != "tensorrt":
            fail(
                ConfigError,
                "steps.quantize.precision: fp8 needs target: tensorrt (Hopper, Ada or Blackwell GPUs); ONNX Runtime "
                "has no FP8 kernels to serve it. Use precision: int8 for target onnxruntime.",
            )
        if cfg.float_precision in ("fp16", "bf16") and cfg.target != "tensorrt":
            fail(
                ConfigError,
                f"steps.quantize.float_precision: {cfg.float_precision} float regions are for target: tensorrt, "
                "whose strongly typed engines run each layer in the type the model writes; ONNX Runtime's CPU "
                "provider runs them slower than FP32. Use float_precision: fp32 (or auto) for target onnxruntime.",
            )
        if cfg.precision == "fp8" and cfg.weight_rounding == "gptq":
            fail(
                ConfigError,
                "steps.quantize.weight_rounding: gptq rounds weights onto the INT8 grid, but precision is fp8. "
                "Use weight_rounding: nearest with fp8.",
            )
        if cfg.precision == "fp8" and cfg.shift_activations is True:
            fail(
                ConfigError,
                "steps.quantize.shift_activations: shifts inputs onto the symmetric INT8 grid; precision fp8 "
                "has no such grid. Drop shift_activations (auto turns it off for fp8).",
            )

    def run(self, ctx: StepContext, cfg: QuantizeConfig) -> None:
        fp32_path = ctx.input("fp32_model")
        fp32 = onnx_model.load(fp32_path, check=False)
        if cfg.mode == "dynamic":  # activation ranges are taken per batch at run time: nothing calibrated
            exclude = tuple(cfg.exclude.nodes), tuple(cfg.exclude.op_types)
            int8 = dynamic.quantize_dynamic(fp32, cfg.per_channel, *exclude, scheme=ctx.facts.weight_scheme)
            self._finish(ctx, cfg, fp32_path, int8, dynamic.node_table(fp32, int8, cfg.per_channel), 0)
            return
        ranges = Ranges.read(ctx.input("ranges"))
        ranges.check_model(onnx_model.sha256(fp32_path), "steps.quantize")
        kind, samples = roles.graph_kind(fp32), self._samples(ctx, fp32)
        concrete = cfg.for_graph(kind, samples.batches is not None)
        choices = cfg.decided(concrete)
        ctx.set_tags({GRAPH_KIND_TAG: kind, **({AUTO_CHOICES_TAG: choices} if choices else {})})
        if choices:
            logger.info("quantize: %s graph: %s (the defaults measured best for it)", kind, choices)
        result = recipe.quantize_static(fp32, ranges, concrete.as_recipe(ctx.facts), samples)
        if result.float_model is not None:
            onnx_model.save_checked(result.float_model, ctx.output("float_model", "model/model_float.onnx"))
        # read on the Q/DQ model before lowering: a Cast between a DequantizeLinear and its reader is no change of role
        rows = node_table(fp32, result.fp32_regions or result.model)
        if result.regions is not None and result.fp32_regions is not None:
            self._log_regions(ctx, result.regions, result.fp32_regions, rows)
        counts = dict(result.counts)
        corrected = counts.pop("bias_corrected_nodes")
        self._finish(ctx, cfg, fp32_path, result.model, rows, corrected)
        ctx.log_metrics({k: float(v) for k, v in counts.items()})

    @staticmethod
    def _lint(ctx: StepContext, model: onnx.ModelProto) -> None:
        """TensorRT 11's strongly typed rules, checked here rather than on the GPU host at build time."""
        found = strongly_typed.lint(model)
        path = ctx.workdir / "quantize" / "strongly_typed_lint.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([dataclasses.asdict(f) for f in found], indent=1))
        ctx.log_metrics({"strongly_typed_breaks": len(found)})
        for finding in found[:10]:
            logger.warning("quantize: TensorRT 11 would refuse this model: %s", finding)
        if len(found) > 10:
            logger.warning("quantize: %d more in quantize/strongly_typed_lint.json", len(found) - 10)

    @staticmethod
    def _log_regions(
        ctx: StepContext, regions: Lowered, fp32_regions: onnx.ModelProto, rows: list[dict[str, Any]]
    ) -> None:
        """The record of the FP16/BF16 regions (validate lowers a recovered model the same way), the
        Q/DQ model before lowering (recovery reverts nodes on it), and the node table's float precisions."""
        path = ctx.output("float_regions", "quantize/float_regions.json")
        path.write_text(json.dumps(regions.to_json(), indent=1))
        onnx_model.save_checked(fp32_regions, ctx.output("fp32_regions_model", "model/model_qdq_fp32_regions.onnx"))
        low = set(regions.low_nodes)
        for row in rows:
            if row["precision"] == "fp32" and row["node"] in low:
                row["precision"] = regions.precision
        logger.info(
            "quantize: float layers in %s: %d node(s); %d kept FP32 (quantize/float_regions.json says why)",
            regions.precision.upper(), len(low), len(regions.kept_fp32),
        )  # fmt: skip

    @staticmethod
    def _samples(ctx: StepContext, model: onnx.ModelProto) -> recipe.Samples:
        """The calibration samples (none when calibrating from a cache left none to measure on)."""
        src = ctx.pipeline.data.calibration
        if src is None:
            return recipe.Samples(None, None, ctx.facts.memory_mb)
        specs, dirs = onnx_model.input_specs(model), data.search_dirs(ctx.pipeline.base_dir)
        batches = lambda: data.batches(src, ctx.facts.batch_size, specs, dirs, "data.calibration")  # noqa: E731
        return recipe.Samples(batches, Layout.of(src), ctx.facts.memory_mb)

    def _finish(
        self,
        ctx: StepContext,
        cfg: QuantizeConfig,
        fp32_path: Path,
        int8_model: onnx.ModelProto,
        rows: list[dict[str, Any]],
        corrected: int,
    ) -> None:
        out = ctx.output("int8_model", "model/model_int8.onnx")
        onnx_model.save_checked(int8_model, out)
        if cfg.target == "tensorrt":
            self._lint(ctx, int8_model)
        if rows:
            ctx.log_table(rows, "quantize/nodes_table.json")
        int8 = sum(r["precision"] in ("int8", "fp8") for r in rows)
        if int8 == 0:
            ops = sorted({r["op_type"] for r in rows})
            fail(
                ModelError,
                f"steps.quantize: no node of the model runs in INT8 (target {cfg.target}; the model's ops: "
                f"{', '.join(ops[:20])}). Nothing would be gained, so no INT8 model is produced: check "
                "steps.quantize.exclude, or use target: onnxruntime, which quantizes more op types.",
            )
        scheme = ctx.facts.weight_scheme
        logger.info(
            "quantize: %d of %d nodes run in INT8 (target %s, %s, %s)",
            int8,
            len(rows),
            cfg.target,
            "dynamic activation ranges" if cfg.mode == "dynamic" else f"{cfg.activation_scheme} activations",
            f"weights {scheme.name}: {scheme.detail}",
        )
        if cfg.target == "onnxruntime":
            ctx.set_tags({CPU_FLEET_TAG: ctx.facts.fleet_label, WEIGHT_SCHEME_TAG: scheme.name})
        ctx.log_metrics(
            {
                "int8_nodes": int8,
                "fp_nodes": len(rows) - int8,
                "size_mb_fp32": fp32_path.stat().st_size / 1e6,
                "size_mb_int8": out.stat().st_size / 1e6,
                "bias_corrected_nodes": corrected,
            }
        )

    def key_material(self, ctx: StepContext, cfg: QuantizeConfig) -> dict[str, Any]:
        src = ctx.pipeline.data.calibration
        # auto counts as using data: whether it does depends on the model (an input of the key anyway)
        uses_data = cfg.bias_correction or cfg.smoothing or cfg.depthwise_scales or cfg.weight_rounding == "gptq"
        if not uses_data or cfg.mode == "dynamic" or src is None:
            return {}
        return {"data": data.source_digest(src, data.search_dirs(ctx.pipeline.base_dir))}


STEP = Quantize
