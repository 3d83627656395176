"""Typed loading of nested YAML sections into dataclasses, with errors that name the key (and its line).

Unknown keys are rejected with the closest valid name; missing required keys and wrong types likewise.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

import yaml

from telechat_ms.errors import ConfigError

MISSING = dataclasses.MISSING


def yaml_line_map(text: str) -> dict[str, int]:
    """dotted.key -> 1-based line number of that key in a YAML document (for error messages)."""
    lines: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                path = f"{prefix}.{key.value}" if prefix else str(key.value)
                lines[path] = key.start_mark.line + 1
                walk(value, path)

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    walk(root, "")
    return lines


class Where:
    """Formats a location: 'file.yaml:12: key a.b' (line when known)."""

    def __init__(self, source: str, lines: dict[str, int] | None = None):
        self.source = source
        self.lines = lines or {}

    def __call__(self, path: str) -> str:
        line = self.lines.get(path)
        return f"{self.source}:{line}: '{path}'" if line else f"{self.source}: '{path}'"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(value: Any, tp: Any, path: str, where: Where) -> Any:
    """Coerce/validate one value against a type hint; returns the value to store."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, path, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0]) if len(errors) == 1 else ConfigError(
            f"{where(path)} has the wrong type: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where(path)} must be a mapping (section), got {type(value).__name__}")
        return build(tp, value, where, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where(path)} must be a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_check_value(v, item, f"{path}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where(path)} must be a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)  # YAML reads 1e-5 (no dot) as a string
                except ValueError:
                    pass
            raise ConfigError(f"{where(path)} must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where(path)} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where(path)} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where(path)} must be a string, got {type(value).__name__} {value!r}")
        return value
    return value


def build(cls: type, data: dict[str, Any], where: Where, prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from `data`, checking keys and types recursively."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        rejected = getattr(cls, "REJECTED_KEYS", {}).get(key)
        if rejected:
            raise ConfigError(f"{where(path)}: {rejected}")
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean '{(prefix + '.' if prefix else '') + close[0]}'?" if close else \
                f"; valid keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"{where(path)}: unknown key{hint}")
        kwargs[key] = _check_value(value, hints[key], path, where)
    for name, f in fields.items():
        if name not in kwargs and f.default is MISSING and f.default_factory is MISSING:
            path = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"{where.source}: missing required key '{path}'")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if callable(check):
        check(where, prefix)
    return obj


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """data['a']['b'] = value for 'a.b', creating sections as needed."""
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """['--a.b=3', 'c.d=x'] -> [('a.b', 3), ('c.d', 'x')] with YAML typing of the values."""
    out = []
    for item in items:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"override {item!r}: expected --key.path=value")
        key, raw = text.split("=", 1)
        out.append((key, yaml.safe_load(raw) if raw != "" else ""))
    return out
