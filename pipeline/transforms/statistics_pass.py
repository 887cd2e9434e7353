"""Statistics of a model's intermediate tensors over the first N calibration samples.

Bias correction (per-channel mean output shift), GPTQ (second moments of Conv inputs) and
smoothing (per-channel maxima) share one skeleton, kept here so that memory and progress behave
alike in all three: a session whose outputs are the wanted tensors, the samples cut into chunks so
that ``copies`` sets of the FP32 network's activations fit the memory budget (a 640×640 detector's
are hundreds of MB per sample), progress counted in samples, and each chunk folded into the
caller's running statistics. Only the fold differs. Smoothing and equalization then calibrate the
tensors their rewrite created: :func:`calibrate_new`.

Calibration itself has its own pass (calibration/collect.run_pass: histograms in worker threads).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx

from pipeline.calibration.collect import DEFAULT_MEMORY_MB, budgeted_chunks, exposed
from pipeline.calibration.ranges import TensorRange
from pipeline.execution import runtime
from pipeline.graph.layout import Layout

Batch = dict[str, np.ndarray]
Fold = Callable[[dict[str, np.ndarray], int], None]


def run(
    model: onnx.ModelProto,
    tensors: list[str],
    batches: Iterable[Batch],
    samples: int,
    fold: Fold,
    *,
    label: str,
    copies: int,
    layout: Layout | None = None,
    memory_mb: int = DEFAULT_MEMORY_MB,
    graph: onnx.ModelProto | None = None,
    optimize: bool = True,
) -> int:
    """Call ``fold(values, n)`` per chunk of the first ``samples`` samples, ``values`` holding
    ``tensors`` for the chunk's ``n`` samples; returns the samples seen (0 without any).

    ``model``'s activations size the chunks. Without ``graph`` it is what runs, exposing exactly
    ``tensors``; those that are graph inputs come from the feeds, and when all are, no session is
    built at all. ``graph`` is a model built on ``model`` whose outputs include ``tensors``, for
    statistics reduced inside the graph. ``optimize=False`` when copied quantizers must round
    exactly as the Q/DQ model's do.
    """
    layout = layout or Layout()
    inputs = {i.name for i in model.graph.input}
    if graph is not None:
        fetch, direct = list(tensors), []
        sess = runtime.session(graph, "cpu", optimize=optimize)
    else:
        fetch = [t for t in tensors if t not in inputs]
        direct = [t for t in tensors if t in inputs]
        sess = runtime.session(exposed(model, fetch), "cpu", optimize=optimize) if fetch else None
    feed_names = [i.name for i in sess.get_inputs()] if sess is not None else []
    seen = 0
    for feeds, n in budgeted_chunks(model, batches, samples, layout, memory_mb, copies, label):
        values: dict[str, np.ndarray] = {}
        if sess is not None:
            values.update(zip(fetch, runtime.run(sess, {k: feeds[k] for k in feed_names}, fetch)))
        values.update({k: feeds[k] for k in direct})
        fold(values, n)
        seen += n
    return seen


def calibrate_new(
    model: onnx.ModelProto,
    tensors: list[str],
    batches: Callable[[], Iterable[Batch]],
    method: str,
    percentile: float,
    memory_mb: int,
    layout: Layout | None,
    name: str,
) -> dict[str, TensorRange]:
    """Ranges (by ``method``) of the ``tensors`` a rewrite of the FP32 model created, over all of
    ``batches()``; the other tensors are measured on the way and dropped. The calibrator reads a
    file: ``model`` is saved as ``<name>.onnx`` in a temporary folder."""
    from pipeline.calibration.calibrator import calibrate

    with tempfile.TemporaryDirectory(prefix=f"int8pipe-{name}-") as tmp:
        path = Path(tmp) / f"{name}.onnx"
        onnx.save(model, str(path))
        cal = calibrate(path, batches, method, percentile=percentile, histogram_tensors=tensors,
                        memory_mb=memory_mb, layout=layout)  # fmt: skip
    return {k: cal.ranges.tensors[k] for k in tensors if k in cal.ranges.tensors}


def calibrate_streaming(
    model: onnx.ModelProto,
    tensors: list[str],
    batches: Iterable[Batch],
    samples: int,
    method: str,
    percentile: float,
    memory_mb: int,
    layout: Layout | None,
    label: str,
) -> dict[str, TensorRange]:
    """Ranges (by ``method``) of ``tensors`` over the first ``samples`` samples in one streaming pass
    that runs only what they need: cheaper than :func:`calibrate_new` (two passes over every sample,
    every tensor measured), for tensors whose range is bounded by construction (depthwise_scales.py)."""
    from pipeline.calibration.calibrator import check_finite, choose_amax, clipped_fraction
    from pipeline.calibration.histogram import TensorStats
    from pipeline.calibration.methods import METHODS
    from pipeline.graph.model import producers

    stats = {t: TensorStats() for t in tensors}
    fed = {i.name for i in model.graph.input}  # the caller's arrays: copied, as update may write into them

    def fold(values: dict[str, np.ndarray], _: int) -> None:
        for t in tensors:
            stats[t].update(np.array(values[t], np.float32) if t in fed else values[t])

    run(model, tensors, batches, samples, fold, label=label, copies=1, layout=layout, memory_mb=memory_mb)
    check_finite(stats)
    made_by = producers(model)
    out: dict[str, TensorRange] = {}
    for name, st in stats.items():
        amax, clipped, how = st.amax, 0.0, "minmax"
        if METHODS[method].needs_histograms:
            final = st.finalize()
            amax = min(choose_amax(method, final, percentile), st.amax)
            clipped, how = clipped_fraction(final, amax), method
        out[name] = TensorRange(float(st.min), float(st.max), float(amax), float(st.amax), clipped,
                                made_by.get(name, ""), how)  # fmt: skip
    return out
