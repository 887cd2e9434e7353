"""User code named in the YAML (``python:`` sources, ``factory:``, a metric ``pkg.mod:fn``): imported
from the YAML file's folder and the working directory without leaving them on ``sys.path``."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, fail


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


class _LastResortFinder(importlib.abc.MetaPathFinder):
    """Finds top-level modules in the YAML folder / working directory that nothing on ``sys.path``
    provides, consulted after every other finder: code imported from there may still import its
    sibling files lazily (inside a function, a generator), while a file there that shares a library's
    name can never stand in for the library."""

    def __init__(self, dirs: list[str]):
        self.dirs = dirs

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if path is not None:  # a submodule: its package's __path__ finds it
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, self.dirs)


def _add_fallback_finder(search_dirs: Iterable[Path]) -> None:
    dirs = [str(d) for d in dict.fromkeys(search_dirs)]
    if not any(isinstance(f, _LastResortFinder) and f.dirs == dirs for f in sys.meta_path):
        sys.meta_path.append(_LastResortFinder(dirs))


def import_object(spec: str, search_dirs: Iterable[Path], what: str) -> Any:
    """Import ``pkg.mod:name`` with ``search_dirs`` (the YAML folder, the cwd) on the path.

    The folders are on ``sys.path`` only while that module is imported (so it may import files
    beside it at its top level), and ``sys.path`` is restored exactly afterwards: a file next to the
    YAML that happens to share a library's name (``pyparsing.py``, ``json.py``) must never stand in
    for that library when something imports it later in the run. Afterwards the folders are searched
    last (:class:`_LastResortFinder`), for the module's lazy imports of its sibling files.
    """
    module_name, _, attr = spec.partition(":")
    saved = list(sys.path)
    sys.path[:0] = [str(d) for d in dict.fromkeys(search_dirs) if str(d) not in saved]
    importlib.invalidate_caches()  # a module file written moments ago (tests, generated code)
    _forget_stale(module_name, search_dirs)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        fail(
            ConfigError,
            f"{what}: cannot import module {module_name!r} ({exc}); "
            "it is looked up next to the YAML file and in the working directory.",
        )
    finally:
        sys.path[:] = saved
    _add_fallback_finder(search_dirs)
    loaded = getattr(module, "__file__", None)
    if loaded:
        try:
            module.__int8pipe_mtime__ = Path(loaded).stat().st_mtime_ns  # type: ignore[attr-defined]
        except OSError:
            pass
    obj = getattr(module, attr, None)
    if obj is None:
        fail(ConfigError, f"{what}: module {module_name!r} has no attribute {attr!r}.")
    return obj
