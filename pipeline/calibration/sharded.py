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

import dataclasses
import hashlib
import inspect
import shutil
import socket
import tempfile
import time
import zipfile
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
from pipeline.settings.config import DataSource
from pipeline.sources import data
from pipeline.user_code import import_object

Batch = dict[str, np.ndarray]
SHARD_ARGS = ("shard_index", "num_shards")
PLACEMENT_TIMEOUT_S = 120.0  # the actors must be running by then (a cluster without free CPUs never places them)


def takes_shard_args(fn: Any) -> bool:
    """Whether ``fn`` names both ``shard_index`` and ``num_shards`` as parameters (``**kwargs`` is not
    enough: a function that ignores them would have every worker read every sample)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return all(name in params and params[name].kind in kinds for name in SHARD_ARGS)


def shard_range(total: int, index: int, num: int) -> tuple[int, int]:
    """Samples [lo, hi) of shard ``index`` of ``num``: contiguous, sizes differing by at most one."""
    return total * index // num, total * (index + 1) // num


def _npz_length(path: str, layout: Layout) -> int:
    """Samples in an npz archive, from a batched array's header (the data stays compressed)."""
    with zipfile.ZipFile(path) as zf:
        name = next(
            n[: -len(".npy")] for n in zf.namelist() if n != f"{data.LABELS}.npy" and n[: -len(".npy")] not in
            layout.constants
        )  # fmt: skip
        with zf.open(f"{name}.npy") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, _ = read(f)
    return int(shape[layout.axis(name) or 0])


def _rows(batches: Iterator[Batch], lo: int, hi: int, layout: Layout) -> Iterator[Batch]:
    """The samples [lo, hi) of a stream of batches, counted from its first sample."""
    seen = 0
    for batch in batches:
        n = layout.count(batch)
        a, b = max(lo - seen, 0), min(hi - seen, n)
        seen += n
        if a < b:
            yield layout.take(batch, a, b)
        if seen >= hi:
            break


def shard_batches(
    src: DataSource, index: int, num: int, batch_size: int, specs: data.Specs, dirs: list[Path], what: str
) -> Iterator[Batch]:
    """Shard ``index`` of ``num`` of the calibration source; together the shards yield exactly the
    samples of ``data.batches(src, ...)``, each once (see the module docstring)."""
    where = f"{what} (shard {index + 1}/{num})"
    layout = Layout.of(src)
    if src.npy:
        arrays = {k: np.load(p, mmap_mode="r", allow_pickle=False) for k, p in src.npy.items()}
        total = layout.count(arrays)
        lo, hi = shard_range(min(total, src.limit or total), index, num)
        for start in range(lo, hi, batch_size):  # memory-mapped: a worker reads only its own rows
            batch = {k: np.asarray(v) for k, v in layout.take(arrays, start, min(start + batch_size, hi)).items()}
            data.check_batch(batch, specs, f"{where} samples {start}-{start + layout.count(batch)}", layout)
            yield batch
    elif src.images:
        files = sorted(p for p in Path(src.images.dir).iterdir() if p.suffix.lower() in data.IMAGE_SUFFIXES)
        files = files[: src.limit] if src.limit else files
        lo, hi = shard_range(len(files), index, num)
        if lo == hi:
            return
        with tempfile.TemporaryDirectory(prefix="int8pipe-shard-images-") as tmp:
            for f in files[lo:hi]:  # a folder of this shard's files: decoded by the same code, in the same order
                (Path(tmp) / f.name).symlink_to(f.resolve())
            sub = dataclasses.replace(src, images=dataclasses.replace(src.images, dir=tmp), limit=None)
            yield from data.batches(sub, batch_size, specs, dirs, where)
    elif src.npz:
        total = _npz_length(src.npz, layout)
        lo, hi = shard_range(min(total, src.limit or total), index, num)
        if lo < hi:
            yield from _rows(data.batches(src, batch_size, specs, dirs, where), lo, hi, layout)
    else:
        fn = import_object(src.python or "", dirs, "python data source")
        if takes_shard_args(fn) and src.limit is None:
            sub = dataclasses.replace(src, args={**src.args, "shard_index": index, "num_shards": num})
            yield from data.batches(sub, batch_size, specs, dirs, where)
        else:  # every worker reads the source; each keeps every num-th batch
            for i, batch in enumerate(data.batches(src, batch_size, specs, dirs, where)):
                if i % num == index:
                    yield batch


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
        p = run_pass(self.model, stats, self.spill.record(source) if spill else source, label,
                     memory_budget=memory_budget, layout=self.layout)  # fmt: skip
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
            self.model, stats, self.spill.replay(), label, digest=False, memory_budget=memory_budget,
            layout=self.layout,
        )  # fmt: skip
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
    batch_size: int,
    specs: data.Specs,
    dirs: list[Path],
    what: str,
    workers: int,
    address: str,
    method: str = "entropy",
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
        fail(ConfigError, "steps.calibrate.workers > 1 needs passes: 2 (or method: minmax): single-pass "
                          "histograms depend on the order batches arrive in and cannot be merged exactly.")  # fmt: skip
    plan = make_plan(model_path, method, num_bins, passes, minmax_inputs, histogram_tensors)
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
                refs = [a.pass2.remote(bounds, f"calibration shard {i + 1}/{workers} pass 2/2", budget)
                        for i, a in enumerate(actors)]  # fmt: skip
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
