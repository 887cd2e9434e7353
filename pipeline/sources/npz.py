"""``npz:``: one array per model input in an .npz archive (plus an optional ``labels`` array)."""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError, fail
from pipeline.graph.layout import Layout
from pipeline.sources.checks import LABELS, Batch, Specs, check_batch, check_counts, checked_array, file_kind, sliced
from pipeline.sources.kind import Reading, SourceKind, checked_path, hash_files, shard_range
from pipeline.sources.spec import DataSource

NPZ_HINT = (
    "save numeric arrays with np.savez(path, input_name=array, ...), one array per model input (samples "
    "along the first axis, e.g. np.stack(samples).astype(np.float32)), plus an optional 'labels' array"
)


def _open_npz(path: str, fh: Any) -> Any:
    """``np.load`` of the npz at ``path`` through the open file ``fh``, every failure a DataError."""
    kind = file_kind(path)
    if kind == "npy":
        fail(
            DataError,
            f"{path} is a single .npy array, not an .npz archive: give it as npy: {{input_name: file}}, or {NPZ_HINT}.",
        )
    if kind != "npz":
        fail(DataError, f"{path} is not an .npz archive (it is neither a zip file nor a numpy array file); {NPZ_HINT}.")
    try:
        return np.load(fh, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        fail(DataError, f"{path} is not a readable .npz archive ({type(exc).__name__}: {exc}); {NPZ_HINT}.")


def _npz_members(path: str) -> list[str]:
    """The array names of the npz at ``path`` (a DataError for anything that is not one)."""
    with open(path, "rb") as fh, _open_npz(path, fh) as z:
        return list(z.files)


def _npz(path: str, batch_size: int, layout: Layout, specs: Specs, what: str) -> Iterator[Batch]:
    arrays: dict[str, np.ndarray] = {}
    with open(path, "rb") as fh:  # opened here: numpy leaks the file when the zip is corrupt
        z = _open_npz(path, fh)
        with z:
            for k in z.files:
                try:
                    arrays[k] = checked_array(z[k], path, k, NPZ_HINT, layout)
                except ValueError as exc:  # numpy refuses object arrays without allow_pickle
                    if "Object arrays" in str(exc):
                        fail(
                            DataError,
                            f"{path}: array {k!r} holds Python objects (dtype object), which int8pipe does not "
                            f"unpickle; {NPZ_HINT}.",
                        )
                    fail(DataError, f"{path}: array {k!r} cannot be read ({exc}); {NPZ_HINT}.")
                except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                    fail(DataError, f"{path}: array {k!r} cannot be read ({type(exc).__name__}: {exc}); {NPZ_HINT}.")
    if not arrays:
        fail(DataError, f"{path} holds no arrays.")
    if set(arrays) - {LABELS} == set(specs):  # else check_batch names what is missing or extra
        check_counts(arrays, specs, f"{what} ({Path(path).name})", layout)  # whole: a batch's cut hides it
    yield from sliced(arrays, batch_size, layout)


def _npz_headers(path: str) -> Batch:
    """The npz's arrays as zero-filled stand-ins of their real shape and dtype, read from the .npy
    headers alone, so checking names, dtypes and shapes reads no data ({} if a header is unusual)."""
    out: Batch = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                if not member.endswith(".npy"):
                    continue
                with zf.open(member) as f:
                    major, _ = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(f)
                if dtype.hasobject:
                    return {}  # the loader names this error precisely when the step reads the file
                zero = np.zeros(1, dtype)
                out[member[: -len(".npy")]] = np.lib.stride_tricks.as_strided(zero, shape, [0] * len(shape))
    except (OSError, ValueError, zipfile.BadZipFile):
        return {}
    return out


def _npz_length(path: str, layout: Layout) -> int:
    """Samples in an npz archive, from a batched array's header (the data stays compressed)."""
    with zipfile.ZipFile(path) as zf:
        name = next(
            n[: -len(".npy")]
            for n in zf.namelist()
            if n != f"{LABELS}.npy" and n[: -len(".npy")] not in layout.constants
        )
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


class Npz(SourceKind):
    name = "npz"

    def check(self, src: DataSource, base: Path, path: str) -> None:
        src.npz = checked_path(base, src.npz or "", f"{path}.npz")

    def read(
        self, src: DataSource, batch_size: int, layout: Layout, specs: Specs, dirs: list[Path], what: str
    ) -> Iterator[Batch]:
        return _npz(src.npz or "", batch_size, layout, specs, what)

    def digest(self, h: Any, src: DataSource, dirs: list[Path]) -> None:
        hash_files(h, [Path(src.npz or "")])

    def preflight(self, src: DataSource, specs: Specs, layout: Layout, what: str) -> bool:
        """From the members' .npy headers: its arrays load whole, so reading one costs the full file."""
        path = src.npz or ""
        names = [n for n in _npz_members(path) if n != LABELS]  # a DataError if it is no npz
        headers = _npz_headers(path)
        if sorted(names) != sorted(specs):
            check_batch({n: np.zeros(1) for n in names}, specs, what)  # raises the naming error
        elif set(headers) == set(names) | ({LABELS} & set(headers)):  # {}: unusual headers, left to the loader
            check_batch(headers, specs, f"{what} ({Path(path).name})", layout)
        return True

    def shard(self, src: DataSource, index: int, num: int, reading: Reading, what: str) -> Iterator[Batch]:
        layout = Layout.of(src)
        total = _npz_length(src.npz or "", layout)
        lo, hi = shard_range(min(total, src.limit or total), index, num)
        if lo < hi:
            yield from _rows(reading.batches(src, what), lo, hi, layout)

    def uri(self, src: DataSource) -> str:
        return src.npz or ""
