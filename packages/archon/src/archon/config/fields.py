"""Typed, documented config dataclasses loaded from YAML plus `--a.b=v` overrides.

Every field carries a help string (`doc(default, "help")`), so `archon train --help` can list each field with
its doc and default. Unknown keys and wrong types raise ValueError naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import MISSING, field, fields, is_dataclass
from typing import Any

import yaml

_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^[-+]?(inf|nan)$", re.IGNORECASE)


def doc(default: Any = MISSING, help: str = "", *, factory: Any = MISSING) -> Any:  # noqa: A002
    """A dataclass field with a help string."""
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _origin_args(tp: Any) -> tuple[Any, tuple[Any, ...]]:
    return typing.get_origin(tp), typing.get_args(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = _origin_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except (ValueError, TypeError) as e:
                errors.append(str(e))
        raise ValueError(f"config key {key!r}: {value!r} does not match {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"config key {key!r}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r}: expected a list, got {type(value).__name__} {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if isinstance(tp, type) and is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r}: expected a mapping (section), got {type(value).__name__} {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config key {key!r}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"config key {key!r}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)  # YAML 1.1 reads `1e-3` (no dot) as a string
        raise ValueError(f"config key {key!r}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"config key {key!r}: expected a string, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types raise ValueError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"unknown config key {prefix + unknown[0]!r}; valid keys in {prefix.rstrip('.') or 'the top level'}: "
            f"{sorted(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def parse_override(arg: str) -> tuple[list[str], Any]:
    """`--a.b.c=v` or `+a.b.c=v` (the AReaL/Hydra form) -> (['a','b','c'], parsed v)."""
    body = arg.lstrip("+-")
    if "=" not in body or not body.split("=", 1)[0]:
        raise ValueError(f"override {arg!r} must look like --section.field=value")
    key, raw = body.split("=", 1)
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for arg in overrides:
        path, value = parse_override(arg)
        node = data
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {arg!r}: {p!r} is not a section")
        node[path[-1]] = value
    return data


def load_config(cls: type, yaml_path: str | None, overrides: Sequence[str] = ()) -> Any:
    data: dict[str, Any] = {}
    if yaml_path:
        if os.path.isdir(yaml_path):
            raise ValueError(f"{yaml_path}: is a directory; pass a YAML config file")
        with open(yaml_path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{yaml_path}: the top level must be a mapping")
    return from_dict(cls, apply_overrides(data, list(overrides)))


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf field, for --help."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and is_dataclass(tp):
            rows.extend(describe(tp, prefix + f.name + "."))
            continue
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else "<required>")
        rows.append((prefix + f.name, repr(default), f.metadata.get("help", "")))
    return rows
