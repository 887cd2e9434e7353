"""Steps, found by name from the YAML: one module per step, each with a ``STEP`` (a :class:`Step`)."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from steps.base import Step

STEP_ORDER = ("export", "calibrate", "quantize", "validate", "benchmark", "engine", "promote")


def get_step(name: str) -> type[Step]:
    """The Step class for ``name`` (module ``steps.<name>``, attribute ``STEP``)."""
    module = importlib.import_module(f"steps.{name}")
    step: type[Step] = module.STEP
    return step


class Catalog(Mapping[str, type[Step]]):
    """The steps int8pipe ships, by name in pipeline order; a step's module loads when it is asked for.

    The config layer reads step sections through this mapping (``load(..., steps=CATALOG)``): it
    knows steps only through what it is handed."""

    def __getitem__(self, name: str) -> type[Step]:
        if name not in STEP_ORDER:
            raise KeyError(name)
        return get_step(name)

    def __iter__(self) -> Iterator[str]:
        return iter(STEP_ORDER)

    def __len__(self) -> int:
        return len(STEP_ORDER)


CATALOG = Catalog()

__all__ = ["CATALOG", "STEP_ORDER", "Catalog", "Step", "get_step"]
