"""Loading a run config: strict YAML, ``key.sub=value`` overrides, and construction of the typed sections.

``yaml.safe_load`` gives a plain mapping; :func:`build_config` constructs the dataclasses from it so that an unknown
key, a wrong type or an impossible value fails with a :class:`UsageError` naming the key, before anything starts.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ..errors import UsageError
from .schema import RunConfig, fail


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; accept the few safe conversions YAML needs (int -> float,
    numeric strings such as ``3e-3`` that YAML 1.1 reads as strings)."""
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
                return _coerce(value, arg, key)
            except UsageError as e:
                errors.append(str(e))
        fail(key, f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            fail(key, f"expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        fail(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        fail(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        fail(key, f"expected a string, got {value!r}")
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        fail(prefix, f"expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else str(k)
            fail(where, f"unknown key; valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, raw[f.name], key)
        else:
            kwargs[f.name] = _coerce(raw[f.name], tp, key)
    return cls(**kwargs)


def build_config(raw: Any) -> RunConfig:
    """Construct a :class:`RunConfig` from a plain mapping, failing loudly on anything unexpected."""
    return _build(RunConfig, raw, "")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=1e-3`` -> (["train", "lr"], 0.001). The value is read as YAML so lists and nulls work."""
    if "=" not in text:
        raise UsageError(f"override '{text}': expected key.sub=value (e.g. train.lr=1e-3)")
    key, _, value = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise UsageError(f"override '{text}': empty key part")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise UsageError(f"override '{text}': '{'.'.join(parts[: i + 1])}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {p}: not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UsageError(f"config file {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
        raise UsageError(f"config file {where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UsageError(f"config file {p}: top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> RunConfig:
    """Read ``path`` (or start from ``base``), apply overrides, construct and validate."""
    raw = read_yaml(path) if path is not None else copy.deepcopy(base or {})
    raw = apply_overrides(raw, list(overrides or []))
    try:
        return build_config(raw)
    except UsageError as e:
        if path is not None:
            raise UsageError(f"{path}: {e}") from None
        raise
