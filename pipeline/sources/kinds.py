"""Every data-source kind, by the YAML key that names it (in the order errors list them)."""

from __future__ import annotations

from pipeline.sources.images import Images
from pipeline.sources.kind import SourceKind
from pipeline.sources.npy import Npy
from pipeline.sources.npz import Npz
from pipeline.sources.python_fn import PythonFunction
from pipeline.sources.spec import DataSource

KINDS: dict[str, SourceKind] = {k.name: k for k in (Npz(), Npy(), PythonFunction(), Images())}


def kind_of(src: DataSource) -> SourceKind:
    """The kind a validated source names (config checked that it names exactly one)."""
    return next(kind for name, kind in KINDS.items() if getattr(src, name))
