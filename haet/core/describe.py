"""What a config dataclass accepts, for ``haet methods NAME``: each parameter's type, default,
allowed range and one line.

- type and default: from the dataclass;
- the line: the comment after the field (``fraction: float = 0.3  # share of ...``) or the ``#:``
  comment above it, read from the class's source;
- the range: a ``RANGES`` class attribute ``{name: "text"}`` when the class has one, else the
  literal bounds of its ``check_range``/``check_choice`` calls (the validation that enforces them),
  else the choices of a ``Literal`` type.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Any

_FIELD = re.compile(r"^\s*(\w+)\s*:\s*[^=#]+(?:=[^#]*)?(?:#\s*(.*))?$")
_DOC = re.compile(r"^\s*#:\s*(.*)$")
_RANGE = re.compile(r"check_range\(\s*[\"'](\w+)[\"']\s*,\s*self\.\w+\s*,\s*([^,()]+?)\s*(?:,\s*([^,()=]+?)\s*)?"
                    r"((?:,\s*\w+\s*=\s*\w+\s*)*)\)")
_CHOICE = re.compile(r"check_choice\(\s*[\"'](\w+)[\"']\s*,\s*self\.\w+\s*,\s*(\([^()]*\)|\[[^\[\]]*\])\s*\)")


def describe(config_class: type) -> list[dict[str, Any]]:
    """One dict per parameter: name, type, default, range, help."""
    hints = typing.get_type_hints(config_class)
    try:
        source = inspect.getsource(config_class)
    except (OSError, TypeError):
        source = ""
    helps, ranges = _comments(source), _ranges(source)
    ranges.update(getattr(config_class, "RANGES", {}) or {})
    out = []
    for f in dataclasses.fields(config_class):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        hint = hints.get(f.name, f.type)
        out.append({"name": f.name, "type": type_name(hint), "default": default,
                    "range": ranges.get(f.name) or _literal_choices(hint), "help": helps.get(f.name, "")})
    return out


def type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "choice"
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        return " | ".join(type_name(a) for a in typing.get_args(hint))
    if origin in (tuple, list):
        return f"{origin.__name__} of {type_name(typing.get_args(hint)[0])}" if typing.get_args(hint) else origin.__name__
    if hint is type(None):
        return "none"
    return getattr(hint, "__name__", str(hint))


def _literal_choices(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    return ""


def _comments(source: str) -> dict[str, str]:
    helps, pending = {}, []
    for line in source.splitlines():
        doc = _DOC.match(line)
        if doc:
            pending.append(doc.group(1).strip())
            continue
        m = _FIELD.match(line)
        if m and not line.strip().startswith(("def ", "class ", "return", "@")):
            text = (m.group(2) or "").strip() or " ".join(pending)
            helps.setdefault(m.group(1), text)
        pending = []
    return helps


def _ranges(source: str) -> dict[str, str]:
    out = {}
    for m in _RANGE.finditer(source):
        name, lo, hi, flags = m.group(1), m.group(2).strip(), (m.group(3) or "None").strip(), m.group(4) or ""
        if not _literal(lo) or not _literal(hi):
            continue  # a bound computed from another parameter: the help line says it
        lo_open, hi_open = "lo_open=True" in flags.replace(" ", ""), "hi_open=True" in flags.replace(" ", "")
        kind = "integer " if "integer=True" in flags.replace(" ", "") else ""
        left, right = "(" if lo_open or lo == "None" else "[", ")" if hi_open or hi == "None" else "]"
        out[name] = f"{kind}{left}{'-inf' if lo == 'None' else lo}, {'inf' if hi == 'None' else hi}{right}"
    for m in _CHOICE.finditer(source):
        items = [i.strip().strip("'\"") for i in m.group(2).strip("()[]").split(",") if i.strip()]
        if items != ["True", "False"]:
            out.setdefault(m.group(1), "one of " + ", ".join(items))
    return out


def _literal(text: str) -> bool:
    return text == "None" or re.fullmatch(r"[-+]?[0-9.]+(?:e[-+]?[0-9]+)?", text) is not None
