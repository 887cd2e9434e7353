"""Calibration sharded across Ray workers, with ranges bit for bit those of one process.

``workers`` actors each read their shard of the calibration data (:func:`shard_batches`) and run
pass 1 over it: the min, max and count of every measured tensor, the model inputs spilled to the
worker's own disk. The driver merges them (min of the minima, max of the maxima, counts summed:
all exact), completes the derived tensors and refuses NaN/inf exactly as :func:`calibrate` does,
and sends every histogrammed tensor's global [min, max] back. Pass 2: each actor histograms its
spilled samples over that same [0, max |x|] with the same ``num_bins`` bins, so every value lands
in the bin it lands in on one machine and the sum of the shards' integer counts *is* the
single-process histogram. The thresholds then come from the same code (:meth:`Plan.result`).

Only the exact two-pass scheme (or ``minmax``) can be sharded: ``passes: 1`` grows each histogram
from the first batch's range, so it depends on which batches a worker sees first.

The shards together hold exactly the samples of the unsharded source: ``npz``, ``npy`` and
``images`` sources are cut by sample index into contiguous ranges (after ``limit``); a ``python:``
function that takes ``shard_index`` and ``num_shards`` keyword arguments is called once per shard
with them (it must split its samples itself); any other function is read whole by every worker,
which keeps every ``num_shards``-th batch. The samples' digest in ``ranges.json`` is the SHA-256
of the shards' digests (the single-process digest hashes the samples in one order, which no
shard sees). Nothing here talks to MLflow.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from pipeline.calibration.calibrator import Calibration, make_plan
from pipeline.calibration.collect import DEFAULT_MEMORY_MB, run_pass
from pipeline.calibration.histogram import TensorStats
from pipeline.calibration.methods import METHODS
from pipeline.calibration.spill import Spill
from pipeline.errors import CalibrationError, ConfigError, DataError, Int8PipeError, fail
from pipeline.execution.ray_cluster import connected
from pipeline.graph.layout import Layout
from pipeline.log import logger
from pipeline.sources import data
from pipeline.sources.kinds import kind_of
from pipeline.sources.spec import DataSource

Batch = dict[str, np.ndarray]
PLACEMENT_TIMEOUT_S = 120.0  # the actors must be running by then (a cluster without free CPUs never places them)


def shard_batches(
    src: DataSource, index: int, num: int, batch_size: int, specs: data.Specs, dirs: list[Path], what: str
) -> Iterator[Batch]:
    """Shard ``index`` of ``num`` of the calibration source; together the shards yield exactly the
    samples of ``data.batches(src, ...)``, each once (each kind knows how: see the module docstring)."""
    where = f"{what} (shard {index + 1}/{num})"
    return kind_of(src).shard(src, index, num, data.reading(batch_size, specs, dirs), where)


class ShardWorker:
    """One shard's calibration, as a Ray actor: pass 1 keeps the shard's inputs on the worker's disk
    for pass 2, so the data source is read once, as in one process."""

    def __init__(self, model_bytes: bytes, num_bins: int):
        self.model = onnx.load_from_string(model_bytes)
        self.num_bins = num_bins
        self.folder = tempfile.mkdtemp(prefix="int8pipe-shard-")
        self.spill = Spill(Path(self.folder))
        self.layout = Layout()  # the data source's, set by pass 1

    def ready(self) -> str:
        return socket.gethostname()

    def pass1(
        self,
        src: DataSource,
        index: int,
        num: int,
        batch_size: int,
        specs: data.Specs,
        dirs: list[Path],
        what: str,
        measured: list[str],
        spill: bool,
        memory_budget: int,
    ) -> dict[str, Any]:
        stats = {t: TensorStats(self.num_bins, histogram=False) for t in measured}
        self.layout = Layout.of(src)
        self.spill.count = self.layout.count
        source = shard_batches(src, index, num, batch_size, specs, dirs, what)
        label = f"calibration shard {index + 1}/{num} pass 1/{2 if spill else 1}"
        p = run_pass(
            self.model,
            stats,
            self.spill.record(source) if spill else source,
            label,
            memory_budget=memory_budget,
            layout=self.layout,
        )
        return {
            "host": socket.gethostname(),
            "num_samples": p.num_samples,
            "digest": p.data_digest,
            "chunk": p.chunk,
            "sample_bytes": p.sample_bytes,
            "stats": {t: (st.min, st.max, st.count, st.finite) for t, st in stats.items()},
        }

    def pass2(self, bounds: dict[str, tuple[float, float, int]], label: str, memory_budget: int) -> dict[str, Any]:
        """Histograms of the spilled samples over each tensor's global [0, max |x|]."""
        stats = {}
        for name, (lo, hi, count) in bounds.items():
            st = TensorStats(self.num_bins, histogram=False)
            st.min, st.max, st.count = lo, hi, count
            st.start_histogram_pass()
            stats[name] = st
        run_pass(
            self.model,
            stats,
            self.spill.replay(),
            label,
            digest=False,
            memory_budget=memory_budget,
            layout=self.layout,
        )
        return {name: st.fine for name, st in stats.items()}

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _get(ray: Any, refs: list[Any], what: str) -> list[Any]:
    """``ray.get`` that turns a shard's failure into the user error it was, naming the shard."""
    out = []
    for i, ref in enumerate(refs):
        try:
            out.append(ray.get(ref))
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, Int8PipeError):
                raise type(cause)(f"calibration shard {i + 1}/{len(refs)}: {cause}") from None
            raise
        except ray.exceptions.RayError as exc:  # the actor's process or node died
            fail(
                CalibrationError,
                f"{what}: the Ray worker calibrating shard {i + 1}/{len(refs)} died "
                f"({str(exc).strip().splitlines()[0][:300]}); nothing was written. Run the step again.",
            )
    return out


def calibrate_sharded(
    model_path: Path,
    src: DataSource,
    method: str = "entropy",
    *,
    batch_size: int,
    specs: data.Specs,
    dirs: list[Path],
    what: str,
    workers: int,
    address: str,
    num_bins: int = 2048,
    percentile: float = 99.99,
    passes: int = 2,
    minmax_inputs: bool = True,
    histogram_tensors: list[str] | None = None,
    memory_mb: int = DEFAULT_MEMORY_MB,
    num_cpus: float = 1.0,
) -> Calibration:
    """:func:`~pipeline.calibration.calibrator.calibrate` over ``workers`` shards of ``src`` on the Ray
    cluster at ``address``; the result (every min, max and amax) is identical to one process's."""
    if passes == 1 and METHODS[method].needs_histograms:
        fail(
            ConfigError,
            "steps.calibrate.workers > 1 needs passes: 2 (or method: minmax): single-pass "
            "histograms depend on the order batches arrive in and cannot be merged exactly.",
        )
    plan = make_plan(
        model_path,
        method,
        num_bins=num_bins,
        passes=passes,
        minmax_inputs=minmax_inputs,
        histogram_tensors=histogram_tensors,
    )
    budget = memory_mb << 20
    with connected(address, "steps.calibrate.workers") as ray:
        actor = ray.remote(num_cpus=num_cpus, max_restarts=0, max_task_retries=0)(ShardWorker)
        model_ref = ray.put(model_path.read_bytes())
        actors = [actor.remote(model_ref, num_bins) for _ in range(workers)]
        try:
            ready = [a.ready.remote() for a in actors]
            placed, _ = ray.wait(ready, num_returns=len(ready), timeout=PLACEMENT_TIMEOUT_S)
            if len(placed) < len(ready):
                fail(
                    CalibrationError,
                    f"steps.calibrate.workers: only {len(placed)} of {workers} calibration workers "
                    f"({num_cpus:g} CPU each) started on the Ray cluster at {address} within "
                    f"{PLACEMENT_TIMEOUT_S:.0f} s. Add nodes or CPUs, or lower workers (a trial of a Ray "
                    "sweep holds sweep.ray.num_cpus CPUs while it calibrates).",
                )
            logger.info("calibrate: %d shards on %s", workers, ", ".join(sorted(set(ray.get(ready)))))
            first = _get(
                ray,
                [
                    a.pass1.remote(src, i, workers, batch_size, specs, dirs, what, plan.measured, plan.two_pass, budget)
                    for i, a in enumerate(actors)
                ],
                what,
            )
            stats = plan.new_stats()
            for shard in first:
                for name, (lo, hi, count, finite) in shard["stats"].items():
                    st = stats[name]
                    st.min, st.max = min(st.min, lo), max(st.max, hi)
                    st.count += count
                    st.finite = st.finite and finite
            if sum(s["num_samples"] for s in first) == 0:
                fail(DataError, f"{what}: the data source produced no samples (in any of the {workers} shards).")
            plan.complete_min_max(stats)
            if plan.two_pass:
                live = plan.start_histogram_pass(stats)
                bounds = {t: (st.min, st.max, st.count) for t, st in live.items()}
                refs = [
                    a.pass2.remote(bounds, f"calibration shard {i + 1}/{workers} pass 2/2", budget)
                    for i, a in enumerate(actors)
                ]
                for counts in _get(ray, refs, what):
                    for name, st in live.items():
                        assert st.fine is not None
                        st.fine += counts[name]  # same bins everywhere: integer counts add up exactly
        finally:  # the shards' spill folders removed, then the actors ended
            closing = [a.close.remote() for a in actors]
            ray.wait(closing, num_returns=len(closing), timeout=30)
            for a in actors:
                ray.kill(a, no_restart=True)
    digest = hashlib.sha256(b"sharded:" + ",".join(s["digest"] for s in first).encode()).hexdigest()
    cal = plan.result(stats, model_path, percentile, sum(s["num_samples"] for s in first), digest, plan.start)
    cal.ranges.environment["shards"] = [{"host": s["host"], "samples": s["num_samples"]} for s in first]
    cal.chunk, cal.sample_bytes = first[0]["chunk"], first[0]["sample_bytes"]
    cal.seconds = time.perf_counter() - plan.start
    return cal
