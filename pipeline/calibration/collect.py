"""Run an FP32 model over calibration batches and gather per-tensor statistics.

The calibrated tensors are exposed as extra graph outputs, so one ONNX Runtime call per chunk of at
most ``CHUNK`` samples yields them all; only that chunk's activations are alive, so memory depends
on the model and the chunk, never on the number of samples. While numpy digests chunk k in worker
threads, ONNX Runtime already computes chunk k+1 (both release the GIL for most of their loops).
(Reducing inside the ONNX graph instead was measured slower: ORT's ReduceMin/Max and Abs/Mul/Cast
chains cost more than numpy's passes over the copied outputs.)
"""

from __future__ import annotations

import hashlib
import itertools
import queue
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from pipeline.calibration import histogram
from pipeline.calibration.histogram import TensorStats
from pipeline.execution import runtime
from pipeline.graph.layout import Layout
from pipeline.limits import DEFAULT_MEMORY_MB
from pipeline.log import logger, progress
from pipeline.sources.data import rechunk

Batch = dict[str, np.ndarray]
CHUNK = 8  # samples per ONNX Runtime call while calibrating, at most
WORKERS = 2  # threads digesting a chunk while ONNX Runtime computes the next
# Copies of a chunk's exposed activations alive at once: the two bound output sets, and about one
# more inside ONNX Runtime (its arena holds the same tensors while it computes them).
COPIES = 3


@dataclass
class Pass:
    num_samples: int
    data_digest: str  # SHA-256 of the samples seen, in order
    chunk: int = CHUNK  # samples per ONNX Runtime call, as the memory budget allowed
    sample_bytes: int = 0  # exposed activation bytes per sample, measured on the first sample


def chunk_for(sample_bytes: int, budget_bytes: int | None) -> int:
    """Samples per call so that ``COPIES`` chunks of activations fit ``budget_bytes``."""
    if not budget_bytes or sample_bytes <= 0:
        return CHUNK
    return max(1, min(CHUNK, budget_bytes // (COPIES * sample_bytes)))


def _measure(sess: Any, names: list[str], batches: Iterable[Batch], layout: Layout) -> tuple[int, Iterable[Batch]]:
    """Exposed activation bytes of one sample (run on the first sample), and the batches untouched."""
    it = iter(batches)
    first = next(it, None)
    if first is None:
        return 0, []
    feeds = layout.take({k: v for k, v in first.items() if k != "labels"}, 0, 1)
    size = sum(int(v.nbytes) for v in sess.run(names, feeds))
    return size, itertools.chain([first], it)


def activation_sizes(model: onnx.ModelProto, first: Batch, layout: Layout) -> dict[str, int]:
    """Bytes of each activation of ``model`` for one sample, measured on the first sample of ``first``."""
    from pipeline.execution import runtime
    from pipeline.graph.model import activation_tensors

    names = activation_tensors(model)
    sess = runtime.session(exposed(model, names), "cpu")
    feeds = layout.take({k: first[k] for k in (i.name for i in sess.get_inputs())}, 0, 1)
    return {name: int(v.nbytes) for name, v in zip(names, sess.run(names, feeds))}


def activation_bytes(model: onnx.ModelProto, first: Batch, layout: Layout) -> int:
    """Bytes of every activation of ``model`` for one sample, measured on the first sample of ``first``."""
    return sum(activation_sizes(model, first, layout).values())


def samples_per_call(model: onnx.ModelProto, first: Batch, layout: Layout, memory_mb: int, copies: int) -> int:
    """Samples per ONNX Runtime call of ``model`` (or a graph built on it) so that ``copies`` sets of
    its activations fit ``memory_mb``: one sample's are measured on ``first``."""
    per_sample = activation_bytes(model, first, layout)
    return max(1, min(CHUNK, (memory_mb << 20) // max(1, copies * per_sample)))


def budgeted_chunks(
    model: onnx.ModelProto,
    batches: Iterable[Batch],
    samples: int,
    layout: Layout,
    memory_mb: int,
    copies: int,
    label: str,
) -> Iterator[tuple[Batch, int]]:
    """The first ``samples`` samples of ``batches`` as (chunk of model inputs, its sample count), in
    chunks sized by :func:`samples_per_call`, with progress; the last chunk is cut to the count."""
    it = iter(batches)
    first = next(it, None)
    if first is None:
        return
    chunk = samples_per_call(model, first, layout, memory_mb, copies)

    def capped() -> Iterator[Batch]:  # cut before progress sees it: its count and "done" line stay true
        seen = 0
        for feeds in rechunk(itertools.chain([first], it), chunk, layout):
            n = min(layout.count(feeds), samples - seen)
            yield layout.take(feeds, 0, n) if n < layout.count(feeds) else feeds
            seen += n
            if seen >= samples:
                return

    for feeds in progress(capped(), label, total=samples, size=layout.count, unit="samples"):
        yield feeds, layout.count(feeds)


def expose(model: onnx.ModelProto, tensors: list[str]) -> bytes:
    """A copy of ``model`` whose graph outputs are exactly ``tensors``, serialized."""
    return exposed(model, tensors).SerializeToString()


def exposed(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs are exactly ``tensors`` (for runtime.session, which
    reads a ModelProto without parsing it back)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in tensors)
    return m


def prefetched(items: Iterable[Batch], digest: Any) -> Iterator[Batch]:
    """``items`` produced (and hashed) one ahead in a background thread.

    Data sources often cost real time (decoding and resizing images); this overlaps that work with
    the inference of the previous chunk. At most one extra batch is held.
    """
    done = object()
    q: queue.Queue[Any] = queue.Queue(maxsize=1)

    def produce() -> None:
        try:
            for item in items:
                if digest is not None:
                    for k in sorted(item):
                        digest.update(k.encode())
                        digest.update(np.ascontiguousarray(item[k]).tobytes())
                q.put(item)
            q.put(done)
        except BaseException as exc:  # re-raised in the consumer, with its type (DataError etc.)
            q.put(exc)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    while True:
        item = q.get()
        if item is done:
            break
        if isinstance(item, BaseException):
            raise item
        yield item
    thread.join()


class BoundOutputs:
    """Runs ``sess`` with ORT writing the outputs into two reusable sets of numpy buffers.

    Saves allocating (and page-faulting) a chunk's worth of fresh arrays on every call. Two sets,
    used in turn, because the workers still read chunk k while ORT writes chunk k+1. The first call
    with a given input shape runs the plain way to learn the output shapes, and the arrays it
    returns become the first set; the short last chunk gets its own sets.
    """

    def __init__(self, sess: Any, names: list[str]):
        self.sess = sess
        self.names = names
        # a graph input exposed as an output is not written into a bound buffer: copied from feeds
        self.inputs = {i.name for i in sess.get_inputs()}
        self.sets: dict[tuple[Any, ...], list[tuple[Any, list[np.ndarray]]]] = {}  # at most two per shape
        self.turn = 0

    def run(self, feeds: Batch) -> list[np.ndarray]:
        key = tuple((k, v.shape, v.dtype.str) for k, v in sorted(feeds.items()))
        sets = self.sets.get(key)
        if sets is None:  # learn the shapes; the arrays returned become the first buffer set
            values: list[np.ndarray] = self.sess.run(self.names, feeds)
            self.sets[key] = [self._bind(values)]
            self.turn = 0
            return values
        self.turn ^= 1
        if self.turn >= len(sets):
            sets.append(self._bind([np.empty_like(v) for v in sets[0][1]]))
        binding, buffers = sets[self.turn]
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        self.sess.run_with_iobinding(binding)
        return [feeds[n].copy() if n in self.inputs else buf for n, buf in zip(self.names, buffers)]

    def _bind(self, buffers: list[np.ndarray]) -> tuple[Any, list[np.ndarray]]:
        binding = self.sess.io_binding()
        for name, buf in zip(self.names, buffers):
            if name not in self.inputs:
                binding.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        return binding, buffers


class InputsOnly:
    """Stands in for :class:`BoundOutputs` when every tensor a pass measures is a graph input: the
    values are the feeds themselves, and ONNX Runtime refuses a run that requests no computed output."""

    def __init__(self, names: list[str]):
        self.names = names

    def run(self, feeds: Batch) -> list[np.ndarray]:
        return [feeds[n].copy() for n in self.names]  # copies, as BoundOutputs returns inputs


def run_pass(
    model: onnx.ModelProto,
    stats: dict[str, TensorStats],
    batches: Iterable[Batch],
    label: str,
    chunk: int | None = None,
    digest: bool = True,
    memory_budget: int | None = DEFAULT_MEMORY_MB << 20,
    layout: Layout | None = None,
) -> Pass:
    """Feed ``batches`` through ``model`` and update ``stats`` (tensor name -> statistics).

    With ``digest`` the samples are hashed on the way (the data digest recorded in ranges.json).
    Without an explicit ``chunk``, the chunk is sized from the exposed activation bytes of the first
    sample so that the live activations stay within ``memory_budget`` bytes (at most ``CHUNK``):
    a 640x640 detector's activations are hundreds of MB per sample where a classifier's are a few.
    """
    layout = layout or Layout()  # where each input holds its samples (the data source's declaration)
    names = list(stats)
    total = getattr(batches, "num_samples", None)  # known for a replay of recorded samples
    inputs = {vi.name for vi in model.graph.input}
    outputs: BoundOutputs | InputsOnly
    if all(n in inputs for n in names):  # nothing to compute (e.g. only a graph input is histogrammed)
        outputs = InputsOnly(names)
    else:
        outputs = BoundOutputs(runtime.session(exposed(model, names), "cpu", spin=False), names)
    sample_bytes = 0
    if chunk is None:
        if isinstance(outputs, BoundOutputs):
            sample_bytes, batches = _measure(outputs.sess, names, batches, layout)
        chunk = chunk_for(sample_bytes, memory_budget)
        if chunk < CHUNK:
            logger.info(
                "%s: %.0f MB of activations per sample; %d sample(s) per call to stay within %.0f MB",
                label,
                sample_bytes / 1e6,
                chunk,
                (memory_budget or 0) / 2**20,
            )
    hasher = hashlib.sha256() if digest else None
    samples = 0
    pending: list[Future[None]] = []

    scratch = [np.empty(0, np.int32) for _ in range(WORKERS)]
    numpy_bins = histogram.KERNEL != "compiled"  # only numpy's path needs bin-index buffers

    def consume(values: list[np.ndarray], part: int) -> None:
        mine = [(n, v) for i, (n, v) in enumerate(zip(names, values)) if i % WORKERS == part]
        largest = max((v.size for _, v in mine), default=0)
        if numpy_bins and len(scratch[part]) < largest:
            scratch[part] = np.empty(largest, np.int32)
        for name, value in mine:
            stats[name].update(value, scratch[part])

    with ThreadPoolExecutor(max_workers=WORKERS) as workers:
        chunks = prefetched(rechunk(batches, chunk, layout), hasher)
        for feeds in progress(chunks, label, total=total, size=layout.count, unit="samples"):
            samples += layout.count(feeds)
            values = outputs.run(feeds)
            for job in pending:
                job.result()  # at most two chunks of activations alive: one computed, one digested
            pending = [workers.submit(consume, values, part) for part in range(WORKERS)]
            del values
        for job in pending:
            job.result()
    return Pass(samples, hasher.hexdigest() if hasher else "", chunk, sample_bytes)
