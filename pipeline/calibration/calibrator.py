"""From an FP32 model and batches to a :class:`Ranges` record: the calibration engine's front door."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import environment
from pipeline import model as onnx_model
from pipeline.calibration import methods
from pipeline.calibration.collect import Batch, collect
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
    batches: Iterable[Batch],
    method: str = "entropy",
    num_bins: int = 2048,
    percentile: float = 99.99,
    total_batches: int | None = None,
    minmax_inputs: bool = True,
) -> Calibration:
    """Ranges for every activation tensor of the model at ``model_path``.

    With ``minmax_inputs`` the graph inputs keep their full range whatever the method: their range
    is fixed by preprocessing, and their histograms are often a comb of discrete levels (8-bit
    pixels) on which KL minimisation degenerates and clips real signal.
    """
    if method not in METHODS:
        fail(CalibrationError, f"unknown calibration method {method!r}; use one of {', '.join(METHODS)}.")
    start = time.perf_counter()
    model = onnx_model.load(model_path, check=False)
    tensors = onnx_model.activation_tensors(model)
    producer = onnx_model.producers(model)
    got = collect(model, tensors, batches, histogram=method != "minmax", num_bins=num_bins, total=total_batches)
    params: dict[str, object] = {"num_bins": num_bins, "minmax_inputs": minmax_inputs} if method != "minmax" else {}
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
            min=float(st.min), max=float(st.max), amax=float(amax), minmax_amax=float(maxabs),
            clipped_fraction=clipped, producer=producer.get(name, ""),
        )
    return Calibration(ranges, hists, time.perf_counter() - start)
