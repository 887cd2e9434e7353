"""Streaming statistics of one tensor: signed min/max and a mergeable histogram of |x|.

Two-pass calibration (the default) first measures min and max and then, after
``start_histogram_pass``, builds each histogram with that range known: the result is exactly
the num_bins histogram over [0, max |x|] that TensorRT builds from one batch holding all the data,
independent of batch size and order. (TensorRT itself, fed several batches, doubles its range when a
batch exceeds it and keeps the half-empty result: order-dependent, as its developer guide warns.) The
single-pass scheme below serves sources that can only be read once.

Single-pass histogram scheme (how growth keeps every count):
  * The histogram has ``num_bins * OVERSAMPLE`` fine bins of equal width starting at 0. The width
    is set by the first batch with a non-zero value, so that batch's max |x| sits on the top edge.
  * When a later batch exceeds the covered range, the width doubles as often as needed and adjacent
    fine bins are summed pairwise: an exact merge, no count is moved across a value it did not
    belong to and none is lost.
  * ``finalize`` re-expresses the fine histogram as exactly ``num_bins`` bins over [0, max |x|],
    TensorRT's layout. If the first batch already held the global max (or there was one batch),
    every final edge falls on a fine edge and the result equals a direct ``num_bins`` histogram.
    Otherwise each fine bin goes whole to the final bin holding its centre: counts stay integers
    (empty bins stay empty, which the entropy method's masks depend on) and a value moves by at most
    half a fine bin, 1/16 to 1/8 of a final bin. That is how batch size and order can change the
    result; tests/test_calibration_methods.py measures it against the exact histogram.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

_compiled_abs_histogram: Callable[[np.ndarray, float, np.ndarray], None] | None
try:  # built by setup.py where a C compiler exists; same counts as the numpy path, several times faster
    from pipeline.calibration._histogram import abs_histogram as _compiled_abs_histogram
except ImportError:  # pragma: no cover - depends on the install
    _compiled_abs_histogram = None

OVERSAMPLE = 8
KERNEL = "compiled" if _compiled_abs_histogram is not None else "numpy"


def add_abs_histogram(
    x: np.ndarray, inv_width: float, counts: np.ndarray, scratch: np.ndarray | None = None, compiled: bool = True
) -> None:
    """``counts[min(int(|x| * inv_width), len(counts) - 1)] += 1`` for every value of float32 ``x``.

    The compiled kernel (pipeline/calibration/_histogram.c) reads ``x`` once; the numpy path
    overwrites ``x`` when it is writable and contiguous. Both compute the bin in float32 and
    truncate, so they agree count for count. ``scratch`` is an optional reusable int32 buffer for
    the numpy path's bin indices (reusing it saves page faults on gigabytes of index arrays).
    """
    if compiled and _compiled_abs_histogram is not None and x.dtype == np.float32 and x.flags.c_contiguous:
        _compiled_abs_histogram(x, float(np.float32(inv_width)), counts)
        return
    bins = len(counts)
    flat = x.reshape(-1) if x.flags.c_contiguous and x.flags.writeable else x.flatten()
    np.abs(flat, out=flat)
    flat *= np.float32(inv_width)
    if scratch is not None and len(scratch) >= len(flat):
        idx = scratch[: len(flat)]
        np.copyto(idx, flat, casting="unsafe")  # truncation: floor for |x|
    else:
        idx = flat.astype(np.int32)
    hist = np.bincount(idx, minlength=bins)
    if len(hist) > bins:  # values on (or rounding past) the top edge
        hist[bins - 1] += hist[bins:].sum()
    counts += hist[:bins]


@dataclass
class FinalHistogram:
    counts: np.ndarray  # float64, num_bins, over [0, amax_observed]
    width: float

    @property
    def edges(self) -> np.ndarray:
        return np.arange(len(self.counts) + 1) * self.width


class TensorStats:
    """min, max and (optionally) the |x| histogram of one tensor, updated batch by batch."""

    def __init__(self, num_bins: int = 2048, histogram: bool = True):
        self.num_bins = num_bins
        self.fine_bins = num_bins * OVERSAMPLE
        self.min = np.inf
        self.max = -np.inf
        self.count = 0
        self.width = 0.0  # fine bin width; 0 until a non-zero value is seen
        self.zeros = 0  # values counted while width was still unknown (all exactly 0)
        self.fine = np.zeros(self.fine_bins, np.int64) if histogram else None
        self.range_final = False  # True in a second pass: min/max known, histogram over [0, amax]
        self.finite = True  # False once a NaN or inf was seen; the calibrator refuses such tensors

    @property
    def amax(self) -> float:
        return float(max(abs(self.min), abs(self.max))) if self.count else 0.0

    def start_histogram_pass(self) -> None:
        """Second pass: keep min/max, histogram exactly ``num_bins`` bins over [0, max |x|]."""
        self.range_final = True
        self.fine_bins = self.num_bins
        self.fine = np.zeros(self.num_bins, np.int64)
        self.width = self.amax / self.num_bins
        if self.width == 0.0:
            self.fine[0] = self.count
            self.fine = None  # nothing to learn: every value is 0

    def update(self, x: np.ndarray, scratch: np.ndarray | None = None) -> None:
        """Add a batch. ``x`` may be overwritten (it is a scratch buffer from the runtime).

        ``scratch``: see :func:`add_abs_histogram`.
        """
        if x.size == 0:
            return
        if not self.range_final:
            lo, hi = float(x.min()), float(x.max())
            if not (math.isfinite(lo) and math.isfinite(hi)):
                self.finite = False  # Python's min() below would drop a NaN; no histogram can hold inf
                return
            self.min, self.max = min(self.min, lo), max(self.max, hi)
            self.count += x.size
        if self.fine is None:
            return
        if not self.range_final:
            batch_amax = max(-lo, hi)
            if batch_amax == 0.0 and self.width == 0.0:
                self.zeros += x.size
                return
            if self.width == 0.0:
                self.width = batch_amax / self.fine_bins
                self.fine[0] += self.zeros
            self._grow_to(batch_amax)
        add_abs_histogram(x, 1.0 / self.width, self.fine, scratch)

    def _grow_to(self, amax: float) -> None:
        assert self.fine is not None
        factor = 1
        while amax > self.width * factor * self.fine_bins:
            factor *= 2
        if factor == 1:
            return
        if factor >= self.fine_bins:
            total = self.fine.sum()
            self.fine[:] = 0
            self.fine[0] = total
        else:
            merged = self.fine.reshape(-1, factor).sum(axis=1)
            self.fine[:] = 0
            self.fine[: len(merged)] = merged
        self.width *= factor

    def finalize(self) -> FinalHistogram:
        """``num_bins`` bins over [0, max |x|] (see the module docstring for exactness)."""
        amax = self.amax
        if amax == 0.0 or self.width == 0.0 or self.fine is None:
            counts = np.zeros(self.num_bins)
            counts[0] = self.count
            return FinalHistogram(counts, 0.0)
        if self.range_final:
            return FinalHistogram(self.fine.astype(np.float64), self.width)
        width = amax / self.num_bins
        centres = (np.arange(self.fine_bins) + 0.5) * self.width
        target = np.minimum((centres / width).astype(np.int64), self.num_bins - 1)
        counts = np.bincount(target, weights=self.fine, minlength=self.num_bins).astype(np.float64)
        return FinalHistogram(counts, width)
