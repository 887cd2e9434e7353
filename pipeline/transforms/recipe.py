"""The static quantize recipe, model in, model out: everything ``steps.quantize`` does to a float model,
callable without MLflow (benchmarks, notebooks), so what is measured is what ships.

In order: cross-layer equalization, activation smoothing and per-channel depthwise input scales (each
calibrates the tensors it renames), the Q/DQ model (:mod:`pipeline.transforms.quantization`), float paths
for the nodes kept float (:mod:`pipeline.transforms.keep_float`), GPTQ weight rounding, shifted activations,
bias correction. The steps that measure on calibration samples are skipped, with a warning, when there are
none (a pipeline calibrated from a TensorRT cache).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from pipeline.calibration.methods import METHODS
from pipeline.calibration.ranges import Ranges, TensorRange
from pipeline.graph.layout import Layout
from pipeline.graph.model import drop_unused_initializers, toposort
from pipeline.limits import DEFAULT_MEMORY_MB
from pipeline.log import logger
from pipeline.transforms import (
    bias_correction,
    depthwise_scales,
    equalization,
    float_precision,
    fp8,
    scale_grid,
    shift,
    smoothing,
    weight_rounding,
)
from pipeline.transforms.keep_float import keep_float_inputs
from pipeline.transforms.quantization import QuantizeOptions, float_nodes, quantize

Batches = Callable[[], Iterable[dict[str, np.ndarray]]]


@dataclass(frozen=True)
class Smoothing:
    alpha: float = 0.95
    op_types: tuple[str, ...] = ("MatMul", "Gemm")
    samples: int = 128
    method: str = "minmax"


@dataclass(frozen=True)
class Recipe:
    """``steps.quantize``'s keys for static mode, resolved (``weights``: a cpu_kernels scheme name)."""

    quantize: QuantizeOptions = field(default_factory=QuantizeOptions)
    equalization: bool = False
    smoothing: Smoothing | None = None
    depthwise_scales: bool = False  # depthwise Conv inputs divided per channel, the weights multiplied back
    depthwise_samples: int = 64  # calibration samples the per-channel maxima and new ranges come from
    shift_activations: bool = False
    bias_correction: bool = True
    bias_correction_samples: int = 64
    weight_rounding: str = "nearest"  # nearest | gptq
    weight_rounding_samples: int = 128
    precision: str = "int8"  # what the quantized layers compute in: int8 | fp8 (E4M3, target tensorrt)
    float_precision: str = "fp32"  # what the rest computes in: fp32 | fp16 | bf16 (float_precision.py)
    keep_fp32_nodes: tuple[str, ...] = ()  # float nodes that stay FP32 whatever float_precision says


@dataclass
class Samples:
    """The calibration samples the recipe measures on: ``batches()`` starts them again."""

    batches: Batches | None = None
    layout: Layout | None = None
    memory_mb: int = DEFAULT_MEMORY_MB


@dataclass
class Quantized:
    model: onnx.ModelProto  # the Q/DQ model
    float_model: onnx.ModelProto | None  # the float model it was built from, when a rewrite above changed it
    counts: dict[str, int]  # what each stage changed, named as the quantize step's metrics
    # float regions lowered to FP16/BF16: the record, and the Q/DQ model before (recovery reverts on it)
    regions: float_precision.Lowered | None = None
    fp32_regions: onnx.ModelProto | None = None


def quantize_static(fp32: onnx.ModelProto, ranges: Ranges, recipe: Recipe, samples: Samples) -> Quantized:
    """The Q/DQ model of ``fp32`` from calibrated ``ranges`` as ``recipe`` says."""
    opts = recipe.quantize
    tensors = dict(ranges.tensors)
    counts: dict[str, int] = {}
    kept_float = float_nodes(fp32, opts)
    source = _equalized(fp32, ranges, recipe, samples, kept_float, tensors, counts)
    source = _smoothed(source, ranges, recipe, samples, kept_float, tensors, counts)
    source = _depthwise_scaled(source, ranges, recipe, samples, kept_float, tensors, counts)
    observed = {k: (v.min, v.max) for k, v in tensors.items()}
    qdq = quantize(source, {k: v.amax for k, v in tensors.items()}, opts, observed)
    # excluded means float: also where an excluded node shares an input or weight with a quantized one
    qdq = keep_float_inputs(qdq, fp32, kept_float)
    if recipe.precision == "fp8":  # same placement and thresholds, E4M3 grids; before the stages that measure
        counts["fp8_quantizers"] = fp8.to_fp8(qdq, source)
        source = _with_fp8_opset(source)  # bias correction copies FP8 quantizers into it
    # FP16/BF16 regions: every scale on that grid before a stage folds one large term against another
    # (GPTQ and the shift read the weights' scales, bias correction the shifted inputs')
    narrow = recipe.float_precision != "fp32"
    grid = f"{recipe.float_precision}_grid_scales"
    if narrow:
        counts[grid] = scale_grid.fit_scales(qdq, recipe.float_precision)
    # on at most the samples calibration saw (a true progress total)
    seen = ranges.num_samples or max(recipe.weight_rounding_samples, recipe.bias_correction_samples)
    counts["gptq_rounded_nodes"] = 0
    if recipe.weight_rounding == "gptq":  # before the shift and bias correction: both read the INT8 weights
        limit = min(recipe.weight_rounding_samples, seen)
        counts["gptq_rounded_nodes"] = _on_samples(weight_rounding.round_weights, "GPTQ weight rounding", source,
                                                   qdq, samples, limit)  # fmt: skip
    if recipe.shift_activations:
        on = recipe.float_precision if narrow else None
        counts["shifted_inputs"] = len(shift.shift_inputs(qdq, observed, narrow=on))
        if narrow:
            counts[grid] += scale_grid.fit_scales(qdq, recipe.float_precision)
    counts["bias_corrected_nodes"] = 0
    if recipe.bias_correction:  # after the shift: it measures the grid used
        limit = min(recipe.bias_correction_samples, seen)
        counts["bias_corrected_nodes"] = _on_samples(bias_correction.correct, "bias correction", source, qdq, samples,
                                                     limit)  # fmt: skip
    drop_unused_initializers(qdq)  # e.g. an int32 bias bias correction replaced
    toposort(qdq)  # ORT's quantizer appends its Q/DQ nodes at the end; a caller may save or check it as is
    float_model = source if source is not fp32 else None
    if recipe.float_precision == "fp32":
        return Quantized(qdq, float_model, counts)
    seen_max = {k: max(abs(v.min), abs(v.max)) for k, v in tensors.items()}
    asked = {n: "steps.quantize.keep_fp32_nodes" for n in recipe.keep_fp32_nodes}
    lowered = float_precision.lower(qdq, recipe.float_precision, seen_max, keep_fp32=asked)
    counts[f"{recipe.float_precision}_nodes"] = len(lowered.low_nodes)
    counts["fp32_kept_nodes"] = len(lowered.kept_fp32)
    return Quantized(lowered.model, float_model, counts, lowered, qdq)


def lowered_like(qdq: onnx.ModelProto, record: dict[str, Any]) -> onnx.ModelProto:
    """``qdq`` (FP32 float regions: recovery's model) lowered as the quantize step lowered its model,
    ``record`` being that step's ``Lowered.to_json()``: the same precision, the same nodes kept FP32."""
    precision = str(record.get("precision", "fp32"))
    if precision == "fp32":
        return qdq
    return float_precision.lower(qdq, precision, keep_fp32=dict(record.get("kept_fp32", {}))).model


def _with_fp8_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    float_precision.raise_opset(out, fp8.FP8_OPSET, fp8.FP8_NEEDS, fp8.FP8_REMEDY)
    return out


def _have(samples: Samples, what: str) -> bool:
    if samples.batches is None:
        logger.warning("quantize: no %s (it needs data.calibration samples)", what)
        return False
    return True


def _on_samples(
    fn: Callable[..., tuple[int, int]], what: str, fp32: onnx.ModelProto, qdq: onnx.ModelProto, samples: Samples,
    limit: int,
) -> int:  # fmt: skip
    """``fn(fp32, qdq, batches, samples, layout, memory_mb)`` (GPTQ, bias correction), changing ``qdq`` in
    place; the nodes it changed, 0 without samples."""
    if not _have(samples, what):
        return 0
    assert samples.batches is not None
    changed, _ = fn(fp32, qdq, samples.batches(), limit, samples.layout, samples.memory_mb)
    return int(changed)


def _calibration_method(ranges: Ranges) -> tuple[str, float]:
    """The calibrate step's method and percentile, for the tensors a rewrite creates."""
    method = ranges.method if ranges.method in METHODS else "mse"  # from_cache: no method to repeat
    return method, float(ranges.params.get("percentile", 99.99))


def _equalized(
    fp32: onnx.ModelProto, ranges: Ranges, recipe: Recipe, samples: Samples, skip: list[str],
    tensors: dict[str, TensorRange], counts: dict[str, int],
) -> onnx.ModelProto:  # fmt: skip
    """``fp32`` with its Conv pairs equalized (the renamed tensors' ranges added to ``tensors``), or ``fp32``."""
    if not recipe.equalization or not _have(samples, "equalization"):
        return fp32
    assert samples.batches is not None
    if recipe.quantize.per_channel:
        logger.warning(
            "quantize: equalization with per_channel: true moves range into the activations, where one "
            "scale per tensor pays for it; it is meant for per_channel: false (see docs/yaml-reference.md)"
        )
    equalized, new, count = equalization.equalize_and_calibrate(
        fp32, samples.batches, skip, *_calibration_method(ranges), samples.memory_mb, samples.layout or Layout()
    )
    tensors.update(new)
    counts["equalized_pairs"] = count
    return equalized


def _smoothed(
    fp32: onnx.ModelProto, ranges: Ranges, recipe: Recipe, samples: Samples, skip: list[str],
    tensors: dict[str, TensorRange], counts: dict[str, int],
) -> onnx.ModelProto:  # fmt: skip
    """``fp32`` with smoothed layer inputs (their ranges added to ``tensors``), or ``fp32``."""
    s = recipe.smoothing
    if s is None or not _have(samples, "smoothing"):
        return fp32
    assert samples.batches is not None
    smoothed, new = smoothing.smooth_and_calibrate(
        fp32, samples.batches, list(s.op_types), skip, s.alpha, s.samples, s.method,
        float(ranges.params.get("percentile", 99.99)), samples.memory_mb, samples.layout or Layout(),
    )  # fmt: skip
    tensors.update(new)
    counts["smoothed_inputs"] = len(new)
    return smoothed


def _depthwise_scaled(
    fp32: onnx.ModelProto, ranges: Ranges, recipe: Recipe, samples: Samples, skip: list[str],
    tensors: dict[str, TensorRange], counts: dict[str, int],
) -> onnx.ModelProto:  # fmt: skip
    """``fp32`` with its depthwise Conv inputs scaled per channel (their ranges added to ``tensors``), or ``fp32``."""
    if not recipe.depthwise_scales or not _have(samples, "per-channel depthwise input scales"):
        return fp32
    assert samples.batches is not None
    if recipe.quantize.activations == "asymmetric":
        logger.warning(
            "quantize: depthwise_scales with asymmetric activations: dividing each channel by its max |x| "
            "gives every channel [-1, 1], so the zero point no longer fits the quiet channels; on "
            "EfficientNet-Lite0 it gained nothing and cost ONNX Runtime CPU latency (see docs/yaml-reference.md)"
        )
    limit = min(recipe.depthwise_samples, ranges.num_samples or recipe.depthwise_samples)
    scaled, new = depthwise_scales.scale_and_calibrate(
        fp32, samples.batches, skip, limit, *_calibration_method(ranges), samples.memory_mb, samples.layout or Layout()
    )
    tensors.update(new)
    counts["depthwise_scaled_inputs"] = len(new)
    return scaled
