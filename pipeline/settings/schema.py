"""Turn plain YAML mappings into typed dataclasses, naming the exact key on any mistake.

Each config class is a dataclass whose field annotations are the schema: ``int``, ``float``, ``str``,
``bool``, ``list[X]``, ``dict[str, X]``, ``X | None``, ``Literal[...]`` and nested dataclasses.
A field without a default is required.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from pipeline.errors import ConfigError, fail

T = TypeVar("T")

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if tp in _TYPE_NAMES:
        return _TYPE_NAMES[tp]
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple):
        return "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp) if a is not type(None))
    return str(tp)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:  # X | None: X's own error names the exact key (an unknown key of a nested mapping)
            return _coerce(value, arms[0], path)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(exc)
        fail(ConfigError, f"{path}: expected {_describe(tp)}, got {value!r}.")
    if origin is Literal:
        if value not in get_args(tp):
            fail(ConfigError, f"{path}: expected {_describe(tp)}, got {value!r}.")
        return value
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, path)  # type: ignore[arg-type]
    if origin is list:
        if not isinstance(value, list):
            fail(ConfigError, f"{path}: expected a list, got {value!r}.")
        (item,) = get_args(tp)
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            fail(ConfigError, f"{path}: expected a mapping, got {value!r}.")
        args = get_args(tp)
        vt = args[1] if args else Any
        return {str(k): _coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        fail(ConfigError, f"{path}: expected {_describe(tp)}, got {value!r}.")
    if isinstance(tp, type) and not isinstance(value, tp):
        fail(ConfigError, f"{path}: expected {_describe(tp)}, got {value!r}.")
    return value


def from_mapping(cls: type[T], data: Any, path: str) -> T:
    """Build ``cls`` from ``data``; unknown keys, missing keys and wrong types raise ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        fail(ConfigError, f"{path}: expected a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}: unknown key {unknown[0]!r} (at {path}.{unknown[0]})" if path else (
            f"unknown top-level key {unknown[0]!r}"
        )  # fmt: skip
        fail(ConfigError, f"{where}; allowed keys: {', '.join(fields)}.")
    kwargs = {}
    for name, field in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], sub)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            fail(ConfigError, f"{sub}: required key is missing (expected {_describe(hints[name])}).")
    return cls(**kwargs)


def to_mapping(obj: Any) -> Any:
    """The plain-data form of a config object (for logging and cache keys)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_mapping(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_mapping(v) for v in obj]
    return obj
