"""A data source as the YAML writes it (``data.calibration``, ``data.validation``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class ImagesSource:
    dir: str
    size: list[int]
    mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    scale: float = 255.0
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    channels: Literal["RGB", "BGR", "L"] = "RGB"
    input: str | None = None


@dataclass
class DataSource:
    npz: str | None = None
    npy: dict[str, str] | None = None
    python: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    images: ImagesSource | None = None
    limit: int | None = None
    # python: files or folders the function reads. Declared, their content (with the module's) proves
    # the data unchanged without running the function; undeclared, the samples themselves are hashed.
    deps: list[str] = field(default_factory=list)
    # stateful / streaming models (see pipeline/graph/layout.py): the axis that indexes samples, per input
    # where it is not 0, and the inputs that are the same for every sample (passed unchanged)
    batch_axes: dict[str, int] = field(default_factory=dict)
    constants: list[str] = field(default_factory=list)
