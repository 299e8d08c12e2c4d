"""Time to target: stop at the first evaluation that meets a target, and say how long it took.

The figure MLPerf Training and DAWNBench report: training seconds (evaluation excluded) until the
evaluation that first met the target. The Trainer adds a `TargetWatch` to its listeners when given
``until``; it reads each evaluation after the methods, asks the run to stop when a target is met
(``stopped_by: "target"``) and reports ``cost.target``, ``cost.time_to_target_s`` (None when not
reached) and ``cost.target_step``.
"""

from __future__ import annotations

from ..meters.base import Meter
from .options import Target


class TargetWatch(Meter):
    name = "target"

    def __init__(self, targets: tuple[Target, ...]) -> None:
        self.targets = targets
        self.time_to_target_s: float | None = None
        self.step: int | None = None
        self.met_by: str | None = None

    def after_eval(self, state) -> None:
        if self.time_to_target_s is not None or not state.eval_metrics:
            return
        for target in self.targets:
            if target.met(state.eval_metrics):
                self.time_to_target_s, self.step, self.met_by = state.clock.train_s, state.step, str(target)
                state.request_stop("target")
                return

    def report(self, state) -> dict:
        return {"target": ",".join(map(str, self.targets)), "time_to_target_s": self.time_to_target_s,
                "target_step": self.step, "target_met_by": self.met_by}

    def state_dict(self) -> dict:
        return {"time_to_target_s": self.time_to_target_s, "step": self.step, "met_by": self.met_by}

    def load_state_dict(self, state_dict: dict) -> None:
        self.time_to_target_s, self.step = state_dict["time_to_target_s"], state_dict["step"]
        self.met_by = state_dict["met_by"]
