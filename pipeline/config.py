"""The pipeline YAML (contract v1): load, apply ``--set`` overrides, validate into typed objects.

Nothing runs before the whole file is valid: every path is resolved against the YAML file's folder
and checked here, and every step's section is parsed by that step's own ``Config`` dataclass.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError, fail
from pipeline.schema import from_mapping, to_mapping


@dataclass
class PytorchSource:
    factory: str
    inputs: dict[str, list[int]]
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelSource:
    onnx: str | None = None
    mlflow: str | None = None
    pytorch: PytorchSource | None = None


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


@dataclass
class DataConfig:
    calibration: DataSource | None = None
    validation: DataSource | None = None


@dataclass
class RawPipeline:
    name: str
    model: ModelSource
    experiment: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    steps: dict[str, Any] = field(default_factory=dict)


@dataclass
class PipelineConfig:
    """A validated pipeline: what the runner executes."""

    name: str
    experiment: str
    model: ModelSource
    data: DataConfig
    steps: dict[str, Any]  # step name -> that step's Config object, in pipeline order
    base_dir: Path
    source: Path | None = None

    def step(self, name: str) -> Any:
        return self.steps.get(name)

    def resolved(self) -> dict[str, Any]:
        """The fully resolved configuration, defaults included (logged with every pipeline run)."""
        return {
            "name": self.name,
            "experiment": self.experiment,
            "model": to_mapping(self.model),
            "data": to_mapping(self.data),
            "steps": {k: to_mapping(v) for k, v in self.steps.items()},
        }


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a copy of ``raw``."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            fail(ConfigError, f"--set {item!r}: expected KEY=VALUE, e.g. --set steps.calibrate.method=percentile.")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            fail(ConfigError, f"--set {item!r}: the value is not valid YAML ({exc}).")
        node = out
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                fail(ConfigError, f"--set {item!r}: {'.'.join(parts[: i + 1])} is not a mapping.")
            node = nxt
        node[parts[-1]] = value
    return out


def _exactly_one(obj: Any, names: tuple[str, ...], path: str) -> str:
    given = [n for n in names if getattr(obj, n) is not None]
    if len(given) != 1:
        fail(ConfigError, f"{path}: give exactly one of {', '.join(names)} (got {', '.join(given) or 'none'}).")
    return given[0]


def _check_path(base: Path, value: str, path: str, kind: str = "file") -> str:
    p = (base / value).resolve()
    ok = p.is_dir() if kind == "folder" else p.is_file()
    if not ok:
        fail(ConfigError, f"{path}: {kind} not found: {p} (paths are relative to the YAML file's folder).")
    return str(p)


def _check_model(src: ModelSource, base: Path) -> None:
    which = _exactly_one(src, ("onnx", "mlflow", "pytorch"), "model")
    if which == "onnx":
        src.onnx = _check_path(base, src.onnx or "", "model.onnx")
    elif which == "mlflow" and not str(src.mlflow).startswith(("models:/", "runs:/")):
        fail(ConfigError, f"model.mlflow: expected a models:/ or runs:/ URI, got {src.mlflow!r}.")
    elif which == "pytorch" and ":" not in (src.pytorch.factory if src.pytorch else ""):
        fail(ConfigError, "model.pytorch.factory: expected 'package.module:function'.")


def _check_data(src: DataSource, base: Path, path: str) -> None:
    which = _exactly_one(src, ("npz", "npy", "python", "images"), path)
    if which == "npz":
        src.npz = _check_path(base, src.npz or "", f"{path}.npz")
    elif which == "npy":
        src.npy = {k: _check_path(base, v, f"{path}.npy.{k}") for k, v in (src.npy or {}).items()}
    elif which == "python" and ":" not in (src.python or ""):
        fail(ConfigError, f"{path}.python: expected 'package.module:function', got {src.python!r}.")
    elif which == "images" and src.images is not None:
        src.images.dir = _check_path(base, src.images.dir, f"{path}.images.dir", kind="folder")
        if len(src.images.size) != 2:
            fail(ConfigError, f"{path}.images.size: expected [height, width], got {src.images.size}.")
        channels = 1 if src.images.channels == "L" else 3
        for key in ("mean", "std"):
            if len(getattr(src.images, key)) != channels:
                fail(
                    ConfigError,
                    f"{path}.images.{key}: expected {channels} values for channels {src.images.channels}, "
                    f"got {getattr(src.images, key)}.",
                )
    if src.args and which != "python":
        fail(ConfigError, f"{path}.args: only used with python:, not with {which}:.")
    if src.limit is not None and src.limit <= 0:
        fail(ConfigError, f"{path}.limit: expected a positive integer, got {src.limit}.")


def parse(raw: Any, base_dir: Path, source: Path | None = None) -> PipelineConfig:
    """Validate a raw mapping (already overridden) into a :class:`PipelineConfig`."""
    from steps import STEP_ORDER, get_step

    if not isinstance(raw, dict):
        fail(ConfigError, f"the pipeline file must be a YAML mapping, got {type(raw).__name__}.")
    top = from_mapping(RawPipeline, raw, "")
    _check_model(top.model, base_dir)
    for which in ("calibration", "validation"):
        src = getattr(top.data, which)
        if src is not None:
            _check_data(src, base_dir, f"data.{which}")
    unknown = [k for k in top.steps if k not in STEP_ORDER]
    if unknown:
        fail(ConfigError, f"steps.{unknown[0]}: unknown step; the steps are {', '.join(STEP_ORDER)}.")
    steps: dict[str, Any] = {}
    for name in STEP_ORDER:
        if name in top.steps:
            step = get_step(name)
            steps[name] = from_mapping(step.Config, top.steps[name], f"steps.{name}")
    cfg = PipelineConfig(
        name=top.name,
        experiment=top.experiment or top.name,
        model=top.model,
        data=top.data,
        steps=steps,
        base_dir=base_dir,
        source=source,
    )
    for name in steps:
        get_step(name).check(cfg)
    return cfg


def load(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read, override and validate the pipeline YAML at ``path``."""
    p = Path(path)
    if not p.is_file():
        fail(ConfigError, f"pipeline file not found: {p.resolve()}.")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        fail(ConfigError, f"{p}: not valid YAML: {exc}")
    raw = apply_overrides(raw if raw is not None else {}, overrides or [])
    return parse(raw, p.resolve().parent, source=p.resolve())
