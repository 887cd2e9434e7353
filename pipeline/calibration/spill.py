"""Pass 1's model inputs kept in a temporary folder and read back for pass 2.

Memory stays bounded (the inputs live on disk, not in RAM), the data source is read and decoded
once, and pass 2 is guaranteed to see exactly the samples pass 1 saw, even from a source that
would not repeat itself. The folder holds one raw file per model input, as large as that input's
calibration data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.sources.data import LABELS

Batch = dict[str, np.ndarray]


class Spill:
    def __init__(self, folder: Path, count: Callable[[Batch], int] | None = None):
        self.folder = folder
        self.count = count or (lambda batch: len(next(iter(batch.values()))))  # samples in a batch
        self.samples = 0
        self.paths: dict[str, Path] = {}
        self.index: list[dict[str, tuple[int, tuple[int, ...], np.dtype]]] = []

    def record(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """Yield ``batches`` unchanged while appending their model inputs to disk."""
        files: dict[str, BinaryIO] = {}
        offsets: dict[str, int] = {}
        try:
            for batch in batches:
                entry = {}
                for name, value in batch.items():
                    if name == LABELS:
                        continue
                    if name not in files:
                        self.paths[name] = self.folder / f"input{len(self.paths)}.bin"
                        files[name] = open(self.paths[name], "wb")  # noqa: SIM115  # closed below
                        offsets[name] = 0
                    array = np.asarray(value, order="C")  # not ascontiguousarray: it makes a scalar 1-d
                    files[name].write(array.tobytes())
                    entry[name] = (offsets[name], array.shape, array.dtype)
                    offsets[name] += array.nbytes
                self.index.append(entry)
                self.samples += self.count(batch)
                yield batch
        finally:
            for f in files.values():
                f.close()

    @property
    def num_samples(self) -> int:
        return self.samples

    def replay(self) -> Replay:
        """The recorded batches again, read back one at a time (with their sample count, so
        progress can show a total)."""
        return Replay(self)

    def _read(self) -> Iterator[Batch]:
        """Read, not memory-mapped: mapped pages that were touched count towards the process's
        resident memory until the end, and would grow it with the number of samples."""
        for entry in self.index:
            yield {
                name: np.fromfile(self.paths[name], dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(
                    shape
                )
                for name, (offset, shape, dtype) in entry.items()
            }


class Replay:
    """An iterable over a spill's recorded batches that knows how many samples they hold."""

    def __init__(self, spill: Spill):
        self.spill = spill
        self.num_samples = spill.num_samples

    def __iter__(self) -> Iterator[Batch]:
        return self.spill._read()
