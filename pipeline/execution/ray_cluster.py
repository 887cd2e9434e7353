"""Ray, the optional backend for scaling out: importing it, finding and joining the cluster.

Ray is imported only here and only when asked for (``sweep.executor: ray``,
``steps.calibrate.workers > 1``); without it int8pipe runs as before, and asking for it is one
:class:`BackendUnavailable` paragraph naming the extra. What runs on the cluster lives with its
user: sweep trials in :mod:`pipeline.orchestration.ray_executor`, calibration shards in
:mod:`pipeline.calibration.sharded`.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.errors import BackendUnavailable, ConfigError, Interrupted, fail

INSTALL = 'pip install -e ".[ray]"'


def import_ray(what: str) -> Any:
    """The ``ray`` module, or a one-paragraph :class:`BackendUnavailable` naming the extra."""
    try:
        import ray
    except ImportError as exc:
        fail(
            BackendUnavailable,
            f"{what} needs Ray, which is not installed in this environment ({exc}). Install it with "
            f"{INSTALL} (or pip install ray), with the same Ray and Python versions on this machine and on "
            "every node of the cluster; or leave it out (sweep.executor: local, steps.calibrate.workers: 1).",
        )
    return ray


def resolve_address(configured: str | None, key: str) -> str:
    """The Ray cluster: ``configured``, else ``$RAY_ADDRESS``, else a ConfigError."""
    address = configured or os.environ.get("RAY_ADDRESS")
    if not address:
        fail(
            ConfigError,
            f"{key}: no Ray cluster given. Set {key} to the address `ray start --head` prints "
            "(e.g. 10.0.0.5:6379), or the RAY_ADDRESS environment variable; a cluster of one machine "
            "starts with: ray start --head --port 6379 --num-cpus 2.",
        )
    return address


@contextmanager
def connected(address: str, what: str, runtime_env: dict[str, Any] | None = None) -> Iterator[Any]:
    """This process connected to the Ray cluster at ``address`` (disconnected afterwards; the
    cluster keeps running). An existing connection is used as it is, unless ``runtime_env`` (the
    job's: Ray uploads a ``working_dir`` only when connecting) is asked for."""
    ray = import_ray(what)
    if ray.is_initialized():
        if runtime_env:
            fail(
                ConfigError,
                f"{what}: sweep.ray.upload ships the YAML's folder when int8pipe connects to Ray, but this process "
                "is already connected (ray.init): call ray.shutdown() first, or share the folder at the same path "
                "on every node and leave upload off.",
            )
        yield ray
        return
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, runtime_env=runtime_env)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        fail(
            BackendUnavailable,
            f"{what}: cannot connect to the Ray cluster at {address} ({str(exc).strip().splitlines()[0][:300]}). "
            "Start it with ray start --head --port 6379 (and ray start --address <head>:6379 on the other "
            "machines), and run int8pipe on one of its nodes.",
        )
    try:
        yield ray
    except KeyboardInterrupt as exc:
        raise _as_interrupted(exc) from None
    finally:
        ray.shutdown()


def _as_interrupted(exc: KeyboardInterrupt) -> KeyboardInterrupt:
    """The CLI's :class:`Interrupted` for a signal that arrived inside a blocking Ray call.

    Ray runs the Python signal handler from its C++ wait loops and raises a plain KeyboardInterrupt
    in place of what the handler raised; the handler left the signal it got ignored, which tells
    which it was (SIGTERM or SIGINT), so the CLI still exits 128 + that signal.
    """
    if isinstance(exc, Interrupted):
        return exc
    for signum in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(signum) == signal.SIG_IGN:
            return Interrupted(signum)
    return exc
