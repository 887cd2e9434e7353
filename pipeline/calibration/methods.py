"""Choosing a symmetric threshold (amax) from a histogram of |x|, and the registry of methods.

Each function takes bin counts over [0, width * len(counts)] and returns amax. They are plain
numerics: no ONNX, no MLflow. ``METHODS`` names every method with what the rest of int8pipe needs
of it (its threshold function, the TensorRT cache algorithm).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

QUANT_LEVELS = 128  # |x| maps onto 128 levels of a signed int8


def entropy_amax(counts: np.ndarray, width: float, start_bin: int = 128, levels: int = QUANT_LEVELS) -> float:
    """TensorRT's EntropyCalibration2 threshold, all candidates evaluated at once.

    For each candidate i (``start_bin`` .. ``len(counts)``): P is bins[:i] with all outlier counts
    folded into bin i-1; Q quantises bins[:i] into ``levels`` chunks (bin j -> chunk j*levels//i)
    and spreads each chunk's mass evenly over its non-empty bins. The threshold is the upper edge of
    bin i-1 for the i minimising KL(P||Q); ties go to the smaller threshold. As in NVIDIA's
    pytorch-quantization, Q's mass and its non-empty mask come from bins[:i] without the outliers, so
    a candidate whose last bin is empty while outliers exist has infinite divergence. Before the
    search the first bin's count is replaced by the second's: NVIDIA describes TensorRT as discarding
    the first bin, which holds the huge spike of exact zeros after a ReLU and would otherwise
    dominate both distributions.

    KL is expanded with prefix sums so that each candidate costs O(levels), not O(i):
    N*KL = sum P log P - sum P log Q - N log N + N log H_i, with H_i = sum(bins[:i]).
    """
    h = np.array(counts, dtype=np.float64)
    nb = len(h)
    if width <= 0 or h.sum() == 0:
        return 0.0
    if nb > 1:
        h[0] = h[1]  # discard the first bin, dominated by (ReLU) zeros and noise, as TensorRT does
    start = min(start_bin, nb)
    cand = np.arange(start, nb + 1)
    total = h.sum()
    prefix = np.concatenate([[0.0], np.cumsum(h)])
    nonzero = np.concatenate([[0], np.cumsum(h > 0)])
    hlogh = np.concatenate([[0.0], np.cumsum(np.where(h > 0, h * np.log(np.where(h > 0, h, 1.0)), 0.0))])

    kept = prefix[cand]  # H_i
    outliers = total - kept
    last = h[cand - 1] + outliers  # P'[i-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        p_log_p = hlogh[cand - 1] + np.where(last > 0, last * np.log(np.where(last > 0, last, 1.0)), 0.0)
        k = np.arange(levels + 1)
        bounds = (k[None, :] * cand[:, None] + levels - 1) // levels  # chunk starts, ceil(k*i/levels)
        s = prefix[bounds[:, 1:]] - prefix[bounds[:, :-1]]
        n = nonzero[bounds[:, 1:]] - nonzero[bounds[:, :-1]]
        q = np.where(n > 0, s / np.where(n > 0, n, 1), 0.0)
        p_log_q = np.where(s > 0, s * np.log(np.where(q > 0, q, 1.0)), 0.0).sum(axis=1)
        # outlier mass sits on bin i-1, whose Q value is its chunk's mean, or 0 if bin i-1 is empty
        q_last = np.where(h[cand - 1] > 0, q[np.arange(len(cand)), (cand - 1) * levels // cand], 0.0)
        has_out = outliers > 0
        p_log_q = p_log_q + np.where(has_out, outliers * np.log(np.where(q_last > 0, q_last, 1.0)), 0.0)
        kl = (p_log_p - p_log_q) / total - np.log(total) + np.log(kept)
        kl = np.where(has_out & (q_last <= 0), np.inf, kl)
        kl = np.where(kept > 0, kl, np.inf)
    best = int(np.argmin(kl))
    if not np.isfinite(kl[best]):
        return float(width * nb)
    return float(cand[best] * width)


def percentile_amax(counts: np.ndarray, width: float, percentile: float) -> float:
    """The ``percentile``-th percentile of |x|, interpolated linearly inside its bin."""
    h = np.asarray(counts, dtype=np.float64)
    total = h.sum()
    if width <= 0 or total == 0:
        return 0.0
    target = total * percentile / 100.0
    cum = np.cumsum(h)
    j = int(min(np.searchsorted(cum, target, side="left"), len(h) - 1))
    below = cum[j - 1] if j > 0 else 0.0
    frac = (target - below) / h[j] if h[j] > 0 else 1.0
    return float((j + min(max(frac, 0.0), 1.0)) * width)


def mse_amax(counts: np.ndarray, width: float, start_bin: int = 128, block: int = 256) -> float:
    """The bin edge (from ``start_bin``) minimising the squared error of fake-quantising bin centres.

    Every value is represented by its bin centre c; with amax t and scale s = t/127 its error is
    (c - s*clip(round(c/s), 0, 127))^2, which covers both rounding (inside) and clipping (outside).
    """
    h = np.asarray(counts, dtype=np.float64)
    nb = len(h)
    if width <= 0 or h.sum() == 0:
        return 0.0
    used = np.nonzero(h)[0]
    centres = (used + 0.5) * width
    weights = h[used]
    cand = np.arange(min(start_bin, nb), nb + 1)
    errors = np.empty(len(cand))
    for b in range(0, len(cand), block):
        t = cand[b : b + block, None] * width
        s = t / 127.0
        q = np.clip(np.round(centres[None, :] / s), 0, 127) * s
        errors[b : b + block] = ((q - centres[None, :]) ** 2 * weights[None, :]).sum(axis=1)
    return float(cand[int(np.argmin(errors))] * width)


@dataclass(frozen=True)
class Method:
    """One calibration method: everything int8pipe needs to know about it, in one place."""

    name: str
    # amax from a histogram of |x| (counts, bin width, percentile); None: max |x|, no histogram needed
    amax: Callable[[np.ndarray, float, float], float] | None
    # the algorithm a TensorRT cache header names; TensorRT has no percentile or MSE calibrator, so
    # their caches carry the name of IInt8EntropyCalibrator2, through which most deployments read one
    trt_algorithm: str

    @property
    def needs_histograms(self) -> bool:
        return self.amax is not None


DEFAULT = "mse"  # steps.calibrate.method's default and calibrate()'s

# The registry: a new method is one entry here (and its name in CalibrateConfig.method's Literal,
# which tests/test_calibration_methods.py holds to this list).
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("minmax", None, "MinMaxCalibration"),
        Method("entropy", lambda c, w, p: entropy_amax(c, w), "EntropyCalibration2"),
        Method("percentile", lambda c, w, p: percentile_amax(c, w, p), "EntropyCalibration2"),
        Method("mse", lambda c, w, p: mse_amax(c, w), "EntropyCalibration2"),
    )
}
