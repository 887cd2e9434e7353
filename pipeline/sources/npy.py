"""``npy: {input: file}``: one .npy file per model input, memory-mapped (data larger than memory)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError, fail
from pipeline.graph.layout import Layout
from pipeline.sources.checks import Batch, Specs, check_batch, check_counts, checked_array, file_kind, sliced
from pipeline.sources.kind import Reading, SourceKind, checked_path, hash_files, shard_range
from pipeline.sources.spec import DataSource

NPY_HINT = "save each model input as one numeric array with np.save(path, array), samples along the first axis"


def _load_npy(path: str, name: str, layout: Layout) -> np.ndarray:
    kind = file_kind(path)
    if kind != "npy":
        what = "an .npz archive; give it as npz: file" if kind == "npz" else "not a numpy array file"
        fail(DataError, f"{path} (npy input {name!r}) is {what}; {NPY_HINT}.")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:  # an object array cannot be memory-mapped nor loaded without pickle
        fail(DataError, f"{path} (npy input {name!r}) cannot be read ({exc}); {NPY_HINT}.")
    except (OSError, EOFError) as exc:
        fail(DataError, f"{path} (npy input {name!r}) cannot be read ({type(exc).__name__}: {exc}); {NPY_HINT}.")
    return checked_array(arr, path, None, NPY_HINT, layout, name)


def _npy(paths: dict[str, str], batch_size: int, layout: Layout, specs: Specs, what: str) -> Iterator[Batch]:
    arrays = {k: _load_npy(p, k, layout) for k, p in paths.items()}
    check_counts(arrays, specs, f"{what} (npy)", layout)
    yield from sliced(arrays, batch_size, layout)


class Npy(SourceKind):
    name = "npy"

    def check(self, src: DataSource, base: Path, path: str) -> None:
        src.npy = {k: checked_path(base, v, f"{path}.npy.{k}") for k, v in (src.npy or {}).items()}

    def read(
        self, src: DataSource, batch_size: int, layout: Layout, specs: Specs, dirs: list[Path], what: str
    ) -> Iterator[Batch]:
        return _npy(src.npy or {}, batch_size, layout, specs, what)

    def digest(self, h: Any, src: DataSource, dirs: list[Path]) -> None:
        hash_files(h, [Path(p) for _, p in sorted((src.npy or {}).items())])

    def shard(self, src: DataSource, index: int, num: int, reading: Reading, what: str) -> Iterator[Batch]:
        # memory-mapped: a worker reads only its own rows
        layout, batch_size = Layout.of(src), reading.batch_size
        arrays = {k: np.load(p, mmap_mode="r", allow_pickle=False) for k, p in (src.npy or {}).items()}
        total = layout.count(arrays)
        lo, hi = shard_range(min(total, src.limit or total), index, num)
        for start in range(lo, hi, batch_size):
            batch = {k: np.asarray(v) for k, v in layout.take(arrays, start, min(start + batch_size, hi)).items()}
            check_batch(batch, reading.specs, f"{what} samples {start}-{start + layout.count(batch)}", layout)
            yield batch

    def uri(self, src: DataSource) -> str:
        return next(iter((src.npy or {}).values()), "")
