"""Where the samples are in a batch of model inputs: the data contract of stateful and streaming models.

Most models take every input with the samples along axis 0. A recurrent model's state is often
``[layers, batch, hidden]`` (samples along axis 1), and a streaming model may take a scalar (a sample
rate) or an initial state that is the same for every sample. A data source declares those with
``batch_axes: {state: 1}`` and ``constants: [sr]``; a :class:`Layout` is that declaration, and every
piece of the pipeline that counts, slices or joins samples goes through it: batches are kept in the
model's own layout, so they are fed to ONNX Runtime unchanged. Plain numerics.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class Layout:
    axes: Mapping[str, int] = field(default_factory=dict)  # input -> its sample axis, where not 0
    constants: frozenset[str] = frozenset()  # inputs passed unchanged with every batch

    @classmethod
    def of(cls, src: Any) -> Layout:
        """The layout a data source (``pipeline.settings.config.DataSource``) declares."""
        if src is None:
            return cls()
        axes = {k: int(v) for k, v in (getattr(src, "batch_axes", None) or {}).items() if int(v) != 0}
        return cls(axes, frozenset(getattr(src, "constants", None) or ()))

    @property
    def declared(self) -> bool:
        return bool(self.axes or self.constants)

    def axis(self, name: str) -> int | None:
        """The sample axis of input ``name`` (None for a constant; labels and outputs: their own rules)."""
        return None if name in self.constants else self.axes.get(name, 0)

    def counts(self, batch: Mapping[str, np.ndarray]) -> dict[str, int]:
        """Samples per batched array (constants left out)."""
        out = {}
        for k, v in batch.items():
            a = self.axis(k)
            if a is not None:
                out[k] = int(v.shape[a]) if v.ndim > a else -1
        return out

    def count(self, batch: Mapping[str, np.ndarray]) -> int:
        """Samples in ``batch``: those of its first batched array (0 if it has none)."""
        for k, v in batch.items():
            a = self.axis(k)
            if a is not None and v.ndim > a:  # one without that axis is reported by data.check_batch
                return int(v.shape[a])
        return 0

    def take(self, batch: Mapping[str, np.ndarray], start: int, stop: int) -> Batch:
        """Samples ``[start, stop)`` of every batched array (views); constants unchanged."""
        out = {}
        for k, v in batch.items():
            a = self.axis(k)
            if a is None or v.ndim <= a:
                out[k] = v
            else:
                index: list[Any] = [slice(None)] * v.ndim
                index[a] = slice(start, stop)
                out[k] = v[tuple(index)]
        return out

    def concat(self, parts: Sequence[Mapping[str, np.ndarray]]) -> Batch:
        """One batch of ``parts`` joined along each array's sample axis; a constant taken from the first."""
        first = parts[0]
        return {
            k: v if (a := self.axis(k)) is None else np.concatenate([p[k] for p in parts], axis=a)
            for k, v in first.items()
        }

    def chunks(self, batches: Iterable[Mapping[str, np.ndarray]], size: int) -> Iterable[Batch]:
        """Every batch cut into contiguous chunks of at most ``size`` samples."""
        for batch in batches:
            n = self.count(batch)
            for start in range(0, n, size):
                yield {k: np.asarray(v, order="C") for k, v in self.take(batch, start, start + size).items()}

    def repeat(self, batch: Mapping[str, np.ndarray], n: int) -> Batch:
        """``batch`` tiled (cyclically) to exactly ``n`` samples; constants unchanged."""
        have = self.count(batch)
        reps = -(-n // max(have, 1))
        tiled = self.concat([batch] * reps)
        return {k: np.asarray(v, order="C") for k, v in self.take(tiled, 0, n).items()}

    def describe(self) -> str:
        """The declaration as a reader would write it in YAML (for messages and digests)."""
        return f"batch_axes: {dict(sorted(self.axes.items()))}, constants: {sorted(self.constants)}"


def output_axes(
    inputs: Mapping[str, Sequence[int | str | None]],
    outputs: Mapping[str, Sequence[int | str | None]],
    layout: Layout,
) -> dict[str, int]:
    """The sample axis of each model output, from the symbolic dims it shares with the inputs.

    An output's samples are on the axis whose symbolic name (``B``, ``batch``) is the one on an
    input's sample axis; an output without such a dim (or a model without named dims) has them on
    axis 0, as every metric expects.
    """
    names = set()
    for k, dims in inputs.items():
        a = layout.axis(k)
        if a is not None and a < len(dims) and isinstance(dims[a], str):
            names.add(dims[a])
    out = {}
    for k, dims in outputs.items():
        hit = [i for i, d in enumerate(dims) if isinstance(d, str) and d in names]
        out[k] = hit[0] if hit else 0
    return out


def samples_first(values: Mapping[str, np.ndarray], axes: Mapping[str, int]) -> Batch:
    """Model outputs with each one's sample axis moved to the front (what metrics and reports read)."""
    return {k: (np.moveaxis(v, axes.get(k, 0), 0) if axes.get(k, 0) else v) for k, v in values.items()}
