"""Run an FP32 model over calibration batches and gather per-tensor statistics.

Every activation tensor is exposed as an extra graph output, so one ONNX Runtime call per batch
yields them all; only that batch's activations are alive at any time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from pipeline.calibration.histogram import TensorStats
from pipeline.log import logger, progress

Batch = dict[str, np.ndarray]


@dataclass
class Collected:
    stats: dict[str, TensorStats]
    num_samples: int
    data_digest: str  # SHA-256 of the samples actually seen, in order


def expose(model: onnx.ModelProto, tensors: list[str]) -> bytes:
    """A copy of ``model`` whose graph outputs include ``tensors``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    present = {o.name for o in m.graph.output}
    for name in tensors:
        if name not in present:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return m.SerializeToString()


def collect(
    sess: Any,
    tensors: list[str],
    batches: Iterable[Batch],
    histogram: bool,
    num_bins: int = 2048,
    known_amax: dict[str, float] | None = None,
    label: str = "calibration batches",
) -> Collected:
    """One pass over ``batches`` through ``sess`` (a session of the model with ``tensors`` exposed)."""
    outputs = [o.name for o in sess.get_outputs()]
    wanted = [n for n in outputs if n in set(tensors)]
    known = known_amax or {}
    stats = {n: TensorStats(num_bins, histogram, known.get(n)) for n in wanted}
    digest = hashlib.sha256()
    samples = 0
    for batch in progress(batches, label):
        feeds = {k: v for k, v in batch.items() if k != "labels"}
        for k in sorted(feeds):
            digest.update(k.encode())
            digest.update(np.ascontiguousarray(feeds[k]).tobytes())
        samples += len(next(iter(feeds.values())))
        values: dict[str, np.ndarray] = dict(zip(outputs, sess.run(outputs, feeds)))
        for name in wanted:
            v = values[name]
            # graph inputs come back as the caller's arrays; never overwrite those
            stats[name].update(v if v is not feeds.get(name) else v.copy())
        del values
    missing = sorted(set(tensors) - set(wanted))
    if missing:
        logger.warning("%d tensors could not be exposed and have no range: %s", len(missing), missing[:5])
    return Collected(stats, samples, digest.hexdigest())
