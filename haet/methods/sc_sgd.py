"""Momentum SGD on dynamic stochastic computing: the optimizer's arithmetic done on bit streams.

Paper: Siting Liu and Warren J. Gross, "Gradient Descent with Momentum using Dynamic Stochastic
Computing", HAET workshop at ICLR 2021 (VGG16, ResNet18, MobileNetV2 on CIFAR-10 at the accuracy
of their floating-point training; less hardware and energy). Background: Liu, Gross and Han,
"Introduction to Dynamic Stochastic Computing", IEEE Circuits and Systems Magazine, 2020.

The circuit simulated, per weight and per training step (L = ``stream_bits`` clock cycles):

1. the gradient g (from the usual float backward) and the stored moving average m are scaled by a
   power of two S ≥ max(|g|, |m|) shared by an output row (or the whole tensor; a shift, no
   multiplier) and turned into sign-magnitude bit streams of L bits by comparators against a
   random or low-discrepancy source;
2. the momentum integrator, an up/down counter whose LSB weighs (1-β)·S/L, counts up on g's
   stream and down on its own value's stream (a stochastic integrator with feedback, "ADDIE"):
   E[m'] = β·m + (1-β)·g, the float moving average, without a multiplier;
3. the weight integrator counts down on the stream of m' (scaled by S' ≥ max|m'|) with an LSB of
   lr/(1-β)·S'/L: E[Δw] = -lr·m'/(1-β), which is torch.optim.SGD(lr, momentum=β)'s update.

Every bit is unbiased, so each step equals float momentum SGD in expectation; the stream length
trades noise (variance ∝ 1/L², low-discrepancy, or 1/L, Bernoulli) against cycles and energy
per update. With L = 1 each value is one random bit per step: every weight moves by -1, 0 or +1
counter steps. The simulation is vectorized (counts are drawn with their exact distribution, see
`haet.methods._sc_ops`); weights and counters are held in float32, so the finite width of real
counters is not simulated. Gradients and the forward/backward pass stay in float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..core.config import check_choice, check_range
from ..core.errors import ConfigError
from ..core.method import Method
from ._sc_ops import DATAPATH_BITS, ENCODINGS, STREAM_BITS, hardware_model, sc_momentum_update


@dataclass(frozen=True)
class SCSGDConfig:
    lr: float = 0.05        # step size, as torch.optim.SGD's lr (the expected update is SGD's)
    momentum: float = 0.9   # moving-average coefficient β of the momentum integrator
    stream_bits: int = 4    # bits per value per update (clock cycles); power of two; noise vs energy
    encoding: Literal["lowdiscrepancy", "bernoulli"] = "lowdiscrepancy"  # comparator source (see _sc_ops)
    scale: Literal["row", "tensor"] = "row"  # full-scale granularity: per output row (less noise) or per tensor
    weight_decay: float = 0.0  # L2 penalty added to the gradient before it is encoded

    def __post_init__(self) -> None:
        check_range("lr", self.lr, 0, None, lo_open=True)
        check_range("momentum", self.momentum, 0, 1, hi_open=True)
        check_choice("stream_bits", self.stream_bits, STREAM_BITS)
        check_choice("encoding", self.encoding, ENCODINGS)
        check_choice("scale", self.scale, ("row", "tensor"))
        check_range("weight_decay", self.weight_decay, 0, None)


class SCMomentumSGD(torch.optim.Optimizer):
    """A torch optimizer whose update is the stochastic circuit (`sc_momentum_update` per tensor).

    Works with learning-rate schedulers (``lr`` is read each step) and checkpoints: the state of a
    parameter is its ``momentum_ema`` (the momentum integrator's value).
    """

    def __init__(self, params, lr: float = 0.05, momentum: float = 0.9, stream_bits: int = 4,
                 encoding: str = "lowdiscrepancy", scale: str = "row", weight_decay: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
        SCSGDConfig(lr=lr, momentum=momentum, stream_bits=stream_bits, encoding=encoding, scale=scale,
                    weight_decay=weight_decay)
        super().__init__(params, dict(lr=lr, momentum=momentum, stream_bits=stream_bits, encoding=encoding,
                                      scale=scale, weight_decay=weight_decay))
        self.generator = generator
        self.updates = 0  # weight updates done (elements), for the energy model

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_ema" not in state:
                    state["momentum_ema"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                sc_momentum_update(p, p.grad, state["momentum_ema"], lr=group["lr"], momentum=group["momentum"],
                                   stream_bits=group["stream_bits"], encoding=group["encoding"],
                                   weight_decay=group["weight_decay"], per_row=group["scale"] == "row",
                                   generator=self.generator)
                self.updates += p.numel()
        return loss


class StochasticMomentumSGD(Method):
    name = "sc_sgd"
    summary = "momentum SGD whose moving average and weight update run on stochastic bit streams"
    paper = ("Liu, Gross: Gradient Descent with Momentum using Dynamic Stochastic Computing "
             "(HAET workshop, ICLR 2021)")
    config_class = SCSGDConfig
    owns = frozenset({"optimizer_step"})
    reads_group_hyperparameters = False  # one lr and momentum for every weight (the circuit's constants)

    def __init__(self, config: SCSGDConfig | None = None, /, **params) -> None:
        super().__init__(config, **params)
        self.optimizer: SCMomentumSGD | None = None
        self.hardware = hardware_model(self.config.stream_bits)

    def fit_start(self, state) -> None:
        """Replace the run's optimizer (its parameter groups kept, its hyperparameters not) by the circuit."""
        if state.step_fn is not None:
            raise ConfigError("sc_sgd: another method already replaced the optimizer step")
        c = self.config
        generator = torch.Generator(device=state.device).manual_seed(state.seed)
        groups = [{"params": g["params"]} for g in state.optimizer.param_groups]
        self.optimizer = SCMomentumSGD(groups, lr=c.lr, momentum=c.momentum, stream_bits=c.stream_bits,
                                       encoding=c.encoding, scale=c.scale, weight_decay=c.weight_decay,
                                       generator=generator)
        state.optimizer = self.optimizer

    def metrics(self) -> dict:
        hw, updates = self.hardware, self.optimizer.updates if self.optimizer else 0
        fixed = f"fixed{DATAPATH_BITS}"
        return {
            "sc_sgd/energy_per_update_pj": hw["stochastic"]["energy_pj"],
            f"sc_sgd/energy_per_update_{fixed}_pj": hw[fixed]["energy_pj"],
            "sc_sgd/energy_per_update_float32_pj": hw["float32"]["energy_pj"],
            "sc_sgd/cycles_per_update": hw["stochastic"]["cycles"],
            "sc_sgd/gates_per_weight": hw["stochastic"]["gates"],
            f"sc_sgd/gates_{fixed}_updater": hw[fixed]["gates"],
            "sc_sgd/gates_float32_updater": hw["float32"]["gates"],
            "sc_sgd/updates": updates,
            "sc_sgd/updater_energy_j": updates * hw["stochastic"]["energy_pj"] * 1e-12,
            "sc_sgd/updater_energy_float32_j": updates * hw["float32"]["energy_pj"] * 1e-12,
            "sc_sgd/energy_source": "model",
        }

    def state_dict(self) -> dict:
        if self.optimizer is None:
            return {}
        return {"generator": self.optimizer.generator.get_state(), "updates": self.optimizer.updates}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict and self.optimizer is not None:
            self.optimizer.generator.set_state(state_dict["generator"])
            self.optimizer.updates = state_dict["updates"]
