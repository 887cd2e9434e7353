"""Data sources (npz, memory-mapped npy, a Python generator, an image folder) as checked batches.

Every source streams: at most one batch is materialised at a time (an ``npz`` member is read whole,
as zip members cannot be memory-mapped; use ``npy:`` for data larger than memory).
"""

from __future__ import annotations

import hashlib
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, DataError, fail
from pipeline.graph.layout import Layout
from pipeline.settings.config import DataSource, ImagesSource
from pipeline.user_code import import_object

LABELS = "labels"
Batch = dict[str, np.ndarray]
Specs = dict[str, tuple[list[int | str], np.dtype]]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp"}


def _sliced(arrays: dict[str, Any], batch_size: int, layout: Layout) -> Iterator[Batch]:
    n = layout.count(arrays)
    for start in range(0, n, batch_size):
        yield {k: np.asarray(v) for k, v in layout.take(arrays, start, start + batch_size).items()}


NPZ_HINT = (
    "save numeric arrays with np.savez(path, input_name=array, ...), one array per model input (samples "
    "along the first axis, e.g. np.stack(samples).astype(np.float32)), plus an optional 'labels' array"
)
NPY_HINT = "save each model input as one numeric array with np.save(path, array), samples along the first axis"


def _file_kind(path: str) -> str:
    """``npz``, ``npy`` or ``other``, from the file's first bytes (numpy would try unpickling ``other``)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as exc:
        fail(DataError, f"{path} cannot be read ({exc.strerror or exc}).")
    if magic[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "npz"
    return "npy" if magic == b"\x93NUMPY" else "other"


def _checked_array(
    arr: np.ndarray, path: str, name: str | None, hint: str, layout: Layout, input_name: str | None = None
) -> np.ndarray:
    where = f"{path}: array {name!r}" if name is not None else path
    if arr.dtype.hasobject:
        fail(DataError, f"{where} holds Python objects (dtype {arr.dtype}), which int8pipe does not unpickle; {hint}.")
    key = input_name or name
    if arr.ndim == 0 and key not in layout.constants:
        if key is None or key == LABELS:
            fail(DataError, f"{where} is a single value (shape ()), not an array of samples; {hint}.")
        fail(DataError, _scalar_message(where, key))
    return arr


def _scalar_message(where: str, name: str) -> str:
    return (
        f"{where} is a single value (shape ()), not an array of samples. If model input {name!r} takes the same "
        f"value for every sample (a sample rate, a flag), declare it in the data source: constants: [{name}] "
        "(it is then passed unchanged with every batch); otherwise give one value per sample."
    )


def _open_npz(path: str, fh: Any) -> Any:
    """``np.load`` of the npz at ``path`` through the open file ``fh``, every failure a DataError."""
    kind = _file_kind(path)
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
                    arrays[k] = _checked_array(z[k], path, k, NPZ_HINT, layout)
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
        _check_counts(arrays, specs, f"{what} ({Path(path).name})", layout)  # whole: a batch's cut hides it
    yield from _sliced(arrays, batch_size, layout)


def _load_npy(path: str, name: str, layout: Layout) -> np.ndarray:
    kind = _file_kind(path)
    if kind != "npy":
        what = "an .npz archive; give it as npz: file" if kind == "npz" else "not a numpy array file"
        fail(DataError, f"{path} (npy input {name!r}) is {what}; {NPY_HINT}.")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:  # an object array cannot be memory-mapped nor loaded without pickle
        fail(DataError, f"{path} (npy input {name!r}) cannot be read ({exc}); {NPY_HINT}.")
    except (OSError, EOFError) as exc:
        fail(DataError, f"{path} (npy input {name!r}) cannot be read ({type(exc).__name__}: {exc}); {NPY_HINT}.")
    return _checked_array(arr, path, None, NPY_HINT, layout, name)


def _npy(paths: dict[str, str], batch_size: int, layout: Layout, specs: Specs, what: str) -> Iterator[Batch]:
    arrays = {k: _load_npy(p, k, layout) for k, p in paths.items()}
    _check_counts(arrays, specs, f"{what} (npy)", layout)
    yield from _sliced(arrays, batch_size, layout)


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
    """Checked batches from ``src``, capped at ``src.limit`` samples. Labels stay under ``labels``.

    Batches keep the model's layout: samples along each input's declared axis (``batch_axes``), and
    the ``constants`` unchanged in every batch.
    """
    layout = Layout.of(src)
    check_layout(layout, specs, what)
    if src.npz:
        raw: Iterator[Batch] = _npz(src.npz, batch_size, layout, specs, what)
    elif src.npy:
        raw = _npy(src.npy, batch_size, layout, specs, what)
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
            batch = layout.take(batch, 0, remaining)
        check_batch(batch, specs, f"{what} batch {i}", layout)
        seen += layout.count(batch)
        yield batch
    if seen == 0:
        fail(DataError, f"{what}: the data source produced no samples.")


def rechunk(batches: Iterable[Batch], size: int, layout: Layout | None = None) -> Iterator[Batch]:
    """Model inputs (labels dropped) in contiguous chunks of at most ``size`` samples."""
    feeds = ({k: v for k, v in batch.items() if k != LABELS} for batch in batches)
    yield from (layout or Layout()).chunks(feeds, size)


def check_layout(layout: Layout, specs: Specs, what: str) -> None:
    """The data source's ``batch_axes`` and ``constants`` against the model's inputs."""
    for key, names in (("batch_axes", list(layout.axes)), ("constants", sorted(layout.constants))):
        for name in names:
            if name not in specs:
                fail(ConfigError, f"{what}.{key}: the model has no input {name!r}; its inputs are {list(specs)}.")
    for name, axis in layout.axes.items():
        rank = len(specs[name][0])
        if axis >= rank:
            fail(
                ConfigError,
                f"{what}.batch_axes.{name}: axis {axis} does not exist; the model's input {name!r} has "
                f"{rank} axes (shape {specs[name][0]}).",
            )
    if specs and all(n in layout.constants for n in specs):
        fail(
            ConfigError,
            f"{what}.constants: every model input is declared constant, so there are no samples to calibrate "
            "or validate on; leave at least one input out of constants.",
        )


def _axis_hints(batch: Batch, specs: Specs, counts: dict[str, int]) -> list[str]:
    """What to declare for the inputs whose sample count disagrees with the others'."""
    hints = []
    for name, n in counts.items():
        if name not in specs:
            continue
        others = {m for k, m in counts.items() if k != name}
        if n in others:
            continue
        dims, shape = specs[name][0], batch[name].shape
        axes = [i for i, (d, s) in enumerate(zip(dims, shape)) if not (isinstance(d, int) and d > 0) and s in others]
        if axes:
            hints.append(
                f"input {name!r} has shape {list(shape)}: if its samples are along axis {axes[0]}, declare "
                f"batch_axes: {{{name}: {axes[0]}}} in the data source"
            )
        elif all(isinstance(d, int) and d > 0 for d in dims):
            hints.append(
                f"input {name!r} has the fixed shape {dims}: if it is the same for every sample (an initial "
                f"state), declare constants: [{name}] in the data source"
            )
    return hints


def check_batch(batch: Batch, specs: Specs, where: str, layout: Layout | None = None) -> None:
    """Names, dtypes, shapes and finiteness of a batch against the model's inputs and the data
    source's layout (``batch_axes``, ``constants``)."""
    layout = layout or Layout()
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
    for name in names:
        axis = layout.axis(name)
        if axis is not None and batch[name].ndim <= axis:
            if batch[name].ndim == 0:
                fail(DataError, _scalar_message(f"{where}: input {name!r}", name))
            fail(
                DataError,
                f"{where}: input {name!r} has shape {list(batch[name].shape)}, which has no axis {axis} "
                f"to hold its samples (batch_axes); the model expects {specs[name][0]}.",
            )
    _check_counts(batch, specs, where, layout)
    for name, (dims, dtype) in specs.items():
        arr = batch[name]
        axis = layout.axis(name)
        if arr.dtype != dtype:
            fail(
                DataError,
                f"{where}: input {name!r} has dtype {arr.dtype}, the model expects {dtype}; "
                f"convert it with .astype(np.{dtype}).",
            )
        if arr.ndim != len(dims) or any(
            isinstance(d, int) and d > 0 and d != s for i, (d, s) in enumerate(zip(dims, arr.shape)) if i != axis
        ):
            if axis is None:
                what = "a constant: passed as it is"
            else:
                what = "first axis = samples" if axis == 0 else f"samples along axis {axis}"
            fail(DataError, f"{where}: input {name!r} has shape {list(arr.shape)}, the model expects {dims} ({what}).")
        if axis is not None and arr.shape[axis] == 0:
            fail(DataError, f"{where}: input {name!r} is empty.")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            fail(DataError, f"{where}: input {name!r} contains {bad} NaN/Inf values; clean or drop those samples.")


def _check_counts(batch: Batch, specs: Specs, where: str, layout: Layout) -> None:
    """Every batched array (and labels) holds the same number of samples along its sample axis."""
    counts = layout.counts(batch)
    if len(set(counts.values())) > 1:
        hints = _axis_hints(batch, specs, counts)
        fail(
            DataError,
            f"{where}: arrays differ in number of samples along their sample axes: {counts} "
            f"(shapes { {k: list(v.shape) for k, v in batch.items()} }; "
            + ("; ".join(hints) if hints else "every input holds its samples along axis 0 unless batch_axes says "
               "otherwise, and constants lists inputs that are the same for every sample")
            + ").",
        )  # fmt: skip


def _hash_files(h: Any, files: Iterable[Path]) -> None:
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)


def _dep_files(deps: list[str]) -> list[Path]:
    files: list[Path] = []
    for dep in deps:
        p = Path(dep)
        files.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return files


def sample_digest(src: DataSource, search_dirs: list[Path]) -> str:
    """SHA-256 of the samples a source yields (names, dtypes, shapes, bytes), up to its ``limit``."""
    h = hashlib.sha256()
    layout = Layout.of(src)
    seen = 0
    for batch in _python(src, search_dirs):
        if src.limit is not None:
            if seen >= src.limit:
                break
            batch = layout.take(batch, 0, src.limit - seen)
        for k in sorted(batch):
            arr = np.asarray(batch[k], order="C")
            h.update(f"{k}:{arr.dtype}:{arr.shape}".encode())
            h.update(arr.tobytes())
        seen += layout.count(batch)
    return h.hexdigest()


def source_digest(src: DataSource, search_dirs: list[Path]) -> str:
    """A digest that changes whenever the samples a source yields could have changed (for step reuse).

    Files are hashed by content: an npz or npy file, every image of a folder. A ``python:`` source
    with ``deps:`` is hashed as its module file plus those files; without ``deps:`` nothing short of
    running it proves what it returns (it may read any file, database or service), so it is run
    and the samples themselves are hashed.
    """
    h = hashlib.sha256(repr((src.python, sorted(src.args.items()), src.limit)).encode())
    layout = Layout.of(src)
    if layout.declared:  # the same bytes cut along another axis are other samples (left out when
        h.update(layout.describe().encode())  # undeclared, so existing runs keep their keys)
    if src.npz:
        _hash_files(h, [Path(src.npz)])
    elif src.npy:
        _hash_files(h, [Path(p) for _, p in sorted(src.npy.items())])
    elif src.images:
        h.update(repr(src.images).encode())
        _hash_files(h, sorted(p for p in Path(src.images.dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
    elif src.python:
        module = src.python.partition(":")[0].replace(".", "/") + ".py"
        _hash_files(h, [d / module for d in search_dirs if (d / module).is_file()][:1])
        if src.deps:
            _hash_files(h, _dep_files(src.deps))
        else:
            h.update(sample_digest(src, search_dirs).encode())
    return h.hexdigest()


def preflight(src: DataSource, specs: Specs, search_dirs: list[Path], what: str) -> None:
    """Check a source against the model's inputs before any run starts: names, dtypes, shapes.

    An npz is checked from its members' .npy headers (its arrays load whole, so reading one costs
    the full file); other sources by their first batch.
    """
    layout = Layout.of(src)
    check_layout(layout, specs, what)
    if src.npz:
        names = [n for n in _npz_members(src.npz) if n != LABELS]  # a DataError if it is no npz
        headers = _npz_headers(src.npz)
        if sorted(names) != sorted(specs):
            check_batch({n: np.zeros(1) for n in names}, specs, what)  # raises the naming error
        elif set(headers) == set(names) | ({LABELS} & set(headers)):  # {}: unusual headers, left to the loader
            check_batch(headers, specs, f"{what} ({Path(src.npz).name})", layout)
        return
    next(batches(src, 1, specs, search_dirs, what), None)


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


def search_dirs(base_dir: Path) -> list[Path]:
    return [base_dir, Path.cwd()]
