"""Exponential moving average of the weights (Polyak averaging with a decay).

Polyak & Juditsky, "Acceleration of stochastic approximation by averaging" (SIAM J. Control
Optim. 1992); the decayed form with a warm-up is TensorFlow's ExponentialMovingAverage. An
ingredient of the HAET 2021 challenge winners and of the fastest small-data trainers.

After every optimizer step the average moves toward the weights: a ← a + (1 − d)(w − a), with
the decay d = min(`decay`, (1 + t)/(10 + t)) so early averages are not dominated by the random
start. Evaluations run on the averaged weights (swapped in at BEFORE_EVAL, swapped back at
AFTER_EVAL) and at the end of the run the model keeps the averaged weights. Buffers (BatchNorm
statistics) stay the model's own. The extra work, two element-wise passes over the parameters
per step, is charged to the run's FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import check_range
from ..core.errors import ConfigError
from ..core.method import Method

__all__ = ["EMAConfig", "ema_update", "EMA"]

#: Capabilities whose owners keep the weights in a shape or format an average would undo.
_REFUSED = ("weight_sparsity", "weight_format", "model_width", "layer_types")


@dataclass(frozen=True)
class EMAConfig:
    decay: float = 0.99   # per optimizer step; 0.99 averages over ~100 steps, the scale of a short small-data run

    def __post_init__(self) -> None:
        check_range("decay", self.decay, 0, 1, lo_open=True, hi_open=True)


@torch.no_grad()
def ema_update(average: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """Move every tensor of `average` toward the matching parameter: a ← a + (1 − decay)(p − a)."""
    torch._foreach_lerp_(average, [p.detach() for p in params], 1.0 - decay)


class EMA(Method):
    name = "ema"
    summary = "evaluates and returns an exponential moving average of the weights"
    paper = "Polyak & Juditsky, Acceleration of stochastic approximation by averaging, 1992"
    config_class = EMAConfig

    def __init__(self, config=None, /, **params) -> None:
        super().__init__(config, **params)
        self.average: list[torch.Tensor] = []
        self._ids: list[int] | None = []
        self._saved: list[torch.Tensor] | None = None   # the raw weights while the average is swapped in
        self.updates = 0
        self.applied = False

    def check_compatible(self, others: list[Method]) -> None:
        for other in others:
            shared = sorted(set(other.owns) & set(_REFUSED))
            if shared:
                raise ConfigError(f"ema and {other.name} cannot run together: {other.name} owns {shared[0]!r}, "
                                  "and an average of the weights would undo it")

    def _params(self, state) -> list[nn.Parameter]:
        return [p for p in state.unwrapped_model.parameters() if p.requires_grad]

    def after_step(self, state) -> None:
        params = self._params(state)
        if self._ids is None and len(self.average) == len(params):  # resumed: the average is the model's
            self._ids = [id(p) for p in params]
        if [id(p) for p in params] != self._ids or len(self.average) != len(params):
            # First step, or the model's parameters were replaced: restart the average from them.
            self.average = [p.detach().clone() for p in params]
            self._ids = [id(p) for p in params]
        decay = min(self.config.decay, (1 + self.updates) / (10 + self.updates))
        ema_update(self.average, params, decay)
        self.updates += 1
        state.charge(flops=3 * sum(p.numel() for p in params), dtype="float32", what="ema/update")

    def _swap_in(self, state) -> None:
        params = self._params(state)
        if self._saved is not None or not self.average or len(params) != len(self.average):
            return
        with torch.no_grad():
            self._saved = [p.detach().clone() for p in params]
            for p, a in zip(params, self.average):
                p.copy_(a)

    def _swap_out(self, state) -> None:
        if self._saved is None:
            return
        with torch.no_grad():
            for p, w in zip(self._params(state), self._saved):
                p.copy_(w)
        self._saved = None

    def before_eval(self, state) -> None:
        self._swap_in(state)

    def after_eval(self, state) -> None:
        self._swap_out(state)

    def batch_start(self, state) -> None:
        self._swap_out(state)  # an evaluation that ended without AFTER_EVAL (a checkpoint flush)

    def fit_end(self, state) -> None:
        self._swap_in(state)
        self._saved = None      # the model keeps the average
        self.applied = self.updates > 0

    def metrics(self) -> dict:
        return {"ema/updates": self.updates, "ema/applied": int(self.applied)}

    def state_dict(self) -> dict:
        return {"average": [a.clone() for a in self.average], "updates": self.updates}

    def load_state_dict(self, state_dict: dict) -> None:
        self.average = [a.clone() for a in state_dict["average"]]
        self.updates = int(state_dict["updates"])
        self._ids = None  # matched to the model's parameters at the next step
