"""Time meter: wall, train and eval seconds, and training time per phase.

The phases (data, forward, backward, optimizer, methods) come from the Trainer's clock
(`haet.core.clock.PhaseClock`), which synchronizes CUDA at each lap when running on a GPU.
"""

from __future__ import annotations

import time

from .base import Meter


class TimeMeter(Meter):
    name = "time"
    provides = ("train_s",)

    def __init__(self) -> None:
        self._start = 0.0
        self._wall_before = 0.0  # wall seconds of earlier segments of a resumed run
        self.wall_s = 0.0

    def fit_start(self, state) -> None:
        self._start = time.perf_counter()

    def fit_end(self, state) -> None:
        self.wall_s = self._wall_before + time.perf_counter() - self._start

    def readings(self, state) -> dict[str, float]:
        return {"train_s": state.clock.train_s}

    def report(self, state) -> dict:
        clock = state.clock
        return {"wall_s": self.wall_s, "train_s": clock.train_s, "eval_s": clock.eval_s,
                "phases_s": dict(clock.phases_s)}

    def state_dict(self) -> dict:
        return {"wall_s": self._wall_before + time.perf_counter() - self._start}

    def load_state_dict(self, state_dict: dict) -> None:
        self._wall_before = state_dict["wall_s"]
