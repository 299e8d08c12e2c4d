"""Budgets: hard limits on what a run may spend.

The run stops at the first exhausted limit, evaluates, and records which one stopped it as
``stopped_by = "budget:<kind>"`` (time, energy, steps, flops, mem). Time is *training* time
(evaluation excluded, the methods' own work such as subset selection included).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

from .errors import ConfigError


@dataclass(frozen=True)
class Budget:
    time_s: float | None = None       # seconds of training time
    energy_j: float | None = None     # joules, from the energy meter (its source is recorded)
    steps: int | None = None          # optimizer steps
    flops: float | None = None        # training FLOPs counted by the FLOPs meter
    peak_mem_mb: float | None = None  # MiB added by training: on CPU peak RSS minus RSS at fit start; CUDA allocator peak
    #: Time only: do not start a step whose expected duration (the last step's) would cross
    #: ``time_s`` -- the HAET challenge's rule: training stops *at* the budget, not after it.
    no_overrun: bool = False

    def __post_init__(self) -> None:
        for name in _LIMITS:
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"budget {name} must be a positive number, got {v!r}")
        if self.steps is not None and int(self.steps) != self.steps:
            raise ConfigError(f"budget steps must be a whole number, got {self.steps!r}")
        if not isinstance(self.no_overrun, bool):
            raise ConfigError(f"budget no_overrun must be True or False, got {self.no_overrun!r}")

    def is_empty(self) -> bool:
        return all(getattr(self, name) is None for name in _LIMITS)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        if not self.no_overrun:
            del out["no_overrun"]  # records written before the option read the same
        return out

    def needs(self) -> set[str]:
        """The reading keys (meters' `readings()` plus ``steps``) this budget checks."""
        return {key for name, (key, _) in _LIMITS.items() if getattr(self, name) is not None}

    def exhausted(self, readings: dict[str, float | None], next_step_s: float | None = None) -> str | None:
        """The kind of the first exhausted limit ("steps", "time", ...) or None, from readings
        keyed like the meters' (``train_s``, ``energy_j``, ``flops``, ``peak_mem_mb``) and ``steps``.
        With ``no_overrun``, time is exhausted when the next step (expected to take
        ``next_step_s``) would end past the limit."""
        for name, (key, kind) in _LIMITS.items():
            limit = getattr(self, name)
            if limit is None:
                continue
            value = readings.get(key)
            if value is None:
                continue
            if kind == "time" and self.no_overrun and next_step_s:
                value += next_step_s
                if value > limit:
                    return kind
            if value >= limit:
                return kind
        return None

    @classmethod
    def parse(cls, text: str) -> "Budget":
        """Parse the command line form ``time=60s,energy=200J,steps=1000,flops=1e12,mem=512MB``."""
        kwargs: dict = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, sep, raw = item.partition("=")
            key = key.strip().lower()
            if not sep or key not in _PARSERS:
                raise ConfigError(f"bad budget item {item!r}; use key=value with key one of: "
                                  + ", ".join(_PARSERS))
            name, parse = _PARSERS[key]
            if name in kwargs:
                raise ConfigError(f"budget {key} given twice in {text!r}")
            kwargs[name] = parse(key, raw.strip())
        return cls(**kwargs)


#: Budget field -> (reading key, kind in ``stopped_by = "budget:<kind>"``), in the order checked.
_LIMITS = {"steps": ("steps", "steps"), "time_s": ("train_s", "time"), "energy_j": ("energy_j", "energy"),
           "flops": ("flops", "flops"), "peak_mem_mb": ("mem_budget_mb", "mem")}


def _number_with_unit(units: dict[str, float]):
    pattern = re.compile(r"^([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)$", re.IGNORECASE)

    def parse(key: str, raw: str) -> float:
        m = pattern.match(raw)
        unit = m.group(2).lower() if m else None
        if not m or unit not in units:
            allowed = ", ".join(u or "(none)" for u in units)
            raise ConfigError(f"bad budget value {key}={raw!r}; a positive number with unit one of: {allowed}")
        return float(m.group(1)) * units[unit]

    return parse


def _steps(key: str, raw: str) -> int:
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value != int(value):
        raise ConfigError(f"bad budget value {key}={raw!r}; a whole number of optimizer steps")
    return int(value)


_PARSERS = {
    "time": ("time_s", _number_with_unit({"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0})),
    "energy": ("energy_j", _number_with_unit({"": 1.0, "j": 1.0, "kj": 1e3, "wh": 3600.0, "kwh": 3.6e6})),
    "steps": ("steps", _steps),
    "flops": ("flops", _number_with_unit({"": 1.0, "g": 1e9, "t": 1e12, "p": 1e15})),
    "mem": ("peak_mem_mb", _number_with_unit({"": 1.0, "mb": 1.0, "mib": 1.0, "gb": 1024.0, "gib": 1024.0})),
}
