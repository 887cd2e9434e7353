"""Data sources as checked batches: what every kind (npz, npy, python, images) shares.

Every source streams: at most one batch is materialised at a time (an ``npz`` member is read whole,
as zip members cannot be memory-mapped; use ``npy:`` for data larger than memory). What differs per
kind lives in its module (:mod:`pipeline.sources.kinds` lists them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipeline.errors import DataError, fail
from pipeline.graph.layout import Layout
from pipeline.sources.checks import LABELS, Batch, Specs, check_batch, check_layout
from pipeline.sources.images import IMAGE_SUFFIXES
from pipeline.sources.kind import Reading
from pipeline.sources.kinds import kind_of
from pipeline.sources.spec import DataSource

__all__ = [
    "IMAGE_SUFFIXES",
    "LABELS",
    "Batch",
    "Specs",
    "batches",
    "check_batch",
    "check_layout",
    "preflight",
    "reading",
    "rechunk",
    "search_dirs",
    "source_digest",
]


def batches(src: DataSource, batch_size: int, specs: Specs, search_dirs: list[Path], what: str) -> Iterator[Batch]:
    """Checked batches from ``src``, capped at ``src.limit`` samples. Labels stay under ``labels``.

    Batches keep the model's layout: samples along each input's declared axis (``batch_axes``), and
    the ``constants`` unchanged in every batch.
    """
    layout = Layout.of(src)
    check_layout(layout, specs, what)
    raw = kind_of(src).read(src, batch_size, layout, specs, search_dirs, what)
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


def reading(batch_size: int, specs: Specs, dirs: list[Path]) -> Reading:
    """How a kind that splits a source among workers reads (part of) it: :func:`batches` with these."""
    return Reading(batch_size, specs, dirs, lambda src, what: batches(src, batch_size, specs, dirs, what))


def rechunk(batches: Iterable[Batch], size: int, layout: Layout | None = None) -> Iterator[Batch]:
    """Model inputs (labels dropped) in contiguous chunks of at most ``size`` samples."""
    feeds = ({k: v for k, v in batch.items() if k != LABELS} for batch in batches)
    yield from (layout or Layout()).chunks(feeds, size)


def source_digest(src: DataSource, search_dirs: list[Path]) -> str:
    """A digest that changes whenever the samples a source yields could have changed (for step reuse).

    Files are hashed by content (an npz or npy file, every image of a folder); a ``python:`` source
    by its module and ``deps:``, or, without ``deps:``, by the samples it yields.
    """
    h = hashlib.sha256(repr((src.python, sorted(src.args.items()), src.limit)).encode())
    layout = Layout.of(src)
    if layout.declared:  # the same bytes cut along another axis are other samples (left out when
        h.update(layout.describe().encode())  # undeclared, so existing runs keep their keys)
    kind_of(src).digest(h, src, search_dirs)
    return h.hexdigest()


def preflight(src: DataSource, specs: Specs, search_dirs: list[Path], what: str) -> None:
    """Check a source against the model's inputs before any run starts: names, dtypes, shapes,
    from what the kind can read cheaply, else from its first batch."""
    layout = Layout.of(src)
    check_layout(layout, specs, what)
    if not kind_of(src).preflight(src, specs, layout, what):
        next(batches(src, 1, specs, search_dirs, what), None)


def search_dirs(base_dir: Path) -> list[Path]:
    return [base_dir, Path.cwd()]
