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
import queue
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from pipeline import runtime
from pipeline.calibration.histogram import TensorStats
from pipeline.data import rechunk
from pipeline.log import progress

Batch = dict[str, np.ndarray]
CHUNK = 8  # samples per ONNX Runtime call while calibrating
WORKERS = 2  # threads digesting a chunk while ONNX Runtime computes the next


@dataclass
class Pass:
    num_samples: int
    data_digest: str  # SHA-256 of the samples seen, in order


def expose(model: onnx.ModelProto, tensors: list[str]) -> bytes:
    """A copy of ``model`` whose graph outputs are exactly ``tensors``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in tensors)
    return m.SerializeToString()


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


def run_pass(
    model: onnx.ModelProto, stats: dict[str, TensorStats], batches: Iterable[Batch], label: str, chunk: int = CHUNK
) -> Pass:
    """Feed ``batches`` through ``model`` and update ``stats`` (tensor name -> statistics)."""
    names = list(stats)
    sess = runtime.session(expose(model, names), "cpu")
    digest = hashlib.sha256()
    samples = 0
    pending: list[Future[None]] = []

    scratch = [np.empty(0, np.int32) for _ in range(WORKERS)]

    def consume(values: list[np.ndarray], part: int) -> None:
        mine = [(n, v) for i, (n, v) in enumerate(zip(names, values)) if i % WORKERS == part]
        largest = max((v.size for _, v in mine), default=0)
        if len(scratch[part]) < largest:
            scratch[part] = np.empty(largest, np.int32)
        for name, value in mine:
            stats[name].update(value, scratch[part])

    with ThreadPoolExecutor(max_workers=WORKERS) as workers:
        for feeds in progress(prefetched(rechunk(batches, chunk), digest), label):
            samples += len(next(iter(feeds.values())))
            values = sess.run(names, feeds)
            for job in pending:
                job.result()  # at most two chunks of activations alive: one computed, one digested
            pending = [workers.submit(consume, values, part) for part in range(WORKERS)]
            del values
        for job in pending:
            job.result()
    return Pass(samples, digest.hexdigest())
