"""From an FP32 model and batches to a :class:`Ranges` record: the calibration engine's front door."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from pipeline.calibration import histogram, methods
from pipeline.calibration.collect import DEFAULT_MEMORY_MB, Batch, run_pass
from pipeline.calibration.derived import Derived, derivable
from pipeline.calibration.histogram import FinalHistogram, TensorStats
from pipeline.calibration.ranges import Ranges, TensorRange
from pipeline.calibration.spill import Spill
from pipeline.errors import CalibrationError, fail
from pipeline.execution import environment
from pipeline.graph import model as onnx_model
from pipeline.graph.layout import Layout
from pipeline.log import logger

METHODS = tuple(methods.METHODS)


@dataclass
class Calibration:
    ranges: Ranges
    histograms: dict[str, FinalHistogram] = field(default_factory=dict)
    seconds: float = 0.0
    chunk: int = 0  # samples per ONNX Runtime call the memory budget allowed (pass 1)
    sample_bytes: int = 0  # exposed activation bytes per sample (pass 1)


def choose_amax(method: str, hist: FinalHistogram, percentile: float) -> float:
    amax = methods.METHODS[method].amax
    if amax is None:
        raise ValueError(f"{method} takes max |x|, not a histogram")
    return amax(hist.counts, hist.width, percentile)


def rethreshold(ranges: Ranges, histograms: dict[str, FinalHistogram], method: str, percentile: float) -> Ranges:
    """The same measurements under another method: thresholds recomputed from the stored histograms.

    Bit-identical to calibrating again with ``method``: the histograms are the whole input of every
    histogram method, and ``minmax`` is max |x|, which every tensor records. This is how one
    calibration pass serves a sweep over methods.
    """
    params = dict(ranges.params)
    params.pop("percentile", None)
    if method == "percentile":
        params["percentile"] = percentile
    if not methods.METHODS[method].needs_histograms:
        params = {}
    out = Ranges(
        method=method,
        params=params,
        model_sha256=ranges.model_sha256,
        data_digest=ranges.data_digest,
        num_samples=ranges.num_samples,
        environment=ranges.environment,
    )
    for name, r in ranges.tensors.items():
        amax, clipped, how = r.minmax_amax, 0.0, "minmax"
        hist = histograms.get(name)
        if hist is not None and methods.METHODS[method].needs_histograms:
            amax = min(choose_amax(method, hist, percentile), r.minmax_amax)
            clipped, how = clipped_fraction(hist, amax), method
        out.tensors[name] = TensorRange(r.min, r.max, float(amax), r.minmax_amax, clipped, r.producer, how)
    return out


def save_histograms(histograms: dict[str, FinalHistogram], path: Path) -> None:
    names = sorted(histograms)
    bins = max((len(histograms[n].counts) for n in names), default=0)
    counts = np.zeros((len(names), bins))
    for i, n in enumerate(names):
        counts[i, : len(histograms[n].counts)] = histograms[n].counts
    widths = np.array([histograms[n].width for n in names], dtype=np.float64)
    np.savez_compressed(path, names=np.array(names, dtype=str), counts=counts, widths=widths)


def load_histograms(path: Path) -> dict[str, FinalHistogram]:
    with np.load(path, allow_pickle=False) as z:
        return {str(n): FinalHistogram(z["counts"][i].copy(), float(z["widths"][i])) for i, n in enumerate(z["names"])}


def clipped_fraction(hist: FinalHistogram, amax: float) -> float:
    total = hist.counts.sum()
    if total == 0 or hist.width == 0:
        return 0.0
    cum = np.concatenate([[0.0], np.cumsum(hist.counts)])
    below = np.interp(amax, hist.edges, cum)
    return float(max(total - below, 0.0) / total)


def check_finite(stats: dict[str, TensorStats]) -> None:
    bad = [name for name, st in stats.items() if not st.finite]
    if bad:
        shown = ", ".join(repr(b) for b in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        fail(
            CalibrationError,
            f"{len(bad)} tensor(s) took NaN or infinite values on the calibration data ({shown}); no range "
            "can be calibrated from them. Check that the data is preprocessed as the model expects (scale, "
            "mean/std, layout) and that the FP32 model itself runs cleanly on it (e.g. a Log or Div of zero).",
        )


def calibrate(
    model_path: Path,
    batches: Callable[[], Iterable[Batch]],
    method: str = methods.DEFAULT,
    *,
    num_bins: int = 2048,
    percentile: float = 99.99,
    passes: int = 2,
    minmax_inputs: bool = True,
    histogram_tensors: list[str] | None = None,
    memory_mb: int = DEFAULT_MEMORY_MB,
    layout: Layout | None = None,
) -> Calibration:
    """Ranges for every activation tensor of the model at ``model_path``.

    ``batches`` is called once. With ``passes=2`` (histogram methods) the first pass finds each
    tensor's min and max and the second, replaying the same inputs from a temporary file (see
    spill.py), builds exact histograms; ``passes=1`` streams once (see histogram.py).
    Tensors whose range follows exactly from another's (Relu, Clip, reshapes: derived.py) are not
    exposed in the min/max pass. ``histogram_tensors`` limits the histogram method to those tensors
    (the ones the Q/DQ model quantizes); the others get max |x|, marked ``minmax`` in their entry.

    With ``minmax_inputs`` the graph inputs keep their full range whatever the method: their range
    is fixed by preprocessing, and their histograms are often a comb of discrete levels (8-bit
    pixels) on which KL minimisation degenerates and clips real signal.

    ``layout`` says where each input holds its samples (``batch_axes``, ``constants``); default axis 0.
    """
    plan = make_plan(
        model_path,
        method,
        num_bins=num_bins,
        passes=passes,
        minmax_inputs=minmax_inputs,
        histogram_tensors=histogram_tensors,
    )
    stats = plan.new_stats()
    with tempfile.TemporaryDirectory(prefix="int8pipe-calibration-") as tmp:
        spill = Spill(Path(tmp), layout.count if layout is not None else None)
        source = spill.record(batches()) if plan.two_pass else batches()
        measured = {t: stats[t] for t in plan.measured}
        label = "calibration pass 1/2" if plan.two_pass else "calibration batches"
        budget = memory_mb << 20
        first = run_pass(plan.model, measured, source, label, memory_budget=budget, layout=layout)
        plan.complete_min_max(stats)
        if plan.two_pass:
            live = plan.start_histogram_pass(stats)
            run_pass(
                plan.model,
                live,
                spill.replay(),
                "calibration pass 2/2",
                digest=False,
                memory_budget=budget,
                layout=layout,
            )
    cal = plan.result(stats, model_path, percentile, first.num_samples, first.data_digest, plan.start)
    cal.chunk, cal.sample_bytes = first.chunk, first.sample_bytes
    return cal


@dataclass
class Plan:
    """What a calibration measures and how: the same in every process of a sharded calibration.

    ``wanted`` are the tensors given the histogram method; ``derived`` those whose min/max follow
    from another tensor's (not measured in pass 1); with ``two_pass`` pass 2 histograms ``wanted``
    over each tensor's exact [0, max |x|].
    """

    model: onnx.ModelProto
    method: str
    num_bins: int
    passes: int
    minmax_inputs: bool
    histogram_tensors: list[str] | None
    tensors: list[str]
    wanted: set[str]
    two_pass: bool
    derived: dict[str, Derived]
    start: float  # time.perf_counter() when the calibration began

    @property
    def measured(self) -> list[str]:
        """The tensors pass 1 measures (every tensor but the derived ones)."""
        return [t for t in self.tensors if t not in self.derived]

    def new_stats(self) -> dict[str, TensorStats]:
        return {t: TensorStats(self.num_bins, histogram=self.passes == 1 and t in self.wanted) for t in self.tensors}

    def complete_min_max(self, stats: dict[str, TensorStats]) -> None:
        """After pass 1: the derived tensors' min/max from their sources'; NaN/inf refused."""
        for name, rule in self.derived.items():
            src, st = stats[rule.source], stats[name]
            st.finite, st.count = src.finite, src.count
            if src.count and src.finite:
                st.min, st.max = rule.bounds(src.min, src.max)
        check_finite(stats)

    def start_histogram_pass(self, stats: dict[str, TensorStats]) -> dict[str, TensorStats]:
        """Pass 2's statistics: each wanted tensor histogrammed over [0, max |x|]; returns those with a
        non-zero range (an all-zero tensor's histogram is known without running anything)."""
        hist = {t: stats[t] for t in self.tensors if t in self.wanted}
        for st in hist.values():
            st.start_histogram_pass()
        return {t: st for t, st in hist.items() if st.fine is not None}

    def result(
        self,
        stats: dict[str, TensorStats],
        model_path: Path,
        percentile: float,
        num_samples: int,
        data_digest: str,
        start: float,
        extra_params: dict[str, object] | None = None,
    ) -> Calibration:
        """The :class:`Ranges` record (and final histograms) from the complete statistics."""
        method = self.method
        params: dict[str, object] = {}
        if methods.METHODS[method].needs_histograms:
            params = {
                "num_bins": self.num_bins,
                "passes": self.passes,
                "minmax_inputs": self.minmax_inputs,
                "histogram_tensors": "all" if self.histogram_tensors is None else len(self.wanted),
            }
        if method == "percentile":
            params["percentile"] = percentile
        params |= extra_params or {}
        ranges = Ranges(
            method=method,
            params=params,
            model_sha256=onnx_model.sha256(model_path),
            data_digest=data_digest,
            num_samples=num_samples,
            environment=environment.fingerprint() | {"histogram_kernel": histogram.KERNEL},
        )
        producer = onnx_model.producers(self.model)
        hists: dict[str, FinalHistogram] = {}
        for name, st in stats.items():
            maxabs = st.amax
            amax, clipped, how = maxabs, 0.0, "minmax"
            if name in self.wanted:
                final = hists[name] = st.finalize()
                amax = min(choose_amax(method, final, percentile), maxabs)
                clipped, how = clipped_fraction(final, amax), method
            ranges.tensors[name] = TensorRange(
                min=float(st.min),
                max=float(st.max),
                amax=float(amax),
                minmax_amax=float(maxabs),
                clipped_fraction=clipped,
                producer=producer.get(name, ""),
                method=how,
            )
        return Calibration(ranges, hists, time.perf_counter() - start)


def make_plan(
    model_path: Path,
    method: str,
    *,
    num_bins: int = 2048,
    passes: int = 2,
    minmax_inputs: bool = True,
    histogram_tensors: list[str] | None = None,
) -> Plan:
    """Which tensors are measured, derived and histogrammed (see :func:`calibrate`)."""
    if method not in METHODS:
        fail(CalibrationError, f"unknown calibration method {method!r}; use one of {', '.join(METHODS)}.")
    start = time.perf_counter()
    model = onnx_model.load(model_path, check=False)
    tensors = onnx_model.activation_tensors(model)
    inputs = {vi.name for vi in onnx_model.graph_inputs(model)}
    wanted = set(tensors if histogram_tensors is None else histogram_tensors)
    if not methods.METHODS[method].needs_histograms:
        wanted = set()
    elif minmax_inputs:
        wanted -= inputs
    if wanted and histogram.KERNEL != "compiled":
        logger.warning(
            "calibrate: the compiled histogram kernel is not built (no C compiler when int8pipe was installed); "
            "numpy gives the same histograms several times slower. Install a C compiler and reinstall int8pipe."
        )
    two_pass = passes == 2 and bool(wanted)
    derived = derivable(model, tensors, measure=set() if two_pass else wanted)
    return Plan(
        model=model,
        method=method,
        num_bins=num_bins,
        passes=passes,
        minmax_inputs=minmax_inputs,
        histogram_tensors=histogram_tensors,
        tensors=tensors,
        wanted=wanted,
        two_pass=two_pass,
        derived=derived,
        start=start,
    )
