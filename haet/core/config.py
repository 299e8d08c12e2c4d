"""Hyperparameter dataclasses: validation helpers and parsing from ``k=v`` strings.

Each method keeps its hyperparameters in a frozen dataclass validated in ``__post_init__`` with the
helpers below, so a bad value fails at construction with a message naming the parameter and the
allowed range. `parse_params` turns the command line's strings into typed values using the
dataclass's annotations.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, get_args, get_origin

from .errors import ConfigError


def check_range(name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False, integer: bool = False) -> None:
    """Raise ConfigError unless `value` is a number in the interval described."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = is_number and math.isfinite(value) and (not integer or float(value).is_integer())
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        interval = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name} must be {kind} in {interval}, got {value!r}")


def check_choice(name: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def parse_kv(rest: str, owner: str) -> dict[str, str]:
    """The ``k=v,k=v`` part of a ``name:k=v,k=v`` spec as strings; `owner` ("method qat") names it in errors."""
    name = owner.split()[-1]
    raw: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"bad parameter {item!r} for {owner}; write {name}:key=value,key=value")
        if key.strip() in raw:
            raise ConfigError(f"parameter {key.strip()!r} given twice for {owner}")
        raw[key.strip()] = value.strip()
    return raw


def parse_params(config_class: type, raw: dict[str, str], *, owner: str) -> Any:
    """Build `config_class` from string values, converting each by its annotation."""
    hints = typing.get_type_hints(config_class)
    names = [f.name for f in dataclasses.fields(config_class) if f.init]
    values: dict[str, Any] = {}
    for key, text in raw.items():
        if key not in names:
            raise ConfigError(f"unknown parameter {key!r} for {owner}; choose from: {', '.join(names) or '(none)'}")
        values[key] = _convert(f"{owner}:{key}", hints[key], text)
    try:
        return config_class(**values)
    except ConfigError as err:
        raise ConfigError(f"{owner}: {err}") from None


def _convert(name: str, hint: Any, text: str) -> Any:
    origin = get_origin(hint)
    if origin is Literal:
        allowed = get_args(hint)
        for a in allowed:
            if str(a) == text:
                return a
        raise ConfigError(f"{name} must be one of {', '.join(map(str, allowed))}, got {text!r}")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if type(None) in get_args(hint) and text.lower() in ("none", "null", ""):
            return None
        errors = []
        for a in args:
            try:
                return _convert(name, a, text)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{name}: cannot parse {text!r}")
    if origin in (tuple, list):
        (item,) = {a for a in get_args(hint) if a is not Ellipsis} or {str}
        parts = [p for p in text.replace("x", "/").split("/") if p]
        return origin(_convert(name, item, p) for p in parts)
    if hint is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {text!r}")
    if hint is int:
        try:
            f = float(text)
            if f.is_integer():
                return int(f)
        except ValueError:
            pass
        raise ConfigError(f"{name} must be an integer, got {text!r}")
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {text!r}") from None
    if hint is str:
        return text
    raise ConfigError(f"{name}: parameters of type {hint} cannot be given on the command line")
