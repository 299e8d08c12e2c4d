"""The cost ledger: work that methods do outside the measured training step.

Cost data flows one way. Methods *charge* the ledger (``state.charge(flops=..., dtype=...,
what="gradmatch/selection")``) for work the meters cannot see — a selection pass, a growth
event's SVD, a projection — and never write into a meter. Meters *read* the ledger when they
report, and budgets read the meters' ``readings()``.
"""

from __future__ import annotations

import math

from .errors import ConfigError

PHASES = ("forward", "backward", "optimizer", "methods")


class CostLedger:
    """Totals of charged work, by number format, by phase and by what it was for."""

    def __init__(self) -> None:
        self.flops_by_dtype: dict[str, float] = {}
        self.flops_by_what: dict[str, float] = {}
        self.flops_by_phase: dict[str, float] = {}
        self.bytes_moved = 0.0

    def charge(self, *, flops: float = 0.0, dtype: str = "float32", bytes_moved: float = 0.0,
               what: str = "", phase: str = "methods") -> None:
        """Add `flops` (in number format `dtype`) and `bytes_moved` to the ledger."""
        for name, value in (("flops", flops), ("bytes_moved", bytes_moved)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ConfigError(f"charge: {name} must be a finite number >= 0, got {value!r}")
        if phase not in PHASES:
            raise ConfigError(f"charge: phase must be one of {', '.join(PHASES)}, got {phase!r}")
        if flops:
            self.flops_by_dtype[dtype] = self.flops_by_dtype.get(dtype, 0.0) + float(flops)
            self.flops_by_phase[phase] = self.flops_by_phase.get(phase, 0.0) + float(flops)
            if what:
                self.flops_by_what[what] = self.flops_by_what.get(what, 0.0) + float(flops)
        self.bytes_moved += float(bytes_moved)

    @property
    def flops(self) -> float:
        return sum(self.flops_by_dtype.values())

    def state_dict(self) -> dict:
        return {"flops_by_dtype": dict(self.flops_by_dtype), "flops_by_what": dict(self.flops_by_what),
                "flops_by_phase": dict(self.flops_by_phase), "bytes_moved": self.bytes_moved}

    def load_state_dict(self, sd: dict) -> None:
        self.flops_by_dtype = dict(sd["flops_by_dtype"])
        self.flops_by_what = dict(sd["flops_by_what"])
        self.flops_by_phase = dict(sd.get("flops_by_phase", {}))
        self.bytes_moved = float(sd["bytes_moved"])
