"""Equilibrium propagation as a haet method: relaxation phases and local updates replace backprop.

The network and the estimator are in `haet.eqprop` (equations there). The method makes the
Trainer's step an EqProp step: the forward pass is the free relaxation (no autograd), the loss it
reports is the squared error EqProp minimizes, and `state.backward_fn` runs the nudged phase(s)
and writes the local update into the parameters' ``.grad``, which the run's optimizer applies.
It owns ``backward``: nothing else may replace or hook autograd's backward (fusion refuses it).

Cost, honestly: every relaxation sweep is a forward and a transposed matmul per layer, all
counted by the FLOPs meter (the relaxations are the cost: T1 + T2 sweeps, or T1 + 2·T2 with a
third phase), and no tensor is saved for backward (the memory meter's activation bytes are 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..core.config import check_choice, check_range
from ..core.errors import ConfigError
from ..core.method import Method
from ..eqprop import NUDGES, EqPropMLP, eqprop_gradients, one_hot


@dataclass(frozen=True)
class EqPropConfig:
    beta: float = 0.1          # nudging strength β (Laborieux et al.'s MNIST MLP: 0.1)
    t_free: int = 30           # sweeps of the free phase (T1)
    t_nudge: int = 10          # sweeps of each nudged phase (T2)
    nudge: Literal["standard", "symmetric", "centered"] = "symmetric"  # estimator; symmetric = third phase at −β

    def __post_init__(self) -> None:
        check_range("beta", self.beta, 0, 1, lo_open=True, hi_open=True)
        check_range("t_free", self.t_free, 1, 10_000, integer=True)
        check_range("t_nudge", self.t_nudge, 1, 10_000, integer=True)
        check_choice("nudge", self.nudge, NUDGES)


def apply_eqprop_step(model: EqPropMLP, x: torch.Tensor, y: torch.Tensor, config: EqPropConfig,
                      free: list[torch.Tensor] | None = None) -> None:
    """The functional form: set each parameter's ``.grad`` to EqProp's estimate on batch (x, y)."""
    target = one_hot(y, model.sizes[-1]).to(x.device)
    grads = eqprop_gradients(model, x, target, beta=config.beta, t_nudge=config.t_nudge, nudge=config.nudge,
                             free=free, t_free=config.t_free)
    for p, g in zip(model.parameters(), grads):
        p.grad = g.to(p.dtype)


class EquilibriumPropagation(Method):
    name = "eqprop"
    summary = "equilibrium propagation: free and nudged relaxations, local weight updates, no backprop"
    paper = ("Scellier, Bengio: Equilibrium propagation (2017); Laborieux et al.: Scaling equilibrium "
             "propagation to deep ConvNets (2021)")
    config_class = EqPropConfig
    # It computes the gradients itself, and its dynamics read each layer's weights directly, so a
    # method that replaces the layers would change nothing it runs.
    owns = frozenset({"backward", "layer_types"})
    exact_gradients = False  # EqProp's estimate, equal to backprop's only as β → 0

    def __init__(self, config: EqPropConfig | None = None, /, **params) -> None:
        super().__init__(config, **params)
        self.steps = 0
        self._state = None

    def check_model(self, model) -> None:
        if not isinstance(getattr(model, "module", model), EqPropMLP):
            raise ConfigError(f"eqprop trains an energy-based network; use --model eqprop-mlp "
                              f"(got {type(model).__name__})")

    def fit_start(self, state) -> None:
        state.unwrapped_model.t_free = self.config.t_free
        state.backward_fn = self._backward
        self._state = state

    def after_forward(self, state) -> None:
        # The quantity EqProp minimizes: the squared error of the free equilibrium's output.
        out = state.outputs
        state.loss = 0.5 * F.mse_loss(out, one_hot(state.batch[1], out.shape[-1]), reduction="sum") / len(out)

    def _backward(self) -> None:
        state = self._state
        model = state.unwrapped_model
        x, y, *_ = state.batch
        apply_eqprop_step(model, x, y, self.config, free=model.free_states)
        self.steps += 1

    def fit_end(self, state) -> None:
        if state.backward_fn == self._backward:
            state.backward_fn = None

    def metrics(self) -> dict:
        c = self.config
        phases = 1 if c.nudge == "standard" else 2
        return {"eqprop/steps": self.steps, "eqprop/sweeps_per_step": c.t_free + phases * c.t_nudge}
