"""Logging and progress output for long work."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
logger = logging.getLogger("int8pipe")
EVERY_S = 2.0  # seconds between two progress lines of one loop


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (test runners and notebooks swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def configure(verbose: bool = False) -> None:
    """Send int8pipe's log to stderr once; repeated calls only change the level."""
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[int8pipe] %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    # MLflow retries a failing tracking request silently for up to minutes; urllib3 logs each retry,
    # and showing those lines makes an outage visible while it lasts.
    retries = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(h, _StderrHandler) for h in retries.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_RetryFormatter())
        retries.addHandler(handler)
    for existing in retries.handlers:
        if isinstance(existing, _StderrHandler):
            existing.setLevel(logging.WARNING)  # again: an earlier run in this process may have quieted it


def quiet_retries() -> None:
    """No more retry lines: the tracking server is given up on and int8pipe has said so."""
    # the handler stays, muted: without any, Python's last-resort handler would print urllib3's raw lines
    for existing in logging.getLogger("urllib3.connectionpool").handlers:
        if isinstance(existing, _StderrHandler):
            existing.setLevel(logging.CRITICAL + 1)


class _RetryFormatter(logging.Formatter):
    """urllib3's retry record in one short line: which request, how many tries are left."""

    def format(self, record: logging.LogRecord) -> str:
        args = record.args if isinstance(record.args, tuple) else ()
        retry, url = (args[0], args[-1]) if len(args) >= 3 else (None, record.getMessage())
        left = getattr(retry, "total", "?")
        path = str(url).split("?", 1)[0]
        return f"[int8pipe] WARNING tracking server not answering; retrying {path} ({left} tries left)"


def progress(
    items: Iterable[T],
    label: str,
    total: int | None = None,
    every_s: float | None = None,
    size: Callable[[T], int] | None = None,
    unit: str = "",
) -> Iterator[T]:
    """Yield ``items`` while logging a progress line at most every ``every_s`` seconds.

    ``every_s`` defaults to ``EVERY_S``. ``size`` counts what an item holds (e.g. the samples of a
    chunk) so the line counts that, in ``unit``s, out of ``total`` when it is known. A log line
    rather than a terminal bar: the same output reads well in a TTY, in CI logs and inside
    ``mlflow run``.
    """
    every = EVERY_S if every_s is None else every_s
    start = last = time.perf_counter()
    count = 0
    what = f" {unit}" if unit else ""
    for item in items:
        yield item
        count += size(item) if size is not None else 1
        now = time.perf_counter()
        if now - last >= every:
            last = now
            of = f"/{total}" if total else ""
            logger.info("%s: %d%s%s (%.1fs)", label, count, of, what, now - start)
    logger.info("%s: done, %d%s in %.1fs", label, count, what, time.perf_counter() - start)
