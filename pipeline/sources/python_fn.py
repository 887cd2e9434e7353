"""``python: "pkg.mod:function"``: a function of the user's that yields ``{input_name: array}`` batches."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, DataError, fail
from pipeline.graph.layout import Layout
from pipeline.sources.checks import Batch, Specs
from pipeline.sources.kind import Reading, SourceKind, hash_files
from pipeline.sources.spec import DataSource
from pipeline.user_code import import_object, iterate

SHARD_ARGS = ("shard_index", "num_shards")
SHAPE = "yield (or return a list of) {input_name: ndarray} mappings, one per batch"
DEFAULT_WHAT = "python data source"


def _python(src: DataSource, search_dirs: list[Path], what: str = DEFAULT_WHAT) -> Iterator[Batch]:
    where = _where(what)
    fn = import_object(src.python or "", search_dirs, where)
    result = fn(**src.args)
    _check_returned(result, src, where)
    for i, batch in enumerate(iterate(fn, result)):
        if not isinstance(batch, Mapping):
            fail(DataError, f"{where}: {src.python} yielded a {type(batch).__name__} as batch {i}; {SHAPE}.")
        yield {k: _array(v, src, where, i, k) for k, v in batch.items()}


def _where(what: str) -> str:
    """The YAML key of the source (``data.calibration.python``) where the reader knows it."""
    return f"{what}.python" if what.startswith("data.") else DEFAULT_WHAT


def _check_returned(result: object, src: DataSource, where: str) -> None:
    """What the function returned is an iterable of batches, or one paragraph saying what it is."""
    if isinstance(result, Mapping):
        fail(DataError, f"{where}: {src.python} returned a single mapping, not batches of them; {SHAPE}.")
    if isinstance(result, (str, bytes)) or not isinstance(result, Iterable):
        shown = repr(result)[:80]
        fail(DataError, f"{where}: {src.python} returned {shown} ({type(result).__name__}); {SHAPE}.")


def _array(value: object, src: DataSource, where: str, index: int, name: str) -> np.ndarray:
    """``value`` as an array; nested lists of unequal lengths (ragged) are a DataError naming them."""
    try:
        return np.asarray(value)
    except ValueError as exc:
        fail(
            DataError,
            f"{where}: {src.python}: batch {index}, input {name!r} is not an array ({str(exc).splitlines()[0]}); "
            "nested lists must have equal lengths on every axis (pad them, or yield one sample per batch).",
        )


def takes_shard_args(fn: Any) -> bool:
    """Whether ``fn`` names both ``shard_index`` and ``num_shards`` as parameters (``**kwargs`` is not
    enough: a function that ignores them would have every worker read every sample)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return all(name in params and params[name].kind in kinds for name in SHARD_ARGS)


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


class PythonFunction(SourceKind):
    name = "python"

    def check(self, src: DataSource, base: Path, path: str) -> None:
        if ":" not in (src.python or ""):
            fail(ConfigError, f"{path}.python: expected 'package.module:function', got {src.python!r}.")

    def read(
        self, src: DataSource, batch_size: int, layout: Layout, specs: Specs, dirs: list[Path], what: str
    ) -> Iterator[Batch]:
        return _python(src, dirs, what)

    def digest(self, h: Any, src: DataSource, dirs: list[Path]) -> None:
        """The module file plus the declared ``deps:``; without ``deps:`` nothing short of running it
        proves what it returns (it may read any file, database or service), so the samples are hashed."""
        module = (src.python or "").partition(":")[0].replace(".", "/") + ".py"
        hash_files(h, [d / module for d in dirs if (d / module).is_file()][:1])
        if src.deps:
            hash_files(h, _dep_files(src.deps))
        else:
            h.update(sample_digest(src, dirs).encode())

    def shard(self, src: DataSource, index: int, num: int, reading: Reading, what: str) -> Iterator[Batch]:
        fn = import_object(src.python or "", reading.dirs, _where(what))
        if takes_shard_args(fn) and src.limit is None:
            sub = dataclasses.replace(src, args={**src.args, "shard_index": index, "num_shards": num})
            yield from reading.batches(sub, what)
        else:  # every worker reads the source; each keeps every num-th batch
            yield from super().shard(src, index, num, reading, what)

    def uri(self, src: DataSource) -> str:
        return src.python or ""
