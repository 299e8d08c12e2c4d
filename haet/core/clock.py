"""The Trainer's clock: wall time split into phases.

One `lap(phase)` call attributes the time since the previous lap to `phase`. On CUDA the clock
synchronizes the device first, so kernels launched in a phase are charged to it, not to the next.
"""

from __future__ import annotations

import time

import torch

PHASES = ("data", "forward", "backward", "optimizer", "methods")


class PhaseClock:
    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.sync = torch.device(device).type == "cuda"
        self.phases_s = {p: 0.0 for p in PHASES}
        self.eval_s = 0.0
        self._last = 0.0
        self._running = False

    def start(self) -> None:
        """Start (or resume) counting training time from now."""
        self._sync()
        self._last = time.perf_counter()
        self._running = True

    def lap(self, phase: str) -> None:
        """Charge the time since the previous lap to `phase`."""
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.phases_s[phase] += now - self._last
        self._last = now

    def pause(self, phase: str) -> None:
        """Charge the time so far to `phase` and stop counting (evaluation, checkpoints)."""
        if self._running:
            self.lap(phase)
        self._running = False

    @property
    def running(self) -> bool:
        """Whether training time is being counted (between `start` and `pause`)."""
        return self._running

    @property
    def train_s(self) -> float:
        """Training time so far: the sum of all phases, including the methods' own work."""
        total = sum(self.phases_s.values())
        if self._running:
            total += time.perf_counter() - self._last
        return total

    def _sync(self) -> None:
        if self.sync:
            torch.cuda.synchronize()

    def state_dict(self) -> dict:
        return {"phases_s": dict(self.phases_s), "eval_s": self.eval_s}

    def load_state_dict(self, sd: dict) -> None:
        self.phases_s.update(sd["phases_s"])
        self.eval_s = sd["eval_s"]
