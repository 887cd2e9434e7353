"""The one extension point for data sources: a :class:`SourceKind` per key a YAML source can name.

A kind is everything int8pipe knows about one way of giving samples: how the YAML section is
checked, how it is read as batches, what proves its samples unchanged (the cache key's digest), how
it is checked against the model before any run, how Ray workers split it, and the URI its MLflow
dataset records. A new kind is one module beside the others and one line in :mod:`.kinds`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pipeline.errors import ConfigError, fail
from pipeline.graph.layout import Layout
from pipeline.sources.checks import Batch, Specs
from pipeline.sources.spec import DataSource


@dataclass(frozen=True)
class Reading:
    """How a step reads its source, for a kind that splits it among workers."""

    batch_size: int
    specs: Specs  # the model's inputs
    dirs: list[Path]  # where a python: module is looked for
    batches: Callable[[DataSource, str], Iterator[Batch]]  # data.batches with these settings


class SourceKind:
    name: ClassVar[str]  # the YAML key: data.calibration.<name>

    def check(self, src: DataSource, base: Path, path: str) -> None:
        """Config time: the section's own keys (paths resolved against the YAML's folder ``base``)."""

    def read(
        self, src: DataSource, batch_size: int, layout: Layout, specs: Specs, dirs: list[Path], what: str
    ) -> Iterator[Batch]:
        """The source's batches as it gives them (``data.batches`` caps and checks them)."""
        raise NotImplementedError

    def digest(self, h: Any, src: DataSource, dirs: list[Path]) -> None:
        """Feed ``h`` (a hashlib object) what changes whenever the samples could have changed."""
        raise NotImplementedError

    def preflight(self, src: DataSource, specs: Specs, layout: Layout, what: str) -> bool:
        """A cheaper check against the model than reading the first batch; False: there is none."""
        return False

    def shard(self, src: DataSource, index: int, num: int, reading: Reading, what: str) -> Iterator[Batch]:
        """Shard ``index`` of ``num`` (Ray workers); together the shards are the samples, each once.

        Default: every worker reads the whole source and keeps every ``num``-th batch."""
        for i, batch in enumerate(reading.batches(src, what)):
            if i % num == index:
                yield batch

    def uri(self, src: DataSource) -> str:
        """Where the samples come from, as the run's MLflow dataset records it."""
        raise NotImplementedError


def checked_path(base: Path, value: str, path: str, kind: str = "file") -> str:
    p = (base / value).resolve()
    ok = p.is_dir() if kind == "folder" else p.is_file()
    if not ok:
        fail(ConfigError, f"{path}: {kind} not found: {p} (paths are relative to the YAML file's folder).")
    return str(p)


def hash_files(h: Any, files: Iterable[Path]) -> None:
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)


def shard_range(total: int, index: int, num: int) -> tuple[int, int]:
    """Samples [lo, hi) of shard ``index`` of ``num``: contiguous, sizes differing by at most one."""
    return total * index // num, total * (index + 1) // num
