"""Steps, found by name from the YAML. One module per step."""

from __future__ import annotations

import importlib

from steps.base import Step

STEP_ORDER = ("export", "calibrate", "quantize", "validate", "benchmark", "promote")


def get_step(name: str) -> type[Step]:
    """The Step class for ``name`` (module ``steps.<name>``, attribute ``STEP``)."""
    module = importlib.import_module(f"steps.{name}")
    step: type[Step] = module.STEP
    return step


__all__ = ["STEP_ORDER", "Step", "get_step"]
