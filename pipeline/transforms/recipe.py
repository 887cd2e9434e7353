"""The static quantize recipe, model in, model out: everything ``steps.quantize`` does to a float model,
callable without MLflow (benchmarks, notebooks), so what is measured is what ships.

In order: cross-layer equalization and activation smoothing (each calibrates the tensors it
renames), the Q/DQ model (:mod:`pipeline.transforms.quantization`), float paths for the nodes kept float
(:mod:`pipeline.transforms.keep_float`), GPTQ weight rounding, shifted activations, bias correction. The steps
that measure on calibration samples are skipped, with a warning, when there are none (a pipeline
calibrated from a TensorRT cache).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx

from pipeline.calibration.methods import METHODS
from pipeline.calibration.ranges import Ranges, TensorRange
from pipeline.graph.layout import Layout
from pipeline.graph.model import drop_unused_initializers
from pipeline.limits import DEFAULT_MEMORY_MB
from pipeline.log import logger
from pipeline.transforms import bias_correction, equalization, shift, smoothing, weight_rounding
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
    shift_activations: bool = False
    bias_correction: bool = True
    bias_correction_samples: int = 128
    weight_rounding: str = "nearest"  # nearest | gptq
    weight_rounding_samples: int = 128


@dataclass
class Samples:
    """The calibration samples the recipe measures on: ``batches()`` starts them again."""

    batches: Batches | None = None
    layout: Layout | None = None
    memory_mb: int = DEFAULT_MEMORY_MB


@dataclass
class Quantized:
    model: onnx.ModelProto  # the Q/DQ model
    float_model: onnx.ModelProto | None  # the float model it was built from, when equalization or smoothing changed it
    counts: dict[str, int]  # what each stage changed, named as the quantize step's metrics


def quantize_static(fp32: onnx.ModelProto, ranges: Ranges, recipe: Recipe, samples: Samples) -> Quantized:
    """The Q/DQ model of ``fp32`` from calibrated ``ranges`` as ``recipe`` says."""
    opts = recipe.quantize
    tensors = dict(ranges.tensors)
    counts: dict[str, int] = {}
    kept_float = float_nodes(fp32, opts)
    source = _equalized(fp32, ranges, recipe, samples, kept_float, tensors, counts)
    source = _smoothed(source, ranges, recipe, samples, kept_float, tensors, counts)
    observed = {k: (v.min, v.max) for k, v in tensors.items()}
    qdq = quantize(source, {k: v.amax for k, v in tensors.items()}, opts, observed)
    # excluded means float: also where an excluded node shares an input or weight with a quantized one
    qdq = keep_float_inputs(qdq, fp32, kept_float)
    # on at most the samples calibration saw (a true progress total)
    seen = ranges.num_samples or max(recipe.weight_rounding_samples, recipe.bias_correction_samples)
    counts["gptq_rounded_nodes"] = 0
    if recipe.weight_rounding == "gptq":  # before the shift and bias correction: both read the INT8 weights
        limit = min(recipe.weight_rounding_samples, seen)
        counts["gptq_rounded_nodes"] = _on_samples(weight_rounding.round_weights, "GPTQ weight rounding", source,
                                                   qdq, samples, limit)  # fmt: skip
    if recipe.shift_activations:
        counts["shifted_inputs"] = len(shift.shift_inputs(qdq, observed))
    counts["bias_corrected_nodes"] = 0
    if recipe.bias_correction:  # after the shift: it measures the grid used
        limit = min(recipe.bias_correction_samples, seen)
        counts["bias_corrected_nodes"] = _on_samples(bias_correction.correct, "bias correction", source, qdq, samples,
                                                     limit)  # fmt: skip
    drop_unused_initializers(qdq)  # e.g. an int32 bias bias correction replaced
    return Quantized(qdq, source if source is not fp32 else None, counts)


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
    method = ranges.method if ranges.method in METHODS else "mse"  # from_cache: no method to repeat
    equalized, new, count = equalization.equalize_and_calibrate(
        fp32, samples.batches, skip, method, float(ranges.params.get("percentile", 99.99)), samples.memory_mb,
        samples.layout or Layout(),
    )  # fmt: skip
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
