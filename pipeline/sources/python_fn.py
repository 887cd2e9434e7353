"""``python: "pkg.mod:function"``: a function of the user's that yields ``{input_name: array}`` batches."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, DataError, fail
from pipeline.graph.layout import Layout
from pipeline.sources.checks import Batch, Specs
from pipeline.sources.kind import Reading, SourceKind, hash_files
from pipeline.sources.spec import DataSource
from pipeline.user_code import import_object

SHARD_ARGS = ("shard_index", "num_shards")


def _python(src: DataSource, search_dirs: list[Path]) -> Iterator[Batch]:
    fn: Callable[..., Iterable[Batch]] = import_object(src.python or "", search_dirs, "python data source")
    for i, batch in enumerate(fn(**src.args)):
        if not isinstance(batch, dict):
            fail(
                DataError,
                f"{src.python} yielded a {type(batch).__name__} as batch {i}; yield {{input_name: ndarray}} mappings.",
            )
        yield {k: np.asarray(v) for k, v in batch.items()}


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
        return _python(src, dirs)

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
        fn = import_object(src.python or "", reading.dirs, "python data source")
        if takes_shard_args(fn) and src.limit is None:
            sub = dataclasses.replace(src, args={**src.args, "shard_index": index, "num_shards": num})
            yield from reading.batches(sub, what)
        else:  # every worker reads the source; each keeps every num-th batch
            yield from super().shard(src, index, num, reading, what)

    def uri(self, src: DataSource) -> str:
        return src.python or ""
