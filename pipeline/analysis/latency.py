"""Latency statistics of repeated timing runs: the figures the engine step logs and compares.

Timings come in repeats (each a run of consecutive inferences after one warm-up), so that a figure
says how much it moved between runs as well as what it was: a GPU whose clocks or neighbours change
during a run shows it in the spread before it shows in the median.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    p50_ms: float  # median over every timed inference of every repeat
    p99_ms: float  # 99th percentile, linear interpolation (numpy's default)
    mean_ms: float
    throughput: float  # samples per second at the median: batch * 1000 / p50
    iqr_rel: float  # (p75 - p25) / p50: how much single inferences vary
    repeat_spread: float  # (max - min) / median of the per-repeat medians: how much runs disagree
    repeat_medians_ms: tuple[float, ...]
    samples: int  # timed inferences in all

    def metrics(self, prefix: str) -> dict[str, float]:
        """The MLflow metrics: ``<prefix>.latency_p50_ms``, ``..._p99_ms``, ``.throughput``,
        ``.latency_iqr_rel``, ``.repeat_spread``."""
        return {
            f"{prefix}.latency_p50_ms": self.p50_ms,
            f"{prefix}.latency_p99_ms": self.p99_ms,
            f"{prefix}.throughput": self.throughput,
            f"{prefix}.latency_iqr_rel": self.iqr_rel,
            f"{prefix}.repeat_spread": self.repeat_spread,
        }

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def summarize(repeats: Sequence[Sequence[float] | np.ndarray] | np.ndarray, batch: int) -> LatencyStats:
    """Statistics of per-inference latencies in milliseconds, one sequence per repeat, for inferences
    of ``batch`` samples each. Raises ValueError on no samples or a non-positive latency."""
    runs = [np.asarray(r, dtype=np.float64).ravel() for r in repeats]
    runs = [r for r in runs if r.size]
    if not runs:
        raise ValueError("no latencies to summarize")
    every = np.concatenate(runs)
    if not np.all(np.isfinite(every)) or every.min() <= 0:
        raise ValueError("latencies must be positive, finite milliseconds")
    p25, p50, p75, p99 = np.percentile(every, [25, 50, 75, 99])
    medians = np.array([np.median(r) for r in runs])
    return LatencyStats(
        p50_ms=float(p50),
        p99_ms=float(p99),
        mean_ms=float(every.mean()),
        throughput=float(batch * 1000.0 / p50),
        iqr_rel=float((p75 - p25) / p50),
        repeat_spread=float((medians.max() - medians.min()) / np.median(medians)),
        repeat_medians_ms=tuple(float(m) for m in medians),
        samples=int(every.size),
    )


def speedup(baseline: LatencyStats, candidate: LatencyStats) -> float:
    """How many times faster ``candidate`` runs than ``baseline`` at the median (above 1: faster)."""
    return baseline.p50_ms / candidate.p50_ms
