"""User code named in the YAML (``python:`` sources, ``factory:``, a metric ``pkg.mod:fn``): imported
from the YAML file's folder and the working directory, for that code alone and only while it runs.

Those folders hold whatever the user keeps there, and libraries probe for optional modules by name
(MLflow and its dependencies try ``IPython``, ``pyspark``, ``dbruntime``, ``zstandard``...): a file
there under such a name must never be imported by anything but the user's own code. So the folders
are never put on ``sys.path``. A finder (:class:`_UserImports`) sits at the front of
``sys.meta_path`` only while the named module is imported and while int8pipe calls into it (a call,
the iteration of what a data source returned), and even then it serves only

- the module the YAML names, and
- imports made by code of the modules it served (the named module and the siblings it imports),
  told by the module of the frame that asks.

Afterwards nothing of it is left on ``sys.meta_path`` or ``sys.path``.

What this means for the user's code: top-level imports of sibling files work, and so do imports of
them inside a function or generator that int8pipe calls (``import helper`` in a data source's body).
A sibling imported lazily from code int8pipe does not call (a callback a library runs later, a thread
that outlives the call) is not found: import it at the module's top level, or make the folder a
package (a package's submodules are found through its ``__path__`` at any time).

Whatever the user's code raises, or a ``sys.exit()`` in it, becomes one :class:`UserCodeError` that
names the code and keeps the user's own traceback.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from pipeline.errors import ConfigError, Int8PipeError, UserCodeError, fail


def _forget_stale(module_name: str, search_dirs: Iterable[Path]) -> None:
    """Drop a cached import of ``module_name`` that is not the file the YAML's folders hold today.

    Within one process (a sweep, a notebook, the test suite) two pipelines may name modules alike
    in different folders, or the file may have been edited: the cached module would be stale.
    """
    rel = module_name.replace(".", "/")
    here = next(
        (f for d in search_dirs for f in (Path(d) / f"{rel}.py", Path(d) / rel / "__init__.py") if f.is_file()), None
    )
    cached = sys.modules.get(module_name)
    if here is None or cached is None:
        return
    loaded = getattr(cached, "__file__", None)
    stamp = getattr(cached, "__int8pipe_mtime__", None)
    if loaded and Path(loaded).resolve() == here.resolve() and stamp == here.stat().st_mtime_ns:
        return
    top = module_name.split(".")[0]
    for name in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
        del sys.modules[name]


def _is_import_machinery(frame: FrameType) -> bool:
    name = str(frame.f_globals.get("__name__", ""))
    return name == "importlib" or name.startswith(("importlib.", "_frozen_importlib")) or name == __name__


def _importer(frame: FrameType | None) -> str:
    """The module whose code asked for the import being resolved: the first frame above ``frame``
    outside the import machinery (``import x``, ``importlib.import_module``, ``__import__``)."""
    while frame is not None and _is_import_machinery(frame):
        frame = frame.f_back
    return str(frame.f_globals.get("__name__", "")) if frame is not None else ""


class _UserImports(importlib.abc.MetaPathFinder):
    """Finds top-level modules in the YAML folder / working directory for the user's code only.

    ``modules`` holds the top-level names it served (at first, the one the YAML names): a request
    for one of them, or any request made by their code, is looked up in ``dirs``; every other
    request (a library probing for an optional module) is left to the finders after it. Active only
    inside :meth:`running`."""

    def __init__(self, dirs: list[str], named: str):
        self.dirs = dirs
        self.modules = {named}
        self._depth = 0
        self._lock = threading.Lock()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if path is not None:  # a submodule: its package's __path__ finds it
            return None
        asked_by = _importer(sys._getframe(1)).partition(".")[0]
        if fullname not in self.modules and asked_by not in self.modules:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, self.dirs)
        if spec is not None:
            self.modules.add(fullname)  # a sibling file: its own imports are the user's too
        return spec

    @contextmanager
    def running(self) -> Iterator[None]:
        """This finder first on ``sys.meta_path`` for the block (nested and threaded calls share it)."""
        with self._lock:
            if self._depth == 0:
                sys.meta_path.insert(0, self)
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0 and self in sys.meta_path:
                    sys.meta_path.remove(self)


def _user_traceback(exc: BaseException, modules: set[str]) -> str:
    """``exc``'s traceback from the first frame of the user's code (a module in ``modules``) on:
    what the user reads to fix their code, without int8pipe's frames above it."""
    first: TracebackType | None = exc.__traceback__
    while first is not None and str(first.tb_frame.f_globals.get("__name__", "")).partition(".")[0] not in modules:
        first = first.tb_next
    return "".join(traceback.format_exception(type(exc), exc, first or exc.__traceback__))


class _UserCode:
    """One piece of user code: where it is imported from, and how a failure in it is reported."""

    def __init__(self, finder: _UserImports, spec: str, what: str):
        self.finder = finder
        self.spec = spec
        self.what = what

    @contextmanager
    def running(self) -> Iterator[None]:
        """The user's folders importable for the user's code, and its failures as UserCodeError."""
        with self.finder.running():
            try:
                yield
            except Int8PipeError:  # int8pipe's own message, from int8pipe code the user's code called
                raise
            except SystemExit as exc:  # a run that did not finish must not end as if it had
                message = (
                    f"{self.what}: {self.spec} called sys.exit({exc.code!r}) in the middle of the run; "
                    "int8pipe stopped there and the run is FAILED. Return (or raise an exception) instead "
                    "of exiting the process."
                )
                raise UserCodeError(message, _user_traceback(exc, self.finder.modules)) from exc
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                message = (
                    f"{self.what}: {self.spec} raised {type(exc).__name__}"
                    + (f": {first}" if first else "")
                    + " (its traceback is above). The error is in that code, not in int8pipe: fix it and run again."
                )
                raise UserCodeError(message, _user_traceback(exc, self.finder.modules)) from exc


def _wrapped(obj: Any, code: _UserCode) -> Any:
    """``obj`` (a function, a class, a callable object) as a callable that runs as user code."""
    if not callable(obj):
        return obj

    @functools.wraps(obj)  # inspect.signature follows __wrapped__: arity and shard checks still read obj
    def call(*args: Any, **kwargs: Any) -> Any:
        with code.running():
            return obj(*args, **kwargs)

    call.__int8pipe_user_code__ = code  # type: ignore[attr-defined]
    return call


def iterate(fn: Any, result: Iterable[Any]) -> Iterator[Any]:
    """Iterate ``result``, which the user function ``fn`` (from :func:`import_object`) returned:
    a generator's body, a class's ``__iter__``/``__next__``, and their clean-up run as user code."""
    code: _UserCode | None = getattr(fn, "__int8pipe_user_code__", None)
    if code is None:
        yield from result
        return
    with code.running():
        it = iter(result)
    try:
        while True:
            with code.running():
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item
    finally:
        close = getattr(it, "close", None)
        if close is not None:  # a generator's finally blocks, even when int8pipe stops reading early
            with code.running():
                close()


def import_object(spec: str, search_dirs: Iterable[Path], what: str) -> Any:
    """Import ``pkg.mod:name`` from ``search_dirs`` (the YAML folder, the cwd) and return ``name``.

    A callable comes back wrapped: each call runs with the user's folders importable for the user's
    code (see the module's docstring) and turns what the code raises into :class:`UserCodeError`.
    ``what`` names the code in messages (``data.calibration.python``, ``steps.validate.metric``).
    """
    module_name, _, attr = spec.partition(":")
    dirs = [str(d) for d in dict.fromkeys(search_dirs)]
    code = _UserCode(_UserImports(dirs, module_name.partition(".")[0]), module_name, what)
    importlib.invalidate_caches()  # a module file written moments ago (tests, generated code)
    _forget_stale(module_name, search_dirs)
    with code.running():  # the module's top-level code is the user's too
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            fail(
                ConfigError,
                f"{what}: cannot import module {module_name!r} ({exc}); "
                "it is looked up next to the YAML file and in the working directory.",
            )
    _stamp(module)
    obj = getattr(module, attr, None)
    if obj is None:
        fail(ConfigError, f"{what}: module {module_name!r} has no attribute {attr!r}.")
    code.spec = spec
    return _wrapped(obj, code)


def _stamp(module: Any) -> None:
    """Remember the file's modification time, for :func:`_forget_stale`."""
    loaded = getattr(module, "__file__", None)
    if loaded:
        try:
            module.__int8pipe_mtime__ = Path(loaded).stat().st_mtime_ns
        except OSError:
            pass
