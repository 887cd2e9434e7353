"""The pipeline YAML (contract v1): load, apply ``--set`` overrides, validate into typed objects.

Nothing runs before the whole file is valid: every path is resolved against the YAML file's folder
and checked here, and every step's section is parsed by that step's own ``Config`` dataclass.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml

from pipeline.errors import ConfigError, fail
from pipeline.settings.facts import Facts
from pipeline.settings.facts import resolve as resolve_facts
from pipeline.settings.schema import from_mapping, to_mapping
from pipeline.sources.kind import checked_path
from pipeline.sources.kinds import KINDS
from pipeline.sources.spec import DataSource

TORCH_DTYPES = ("float32", "float16", "int64", "int32", "bool")


@dataclass
class PytorchSource:
    factory: str
    inputs: dict[str, list[int]]
    args: dict[str, Any] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)  # per input; float32 where absent


@dataclass
class ModelSource:
    onnx: str | None = None
    mlflow: str | None = None
    pytorch: PytorchSource | None = None


@dataclass
class DataConfig:
    calibration: DataSource | None = None
    validation: DataSource | None = None


@dataclass
class SweepRay:
    """``sweep.ray``: where and how trials run with ``executor: ray`` (see pipeline/orchestration/ray_executor.py)."""

    address: str | None = None  # the cluster (host:port of `ray start --head`); default $RAY_ADDRESS
    num_cpus: float = 1.0  # CPUs each trial reserves: the cluster's free CPUs decide how many run at once
    num_gpus: float = 0.0  # GPUs each trial reserves (a benchmark on cuda/tensorrt needs one)
    upload: bool = False  # ship the YAML's folder with each trial (Ray's runtime_env working_dir)


@dataclass
class SweepConfig:
    grid: dict[str, list[Any]] = field(default_factory=dict)  # dotted key (as --set takes it) -> values to try
    # instead of a grid: the trials themselves, in the order they run (each {dotted key: value})
    trials: list[dict[str, Any]] = field(default_factory=list)
    stop_at_first_pass: bool = False  # no trial starts once one has passed the gate
    parallel: int = 1  # trials at once on this machine
    time_budget_s: float | None = None  # no trial starts after this; the best so far is kept
    executor: Literal["local", "ray"] = "local"  # ray: each trial a Ray task on the cluster
    ray: SweepRay = field(default_factory=SweepRay)


@dataclass
class RawPipeline:
    name: str
    model: ModelSource
    experiment: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    steps: dict[str, Any] = field(default_factory=dict)
    sweep: SweepConfig | None = None


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
    sweep: SweepConfig | None = None
    trials: list[tuple[dict[str, Any], PipelineConfig]] = field(default_factory=list)  # a sweep's, validated
    overrides: list[str] = field(default_factory=list)  # the --set items it was loaded with
    trial_of: SweepConfig | None = None  # the sweep this config is a trial of, while the sweep validates it

    def step(self, name: str) -> Any:
        return self.steps.get(name)

    @property
    def in_ray_sweep(self) -> bool:
        """A Ray sweep, or one of its trials: every trial process is handed the sweep's cluster in
        ``$RAY_ADDRESS``, which the sweep itself checks (``sweep.ray.address``)."""
        sweep = self.sweep or self.trial_of
        return sweep is not None and sweep.executor == "ray"

    @property
    def facts(self) -> Facts:
        """What several steps act on (target, weight scheme, memory budget...), from the steps' configs."""
        return resolve_facts(self.steps)

    def resolved(self) -> dict[str, Any]:
        """The fully resolved configuration, defaults included (logged with every pipeline run).

        Paths inside the YAML's folder are given relative to it, so runs from two checkouts compare.
        """
        base = str(self.base_dir) + "/"

        def rel(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: rel(v) for k, v in value.items()}
            if isinstance(value, list):
                return [rel(v) for v in value]
            return value[len(base) :] if isinstance(value, str) and value.startswith(base) else value

        return rel(
            {
                "name": self.name,
                "experiment": self.experiment,
                "model": to_mapping(self.model),
                "data": to_mapping(self.data),
                "steps": {k: to_mapping(v) for k, v in self.steps.items()},
            }
        )


class StepSpec(Protocol):
    """What the config layer needs of a step: the class of its section and its cross-section checks.

    The steps are handed in (``steps=``, normally ``steps.CATALOG``): they sit above this layer."""

    Config: type

    def check(self, pipeline: PipelineConfig) -> None: ...


class ExcessiveAliasing(yaml.YAMLError):
    """Anchors and aliases that expand to far more than was written (a "billion laughs" document)."""


ALIAS_EXPANSION_FLOOR = 10_000  # nodes aliases may add, whatever the document's size ...
ALIAS_EXPANSION_RATIO = 10  # ... or this many times the nodes written, if that is more


class _SafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses alias expansion beyond a sane size before constructing anything.

    Aliases share one composed node, so composing is cheap; it is constructing and then walking the
    expanded structure (deep copies, validation, digests) that explodes. Like go-yaml's "excessive
    aliasing" check, the expanded size is computed from the node graph first (linear in the nodes
    written) and the document is refused when aliases would add more than
    max(ALIAS_EXPANSION_FLOOR, ALIAS_EXPANSION_RATIO x written) nodes, or refer to themselves.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        _check_aliasing(node)
        return super().construct_document(node)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_aliasing(root: yaml.Node) -> None:
    expanded: dict[int, int] = {}  # id(node) -> nodes in its expanded tree
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # iterative post-order walk over distinct nodes: deep documents do not recurse here
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            expanded[key] = 1 + sum(expanded[id(c)] for c in _children(node))
            continue
        if key in expanded:
            continue
        if key in on_path:
            raise ExcessiveAliasing(
                f"an alias refers to a node that contains it (line {node.start_mark.line + 1}); "
                "a pipeline file has no recursive structures"
            )
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in expanded)
    written = len(expanded)
    added = expanded[id(root)] - written
    limit = max(ALIAS_EXPANSION_FLOOR, ALIAS_EXPANSION_RATIO * written)
    if added > limit:
        raise ExcessiveAliasing(
            f"excessive aliasing: its anchors and aliases expand {written:,} written YAML nodes to "
            f"{expanded[id(root)]:,} (at most {limit:,} more are allowed). A pipeline file never needs "
            "this; write the values out or alias smaller parts"
        )


def _yaml_load(text: str) -> Any:
    """``yaml.safe_load`` with :class:`_SafeLoader`'s alias-expansion limit."""
    return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - a SafeLoader subclass


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a copy of ``raw``.

    ``steps.<step>=null`` drops that step: in the YAML an empty ``promote:`` turns a step on with its
    defaults, but nobody types ``--set steps.promote=null`` for that (``{}`` does it); they mean "without"."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            fail(ConfigError, f"--set {item!r}: expected KEY=VALUE, e.g. --set steps.calibrate.method=percentile.")
        try:
            value = _yaml_load(text)
        except ExcessiveAliasing as exc:
            fail(ConfigError, f"--set {item!r}: {exc}.")
        except yaml.YAMLError as exc:
            fail(ConfigError, f"--set {item!r}: the value is not valid YAML ({exc}).")
        parts = key.strip().split(".")
        if value is None and len(parts) == 2 and parts[0] == "steps":
            steps = out.get("steps")
            if isinstance(steps, dict):
                steps.pop(parts[1], None)
            continue
        set_key(out, key.strip(), value, f"--set {item!r}")
    return out


def set_key(raw: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set the dotted ``key`` of ``raw`` to ``value`` in place, creating mappings on the way."""
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            fail(ConfigError, f"{where}: {'.'.join(parts[: i + 1])} is not a mapping.")
        node = nxt
    node[parts[-1]] = value


def _exactly_one(obj: Any, names: tuple[str, ...], path: str) -> str:
    given = [n for n in names if getattr(obj, n) is not None]
    if len(given) != 1:
        fail(ConfigError, f"{path}: give exactly one of {', '.join(names)} (got {', '.join(given) or 'none'}).")
    return given[0]


def _check_model(src: ModelSource, base: Path) -> None:
    which = _exactly_one(src, ("onnx", "mlflow", "pytorch"), "model")
    if which == "onnx":
        src.onnx = checked_path(base, src.onnx or "", "model.onnx")
    elif which == "mlflow" and not str(src.mlflow).startswith(("models:/", "runs:/")):
        fail(ConfigError, f"model.mlflow: expected a models:/ or runs:/ URI, got {src.mlflow!r}.")
    elif which == "pytorch" and src.pytorch is not None:
        if ":" not in src.pytorch.factory:
            fail(ConfigError, "model.pytorch.factory: expected 'package.module:function'.")
        for name, dtype in src.pytorch.dtypes.items():
            if name not in src.pytorch.inputs:
                fail(
                    ConfigError,
                    f"model.pytorch.dtypes.{name}: no such input; model.pytorch.inputs names "
                    f"{', '.join(src.pytorch.inputs) or 'none'}.",
                )
            if dtype not in TORCH_DTYPES:
                expected = ", ".join(TORCH_DTYPES)
                fail(ConfigError, f"model.pytorch.dtypes.{name}: expected one of {expected}, got {dtype!r}.")


def _check_data(src: DataSource, base: Path, path: str) -> None:
    which = _exactly_one(src, tuple(KINDS), path)
    KINDS[which].check(src, base, path)
    if src.args and which != "python":
        fail(ConfigError, f"{path}.args: only used with python:, not with {which}:.")
    if src.deps and which != "python":
        fail(ConfigError, f"{path}.deps: only used with python: (other sources are hashed file by file).")
    resolved = []
    for i, dep in enumerate(src.deps):
        p = (base / dep).resolve()
        if not p.exists():
            fail(ConfigError, f"{path}.deps[{i}]: not found: {p} (paths are relative to the YAML file's folder).")
        resolved.append(str(p))
    src.deps = resolved
    if src.limit is not None and src.limit <= 0:
        fail(ConfigError, f"{path}.limit: expected a positive integer, got {src.limit}.")
    for name, axis in src.batch_axes.items():
        if isinstance(axis, bool) or not isinstance(axis, int) or axis < 0:
            fail(ConfigError, f"{path}.batch_axes.{name}: expected the axis index (an integer >= 0), got {axis!r}.")
    both = sorted(set(src.batch_axes) & set(src.constants))
    if both:
        fail(
            ConfigError,
            f"{path}: input {both[0]!r} is both in batch_axes and in constants; a constant has no sample axis "
            "(it is passed unchanged with every batch), so keep it in one of the two.",
        )
    if src.images is not None and (src.batch_axes or src.constants):
        fail(ConfigError, f"{path}: batch_axes and constants are for npz, npy and python sources, not images.")


def parse(
    raw: Any,
    base_dir: Path,
    *,
    steps: Mapping[str, StepSpec],
    source: Path | None = None,
    overrides: list[str] | None = None,
    trial_of: SweepConfig | None = None,
) -> PipelineConfig:
    """Validate a raw mapping (already overridden with ``overrides``) into a :class:`PipelineConfig`.

    ``steps``: the step classes by name, in pipeline order (``steps.CATALOG``); ``trial_of``: the sweep
    whose trial this is (its steps' checks may rely on what the sweep gives a trial)."""
    catalog = steps

    if not isinstance(raw, dict):
        fail(ConfigError, f"the pipeline file must be a YAML mapping, got {type(raw).__name__}.")
    top = from_mapping(RawPipeline, raw, "")
    _check_model(top.model, base_dir)
    for which in ("calibration", "validation"):
        src = getattr(top.data, which)
        if src is not None:
            _check_data(src, base_dir, f"data.{which}")
    unknown = [k for k in top.steps if k not in catalog]
    if unknown:
        fail(ConfigError, f"steps.{unknown[0]}: unknown step; the steps are {', '.join(catalog)}.")
    sections: dict[str, Any] = {
        name: from_mapping(catalog[name].Config, top.steps[name], f"steps.{name}")
        for name in catalog
        if name in top.steps
    }
    cfg = PipelineConfig(
        name=top.name,
        experiment=top.experiment or top.name,
        model=top.model,
        data=top.data,
        steps=sections,
        base_dir=base_dir,
        source=source,
        sweep=top.sweep,
        overrides=list(overrides or []),
        trial_of=trial_of,
    )
    for name in sections:
        catalog[name].check(cfg)
    _resolve_auto_method(cfg, top)
    if top.sweep is not None:
        cfg.trials = _trials(raw, top.sweep, cfg, catalog)
    return cfg


# calibration.methods.METHODS, written out: config sits below the numerics it configures
# (tests/test_calibration_methods.py holds the two equal)
AUTO_METHODS = ["minmax", "entropy", "percentile", "mse"]
AUTO_FALLBACK = "mse"  # without a validate step there is nothing to choose by
# method: auto without a sweep of the user's: the levers that won on the networks measured
# (benchmarks/results/defaults_across_networks.md), in the order they are tried. One calibration serves
# every method (thresholds from the same histograms); GPTQ costs most, so it comes after the free levers.
AUTO_SEARCH = [
    {"steps.calibrate.method": "mse"},  # the defaults (shifted activations or smoothing by graph kind)
    {"steps.calibrate.method": "percentile"},  # best or tied-best on six CNNs
    {"steps.calibrate.method": "percentile", "steps.quantize.weight_rounding": "gptq"},  # +0.02 on Lite0
    {"steps.calibrate.method": "entropy"},
    {"steps.calibrate.method": "minmax"},
]


def _resolve_auto_method(cfg: PipelineConfig, top: RawPipeline) -> None:
    """``calibrate.method: auto``: with a validate step, a sweep over the four methods (one calibration
    serves them all; the validate metric picks); without one, the default method."""
    calibrate = cfg.steps.get("calibrate")
    if calibrate is None or calibrate.method != "auto" or calibrate.from_cache:
        return
    if "validate" not in cfg.steps:
        calibrate.method = AUTO_FALLBACK
        return
    if top.sweep is not None and (top.sweep.grid or top.sweep.trials):  # the user's grid, over the four methods too
        sweep = top.sweep
        sweep.grid = {**sweep.grid, "steps.calibrate.method": sweep.grid.get("steps.calibrate.method", AUTO_METHODS)}
    else:  # the search: most likely and cheapest first, until one passes
        # a sweep section saying only where and how trials run (executor: ray, parallel, a budget) keeps it
        sweep = dataclasses.replace(
            top.sweep or SweepConfig(), trials=[dict(t) for t in AUTO_SEARCH], stop_at_first_pass=True
        )
    top.sweep = cfg.sweep = sweep


def _trials(
    raw: dict[str, Any], sweep: SweepConfig, cfg: PipelineConfig, catalog: Mapping[str, StepSpec]
) -> list[tuple[dict[str, Any], PipelineConfig]]:
    """Every combination of the grid (or every entry of ``sweep.trials``, in order), each validated
    as a whole pipeline before anything runs.

    A trial's ``overrides`` are the sweep's plus its combination: a trial process rebuilds the same
    config from the YAML and them."""
    import itertools

    if sweep.grid and sweep.trials:
        fail(ConfigError, "sweep: give either grid (every combination) or trials (a list, in order), not both.")
    if sweep.trials:
        if any(not isinstance(t, dict) or not t for t in sweep.trials):
            fail(ConfigError, "sweep.trials: expected a list of non-empty mappings {dotted.key: value}.")
    elif not sweep.grid or any(not values for values in sweep.grid.values()):
        fail(ConfigError, "sweep.grid: give at least one key with a non-empty list of values (or sweep.trials).")
    if sweep.parallel < 1:
        fail(ConfigError, f"sweep.parallel: expected a positive integer, got {sweep.parallel}.")
    where = {**{k: f"sweep.grid.{k}" for k in sweep.grid}, **{k: f"sweep.trials: {k}" for t in sweep.trials for k in t}}
    for key, path in where.items():
        if key.split(".")[0] in ("sweep", "name", "experiment"):
            fail(ConfigError, f"{path}: a trial cannot change the sweep, the name or the experiment.")
    base = {k: v for k, v in raw.items() if k != "sweep"}
    out = []
    combos = sweep.trials or [dict(zip(sweep.grid, c)) for c in itertools.product(*sweep.grid.values())]
    for overrides in combos:
        trial = copy.deepcopy(base)
        for key, value in overrides.items():
            set_key(trial, key, value, f"sweep.grid.{key}")
        sets = [*cfg.overrides, "sweep=null", *(f"{k}={json.dumps(v)}" for k, v in overrides.items())]
        try:
            parsed = parse(trial, cfg.base_dir, steps=catalog, source=cfg.source, overrides=sets, trial_of=sweep)
            out.append((overrides, parsed))
        except ConfigError as exc:
            fail(ConfigError, f"sweep trial {overrides}: {exc}")
    return out


def load(path: str | Path, overrides: list[str] | None = None, *, steps: Mapping[str, StepSpec]) -> PipelineConfig:
    """Read, override and validate the pipeline YAML at ``path`` (``steps``: as :func:`parse` takes them)."""
    p = Path(path)
    if not p.is_file():
        fail(ConfigError, f"pipeline file not found: {p.resolve()}.")
    try:
        raw = _yaml_load(p.read_text())
    except ExcessiveAliasing as exc:
        fail(ConfigError, f"{p}: {exc}.")
    except yaml.YAMLError as exc:
        fail(ConfigError, f"{p}: not valid YAML: {exc}")
    raw = apply_overrides(raw if raw is not None else {}, overrides or [])
    return parse(raw, p.resolve().parent, steps=steps, source=p.resolve(), overrides=overrides)
