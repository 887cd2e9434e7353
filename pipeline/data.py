"""Data sources (npz, memory-mapped npy, a Python generator, an image folder) as checked batches.

Every source streams: at most one batch is materialised at a time (an ``npz`` member is read whole,
as zip members cannot be memory-mapped; use ``npy:`` for data larger than memory).
"""

from __future__ import annotations

import hashlib
import importlib
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import DataSource, ImagesSource
from pipeline.errors import ConfigError, DataError, fail

LABELS = "labels"
Batch = dict[str, np.ndarray]
Specs = dict[str, tuple[list[int | str], np.dtype]]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp"}


def import_object(spec: str, search_dirs: Iterable[Path], what: str) -> Any:
    """Import ``pkg.mod:name`` with ``search_dirs`` (the YAML folder, the cwd) on the path."""
    module_name, _, attr = spec.partition(":")
    for d in search_dirs:
        if str(d) not in sys.path:
            sys.path.insert(0, str(d))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        fail(
            ConfigError,
            f"{what}: cannot import module {module_name!r} ({exc}); "
            "it is looked up next to the YAML file and in the working directory.",
        )
    obj = getattr(module, attr, None)
    if obj is None:
        fail(ConfigError, f"{what}: module {module_name!r} has no attribute {attr!r}.")
    return obj


def _sliced(arrays: dict[str, Any], batch_size: int) -> Iterator[Batch]:
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch_size):
        yield {k: np.asarray(v[start : start + batch_size]) for k, v in arrays.items()}


def _npz(path: str, batch_size: int) -> Iterator[Batch]:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if not arrays:
        fail(DataError, f"{path} holds no arrays.")
    yield from _sliced(arrays, batch_size)


def _npy(paths: dict[str, str], batch_size: int) -> Iterator[Batch]:
    arrays = {k: np.load(p, mmap_mode="r", allow_pickle=False) for k, p in paths.items()}
    lengths = {k: len(a) for k, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        fail(DataError, f"npy arrays differ in length along the sample axis: {lengths}.")
    yield from _sliced(arrays, batch_size)


def _images(src: ImagesSource, batch_size: int, input_name: str) -> Iterator[Batch]:
    from PIL import Image

    files = sorted(p for p in Path(src.dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        fail(DataError, f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {src.dir}.")
    h, w = src.size
    mean = np.asarray(src.mean, np.float32)
    std = np.asarray(src.std, np.float32)
    for start in range(0, len(files), batch_size):
        chunk = []
        for f in files[start : start + batch_size]:
            img = Image.open(f).convert("L" if src.channels == "L" else "RGB").resize((w, h), Image.Resampling.BILINEAR)
            a = np.asarray(img, np.float32)
            a = a[:, :, None] if a.ndim == 2 else a
            if src.channels == "BGR":
                a = a[:, :, ::-1]
            a = (a / src.scale - mean) / std
            chunk.append(a.transpose(2, 0, 1) if src.layout == "NCHW" else a)
        yield {input_name: np.ascontiguousarray(np.stack(chunk), dtype=np.float32)}


def _python(src: DataSource, search_dirs: list[Path]) -> Iterator[Batch]:
    fn: Callable[..., Iterable[Batch]] = import_object(src.python or "", search_dirs, "python data source")
    for i, batch in enumerate(fn(**src.args)):
        if not isinstance(batch, dict):
            fail(
                DataError,
                f"{src.python} yielded a {type(batch).__name__} as batch {i}; yield {{input_name: ndarray}} mappings.",
            )
        yield {k: np.asarray(v) for k, v in batch.items()}


def batches(src: DataSource, batch_size: int, specs: Specs, search_dirs: list[Path], what: str) -> Iterator[Batch]:
    """Checked batches from ``src``, capped at ``src.limit`` samples. Labels stay under ``labels``."""
    if src.npz:
        raw: Iterator[Batch] = _npz(src.npz, batch_size)
    elif src.npy:
        raw = _npy(src.npy, batch_size)
    elif src.images:
        name = src.images.input or next(iter(specs))
        raw = _images(src.images, batch_size, name)
    else:
        raw = _python(src, search_dirs)
    seen = 0
    for i, batch in enumerate(raw):
        if src.limit is not None:
            remaining = src.limit - seen
            if remaining <= 0:
                break
            batch = {k: v[:remaining] for k, v in batch.items()}
        check_batch(batch, specs, f"{what} batch {i}")
        seen += len(next(iter(batch.values())))
        yield batch
    if seen == 0:
        fail(DataError, f"{what}: the data source produced no samples.")


def rechunk(batches: Iterable[Batch], size: int) -> Iterator[Batch]:
    """Model inputs (labels dropped) in contiguous chunks of at most ``size`` samples."""
    for batch in batches:
        feeds = {k: v for k, v in batch.items() if k != LABELS}
        n = len(next(iter(feeds.values())))
        for start in range(0, n, size):
            yield {k: np.ascontiguousarray(v[start : start + size]) for k, v in feeds.items()}


def check_batch(batch: Batch, specs: Specs, where: str) -> None:
    """Names, dtypes, shapes and finiteness of a batch against the model's inputs."""
    names = [k for k in batch if k != LABELS]
    missing = [n for n in specs if n not in batch]
    extra = [n for n in names if n not in specs]
    if missing or extra:
        fail(
            DataError,
            f"{where}: the data's arrays {names} do not match the model's inputs {list(specs)}"
            + (f" (missing {missing})" if missing else "")
            + (f" (unexpected {extra}; only 'labels' may be added)" if extra else "")
            + ". Name each array after the model input it feeds.",
        )
    lengths = {len(batch[n]) for n in batch}
    if len(lengths) != 1:
        fail(DataError, f"{where}: arrays differ in number of samples: { {k: len(v) for k, v in batch.items()} }.")
    for name, (dims, dtype) in specs.items():
        arr = batch[name]
        if arr.dtype != dtype:
            fail(
                DataError,
                f"{where}: input {name!r} has dtype {arr.dtype}, the model expects {dtype}; "
                f"convert it with .astype(np.{dtype}).",
            )
        if arr.ndim != len(dims) or any(
            isinstance(d, int) and d > 0 and d != s for d, s in zip(dims[1:], arr.shape[1:])
        ):
            fail(
                DataError,
                f"{where}: input {name!r} has shape {list(arr.shape)}, "
                f"the model expects {dims} (first axis = samples).",
            )
        if arr.shape[0] == 0:
            fail(DataError, f"{where}: input {name!r} is empty.")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            fail(DataError, f"{where}: input {name!r} contains {bad} NaN/Inf values; clean or drop those samples.")


def source_digest(src: DataSource, search_dirs: list[Path]) -> str:
    """A digest of a source's definition and files, known before reading it (for step reuse)."""
    h = hashlib.sha256(repr((src.python, sorted(src.args.items()), src.limit)).encode())
    files: list[Path] = []
    if src.npz:
        files = [Path(src.npz)]
    elif src.npy:
        files = [Path(p) for _, p in sorted(src.npy.items())]
    elif src.images:
        h.update(repr(src.images).encode())
        files = sorted(p for p in Path(src.images.dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    elif src.python:
        module = src.python.partition(":")[0].replace(".", "/") + ".py"
        files = [d / module for d in search_dirs if (d / module).is_file()][:1]
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def search_dirs(base_dir: Path) -> list[Path]:
    return [base_dir, Path.cwd()]
