"""What every data source's batches are checked against: the model's inputs and the source's layout."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, DataError, fail
from pipeline.graph.layout import Layout

LABELS = "labels"


Batch = dict[str, np.ndarray]


Specs = dict[str, tuple[list[int | str], np.dtype]]


def file_kind(path: str) -> str:
    """``npz``, ``npy`` or ``other``, from the file's first bytes (numpy would try unpickling ``other``)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as exc:
        fail(DataError, f"{path} cannot be read ({exc.strerror or exc}).")
    if magic[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "npz"
    return "npy" if magic == b"\x93NUMPY" else "other"


def checked_array(
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


def sliced(arrays: dict[str, Any], batch_size: int, layout: Layout) -> Iterator[Batch]:
    n = layout.count(arrays)
    for start in range(0, n, batch_size):
        yield {k: np.asarray(v) for k, v in layout.take(arrays, start, start + batch_size).items()}


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
    check_counts(batch, specs, where, layout)
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


def check_counts(batch: Batch, specs: Specs, where: str, layout: Layout) -> None:
    """Every batched array (and labels) holds the same number of samples along its sample axis."""
    counts = layout.counts(batch)
    if len(set(counts.values())) > 1:
        hints = _axis_hints(batch, specs, counts)
        fail(
            DataError,
            f"{where}: arrays differ in number of samples along their sample axes: {counts} "
            f"(shapes { {k: list(v.shape) for k, v in batch.items()} }; "
            + (
                "; ".join(hints)
                if hints
                else "every input holds its samples along axis 0 unless batch_axes says "
                "otherwise, and constants lists inputs that are the same for every sample"
            )
            + ").",
        )
