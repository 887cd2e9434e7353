"""Streaming statistics of one tensor: signed min/max and a mergeable histogram of |x|.

Two-pass calibration (the default) first measures max |x| and then builds each histogram with
that range known (``known_amax``): the result is exactly TensorRT's num_bins histogram over
[0, max |x|], independent of batch size and order. The single-pass scheme below serves sources
that can only be read once.

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

from dataclasses import dataclass

import numpy as np

OVERSAMPLE = 8


@dataclass
class FinalHistogram:
    counts: np.ndarray  # float64, num_bins, over [0, amax_observed]
    width: float

    @property
    def edges(self) -> np.ndarray:
        return np.arange(len(self.counts) + 1) * self.width


class TensorStats:
    """min, max and (optionally) the |x| histogram of one tensor, updated batch by batch."""

    def __init__(self, num_bins: int = 2048, histogram: bool = True, known_amax: float | None = None):
        self.num_bins = num_bins
        self.fine_bins = num_bins * OVERSAMPLE
        self.histogram = histogram
        self.min = np.inf
        self.max = -np.inf
        self.count = 0
        self.width = 0.0  # fine bin width; 0 until a non-zero value is seen
        self.zeros = 0  # values counted while width was still unknown (all exactly 0)
        self.fine = np.zeros(self.fine_bins, np.int64) if histogram else None
        if known_amax:  # range known from a first pass: edges final from the start, no growth
            self.width = known_amax / self.fine_bins

    @property
    def amax(self) -> float:
        return float(max(abs(self.min), abs(self.max))) if self.count else 0.0

    def update(self, x: np.ndarray) -> None:
        """Add a batch. ``x`` may be overwritten (it is a scratch buffer from the runtime)."""
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += x.size
        if self.fine is None:
            return
        batch_amax = max(-lo, hi)
        if batch_amax == 0.0 and self.width == 0.0:
            self.zeros += x.size
            return
        if self.width == 0.0:
            self.width = batch_amax / self.fine_bins
            self.fine[0] += self.zeros
        self._grow_to(batch_amax)
        a = (
            np.abs(x.reshape(-1), out=x.reshape(-1))
            if x.flags.writeable and x.flags.c_contiguous
            else np.abs(x.reshape(-1))
        )
        a *= np.float32(1.0 / self.width)
        idx = a.astype(np.int32)
        np.minimum(idx, self.fine_bins - 1, out=idx)
        self.fine += np.bincount(idx, minlength=self.fine_bins)

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
        assert self.fine is not None, "histogram statistics were not collected"
        amax = self.amax
        if amax == 0.0 or self.width == 0.0:
            counts = np.zeros(self.num_bins)
            counts[0] = self.count
            return FinalHistogram(counts, 0.0)
        width = amax / self.num_bins
        centres = (np.arange(self.fine_bins) + 0.5) * self.width
        target = np.minimum((centres / width).astype(np.int64), self.num_bins - 1)
        counts = np.bincount(target, weights=self.fine, minlength=self.num_bins).astype(np.float64)
        return FinalHistogram(counts, width)
