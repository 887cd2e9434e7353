"""From an FP32 model and batches to a :class:`Ranges` record: the calibration engine's front door."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import environment, runtime
from pipeline import model as onnx_model
from pipeline.calibration import methods
from pipeline.calibration.collect import Batch, collect, expose
from pipeline.calibration.histogram import FinalHistogram
from pipeline.calibration.ranges import Ranges, TensorRange
from pipeline.errors import CalibrationError, fail

METHODS = ("minmax", "entropy", "percentile", "mse")


@dataclass
class Calibration:
    ranges: Ranges
    histograms: dict[str, FinalHistogram] = field(default_factory=dict)
    seconds: float = 0.0


def choose_amax(method: str, hist: FinalHistogram, percentile: float) -> float:
    if method == "entropy":
        return methods.entropy_amax(hist.counts, hist.width)
    if method == "percentile":
        return methods.percentile_amax(hist.counts, hist.width, percentile)
    if method == "mse":
        return methods.mse_amax(hist.counts, hist.width)
    raise ValueError(method)


def clipped_fraction(hist: FinalHistogram, amax: float) -> float:
    total = hist.counts.sum()
    if total == 0 or hist.width == 0:
        return 0.0
    cum = np.concatenate([[0.0], np.cumsum(hist.counts)])
    below = np.interp(amax, hist.edges, cum)
    return float(max(total - below, 0.0) / total)


def calibrate(
    model_path: Path,
    batches: Callable[[], Iterable[Batch]],
    method: str = "entropy",
    num_bins: int = 2048,
    percentile: float = 99.99,
    passes: int = 2,
    minmax_inputs: bool = True,
) -> Calibration:
    """Ranges for every activation tensor of the model at ``model_path``.

    With ``minmax_inputs`` the graph inputs keep their full range whatever the method: their range
    is fixed by preprocessing, and their histograms are often a comb of discrete levels (8-bit
    pixels) on which KL minimisation degenerates and clips real signal.

    ``batches`` is called once per pass. With ``passes=2`` (histogram methods) the first pass finds
    max |x| and the second builds exact histograms; ``passes=1`` streams once (see histogram.py).
    """
    if method not in METHODS:
        fail(CalibrationError, f"unknown calibration method {method!r}; use one of {', '.join(METHODS)}.")
    start = time.perf_counter()
    model = onnx_model.load(model_path, check=False)
    tensors = onnx_model.activation_tensors(model)
    producer = onnx_model.producers(model)
    sess = runtime.session(expose(model, tensors), "cpu")
    two_pass = method != "minmax" and passes == 2
    got = collect(
        sess,
        tensors,
        batches(),
        histogram=method != "minmax" and not two_pass,
        num_bins=num_bins,
        label="calibration pass 1/2" if two_pass else "calibration batches",
    )
    if two_pass:
        first = got
        got = collect(
            sess,
            tensors,
            batches(),
            histogram=True,
            num_bins=num_bins,
            known_amax={k: v.amax for k, v in first.stats.items()},
            label="calibration pass 2/2",
        )
        if got.data_digest != first.data_digest:
            fail(
                CalibrationError,
                "the calibration data changed between the two passes (a python: source that is "
                "not deterministic?); make it repeatable or set steps.calibrate.passes: 1.",
            )
    params: dict[str, object] = {}
    if method != "minmax":
        params = {"num_bins": num_bins, "passes": passes, "minmax_inputs": minmax_inputs}
    inputs = {vi.name for vi in onnx_model.graph_inputs(model)}
    if method == "percentile":
        params["percentile"] = percentile
    ranges = Ranges(
        method=method,
        params=params,
        model_sha256=onnx_model.sha256(model_path),
        data_digest=got.data_digest,
        num_samples=got.num_samples,
        environment=environment.fingerprint(),
    )
    hists: dict[str, FinalHistogram] = {}
    for name, st in got.stats.items():
        maxabs = st.amax
        amax, clipped = maxabs, 0.0
        if method != "minmax":
            hist = hists[name] = st.finalize()
            if not (minmax_inputs and name in inputs):
                amax = min(choose_amax(method, hist, percentile), maxabs)
                clipped = clipped_fraction(hist, amax)
        ranges.tensors[name] = TensorRange(
            min=float(st.min),
            max=float(st.max),
            amax=float(amax),
            minmax_amax=float(maxabs),
            clipped_fraction=clipped,
            producer=producer.get(name, ""),
        )
    return Calibration(ranges, hists, time.perf_counter() - start)
