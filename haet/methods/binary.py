"""Binary weights: exact-penalty training (`binary_penalty`) and straight-through BinaryConnect
(`binary_connect`, the baseline).

Paper (binary_penalty): T. Dockhorn, Y. Yu, V. Partovi Nia, E. Sari, "An exact penalty method for
binary training", HAET workshop at ICLR 2021: a penalty drives the weights to {−1, +1}; being
exact, it converges in finitely many steps, and its weight ρ trades convergence speed against
accuracy. Baseline: M. Courbariaux, Y. Bengio, J.-P. David, "BinaryConnect: training deep neural
networks with binary weights during propagations", NeurIPS 2015.

The exact penalty, as implemented here. Each selected layer l (Linear, Conv) has a scale α_l =
mean |W_l| of its initial weights (the least-squares scale of sign(W_l)), fixed, and

    P(W) = Σ_l Σ_i | |W_li| − α_l |  ≥ 0, zero exactly at binary points;   min_W f(W) + ρ·P(W).

Exactness: if ρ > G = sup ‖∇f‖_∞, moving any non-binary coordinate toward its nearer ±α
strictly lowers f + ρP, so every local minimizer is binary; ρ need not go to ∞.
Algorithm: proximal gradient. The optimizer steps on f alone (its moments never see the
penalty), then every selected weight goes through P's proximal map with step t = ρ·lr:
    W ← prox_{t·P}(W − lr·d),  d = the optimizer's direction (∇f for SGD, m̂/(√v̂ + ε) for Adam),
which moves each entry toward its nearer ±α by t and puts it exactly there when it is closer.
Finite convergence: if ρ > G_d = sup |d| (for Adam |d| ≲ 1, so ρ is in units of Adam's
normalized step), a binary entry moves less than t in the step and the prox puts it back exactly;
a non-binary one gets nearer to ±α by at least lr·(ρ − G_d) per step, so after at most
⌈α / (lr·(ρ − G_d))⌉ steps every weight is exactly ±α and stays there. `rho_growth` multiplies ρ
after each epoch: a small ρ first lets the network learn (entries whose steps exceed t move
freely, and change sign), a large ρ then makes it exactly binary.
At the end (`snap_at_end`), weights not yet binary are projected to ±α (`snapped_fraction`), so
the final evaluation is always of an exactly binary network.

Functional forms: ``penalty = apply_exact_penalty(model, config, optimizer=opt)`` then
``penalty.prox_step()`` after each ``opt.step()``; `fraction_binary(weights, scales)`;
``apply_binary_connect(model, config, optimizer=opt)`` for the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..core.config import check_choice, check_range
from ..core.errors import ConfigError
from ..core.method import Method
from ..core.surgery import replace_modules
from ._binary_ops import WEIGHT_LAYERS, binarize_, count_binary, prox_binary_penalty_, to_binary_connect


@dataclass(frozen=True)
class ExactPenaltyConfig:
    rho: float = 0.005       # ρ: the prox moves a weight by ρ·lr per step (Adam: units of its normalized step, ~1)
    rho_growth: float = 3.0  # ρ ← ρ·rho_growth after each epoch: learn first, then exactly binary (ρ > ~1)
    binarize_first_last: bool = True  # also the first and last layers (False keeps them float)
    snap_at_end: bool = True          # project weights not yet binary at the end, so the result is binary

    def __post_init__(self) -> None:
        check_range("rho", self.rho, 0, None, lo_open=True)
        check_range("rho_growth", self.rho_growth, 1, 100)
        check_choice("binarize_first_last", self.binarize_first_last, (True, False))
        check_choice("snap_at_end", self.snap_at_end, (True, False))


@dataclass(frozen=True)
class BinaryConnectConfig:
    binarize_first_last: bool = True  # also the first and last layers (False keeps them float)

    def __post_init__(self) -> None:
        check_choice("binarize_first_last", self.binarize_first_last, (True, False))


def binary_layers(model: nn.Module, binarize_first_last: bool = True,
                  filter_fn: Callable[[str, nn.Module], bool] | None = None, *,
                  what: str = "binary") -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs whose weights are binarized: Linear and Conv layers, in order.

    Raises ConfigError when there is none (the method would change nothing)."""
    found = [(n, m) for n, m in model.named_modules() if type(m) in WEIGHT_LAYERS
             and (filter_fn is None or filter_fn(n, m))]
    layers = found if binarize_first_last else found[1:-1]
    if not layers:
        why = (f"binarize_first_last=False leaves none of its {len(found)}" if found
               else "it has no nn.Linear or nn.Conv1d/2d/3d layer" + (" that filter_fn accepts" if filter_fn else ""))
        raise ConfigError(f"{what}: nothing to binarize in the model: {why}; "
                          "binarize_first_last=True, or a model with Linear/Conv layers")
    return layers


def layer_scales(weights: list[torch.Tensor]) -> list[float]:
    """α_l = mean |W_l|: the least-squares scale of sign(W_l)."""
    return [float(w.detach().abs().mean()) for w in weights]


def fraction_binary(weights: list[torch.Tensor], scales: list[float]) -> float:
    total = sum(w.numel() for w in weights)
    return sum(count_binary(w, a) for w, a in zip(weights, scales)) / max(total, 1)


@dataclass
class ExactPenalty:
    """The exact penalty on a model's selected weights; `prox_step` after each optimizer step."""
    names: list[str]
    weights: list[torch.Tensor]
    scales: list[float]
    rho: float
    optimizer: torch.optim.Optimizer | None = None
    lr: float = 1e-3          # the step when no optimizer is given (or it does not hold a weight)

    @torch.no_grad()
    def prox_step(self) -> None:
        """W ← prox_{ρ·lr·P}(W) for each weight, lr = its optimizer group's current learning rate."""
        lrs = _group_lrs(self.optimizer)
        for w, alpha in zip(self.weights, self.scales):
            prox_binary_penalty_(w, alpha, self.rho * lrs.get(id(w), self.lr))

    def fraction_binary(self) -> float:
        return fraction_binary(self.weights, self.scales)

    def snap(self) -> None:
        """Project every weight to ±α (the nearer sign): the network is exactly binary afterwards."""
        for w, alpha in zip(self.weights, self.scales):
            binarize_(w, alpha)


def apply_exact_penalty(model: nn.Module, config: ExactPenaltyConfig | None = None, *,
                        optimizer: torch.optim.Optimizer | None = None,
                        filter_fn: Callable[[str, nn.Module], bool] | None = None) -> ExactPenalty:
    """Select the weights to binarize and fix their scales α_l; the model itself is not changed."""
    config = config or ExactPenaltyConfig()
    layers = binary_layers(model, config.binarize_first_last, filter_fn, what="binary_penalty")
    weights = [m.weight for _, m in layers]
    return ExactPenalty([n for n, _ in layers], weights, layer_scales(weights), config.rho, optimizer)


def apply_binary_connect(model: nn.Module, config: BinaryConnectConfig | None = None, *,
                         optimizer: torch.optim.Optimizer | None = None,
                         filter_fn: Callable[[str, nn.Module], bool] | None = None) -> list[str]:
    """Replace the selected layers by BinaryConnect layers (forward with α·sign(W), straight-through
    gradient to the latent W), clip W to [−α, α]; returns the names replaced."""
    config = config or BinaryConnectConfig()
    chosen = dict(binary_layers(model, config.binarize_first_last, filter_fn, what="binary_connect"))
    scales = dict(zip(chosen, layer_scales([m.weight for m in chosen.values()])))
    with torch.no_grad():
        for name, m in chosen.items():
            m.weight.clamp_(-scales[name], scales[name])
    return replace_modules(model, optimizer, lambda n, m: to_binary_connect(m, scales[n]) if n in chosen else None,
                           what="binary_connect")


class ExactPenaltyBinary(Method):
    name = "binary_penalty"
    summary = "exact penalty, proximal step after the optimizer: weights exactly ±scale in finitely many steps"
    paper = "Dockhorn, Yu, Partovi Nia, Sari: An exact penalty method for binary training (HAET @ ICLR 2021)"
    config_class = ExactPenaltyConfig
    owns = frozenset({"weight_format", "weight_sparsity"})

    def __init__(self, config: ExactPenaltyConfig | None = None, /, **params) -> None:
        super().__init__(config, **params)
        self.penalty: ExactPenalty | None = None
        self.first_all_binary_step: int | None = None
        self.fraction = 0.0
        self.snapped: float | None = None
        self._latent: list[torch.Tensor] | None = None
        self._epoch: dict = {}
        self._version = -1

    @property
    def weights(self) -> list[torch.Tensor]:
        return self.penalty.weights if self.penalty else []

    @property
    def scales(self) -> list[float]:
        return self.penalty.scales if self.penalty else []

    @property
    def rho(self) -> float:
        return self.penalty.rho if self.penalty else self.config.rho

    def fit_start(self, state) -> None:
        self.penalty = apply_exact_penalty(state.unwrapped_model, self.config, optimizer=state.optimizer)
        self._version = state.model_version

    def batch_start(self, state) -> None:
        if state.model_version != self._version:  # another method replaced layers (growth): follow them
            old = self.penalty
            self.penalty = apply_exact_penalty(state.unwrapped_model, self.config, optimizer=state.optimizer)
            kept = dict(zip(old.names, old.scales))  # a layer seen before keeps its scale α
            self.penalty.scales = [kept.get(n, a) for n, a in zip(self.penalty.names, self.penalty.scales)]
            self.penalty.rho = old.rho
            self._version = state.model_version

    def after_step(self, state) -> None:
        self.penalty.prox_step()
        # the prox: |w|, a difference, a clamp, a product and a sign per weight
        state.charge(flops=5 * sum(w.numel() for w in self.weights), what="binary_penalty/prox")
        self.fraction = self.penalty.fraction_binary()
        if self.fraction < 1.0:
            self.first_all_binary_step = None
        elif self.first_all_binary_step is None:
            self.first_all_binary_step = state.step

    def epoch_end(self, state) -> None:
        self._epoch = {"binary_penalty/fraction_binary": self.fraction, "binary_penalty/rho": self.penalty.rho}
        self.penalty.rho *= self.config.rho_growth

    def before_eval(self, state) -> None:
        # The final evaluation sees the binary network: weights not yet binary are projected to
        # ±α, and restored after it (so a checkpoint resumes exactly); fit_end projects for good.
        last = state.epoch >= state.epochs or state.stop_reason is not None
        if self.config.snap_at_end and last and self._latent is None and self.penalty:
            self.snapped = 1.0 - self.penalty.fraction_binary()
            self._latent = [w.detach().clone() for w in self.weights]
            self.penalty.snap()

    def after_eval(self, state) -> None:
        if self._latent is not None:
            with torch.no_grad():
                for w, latent in zip(self.weights, self._latent):
                    w.copy_(latent)
            self._latent = None

    def fit_end(self, state) -> None:
        if self.config.snap_at_end and self.penalty:
            self.penalty.snap()

    def epoch_metrics(self) -> dict:
        return dict(self._epoch)

    def metrics(self) -> dict:
        return {"binary_penalty/first_all_binary_step": self.first_all_binary_step,
                "binary_penalty/fraction_binary": self.fraction,
                "binary_penalty/snapped_fraction": self.snapped or 0.0,
                "binary_penalty/rho": self.rho, "binary_penalty/layers": len(self.weights)}

    def state_dict(self) -> dict:
        return {"scales": list(self.scales), "rho": self.rho, "first": self.first_all_binary_step,
                "fraction": self.fraction, "snapped": self.snapped}

    def load_state_dict(self, sd: dict) -> None:
        self.penalty.scales, self.penalty.rho, self.fraction = list(sd["scales"]), sd["rho"], sd["fraction"]
        self.first_all_binary_step, self.snapped = sd["first"], sd["snapped"]


class BinaryConnect(Method):
    name = "binary_connect"
    summary = "BinaryConnect: forward with ±scale weights, straight-through gradient to clipped latent weights"
    paper = "Courbariaux, Bengio, David: BinaryConnect: training deep neural networks with binary weights (NeurIPS 2015)"
    config_class = BinaryConnectConfig
    owns = frozenset({"weight_format", "weight_sparsity", "layer_types"})

    def __init__(self, config: BinaryConnectConfig | None = None, /, **params) -> None:
        super().__init__(config, **params)
        self.layers: list[nn.Module] = []

    def fit_start(self, state) -> None:
        model = state.unwrapped_model
        names = apply_binary_connect(model, self.config, optimizer=state.optimizer)
        state.model_version += 1
        self.layers = [model.get_submodule(n) for n in names]

    def after_step(self, state) -> None:
        with torch.no_grad():
            for m in self.layers:  # BinaryConnect keeps the latent weights in [−α, α]
                m.weight.clamp_(-float(m.scale), float(m.scale))

    def _saturated(self) -> float:
        return fraction_binary([m.weight for m in self.layers], [float(m.scale) for m in self.layers])

    def epoch_metrics(self) -> dict:
        return {"binary_connect/fraction_latent_saturated": self._saturated()}

    def metrics(self) -> dict:
        # The forward weights are ±α from the first step on.
        return {"binary_connect/first_all_binary_step": 0 if self.layers else None,
                "binary_connect/fraction_latent_saturated": self._saturated() if self.layers else 0.0,
                "binary_connect/layers": len(self.layers)}


def _group_lrs(optimizer: torch.optim.Optimizer | None) -> dict[int, float]:
    """id(parameter) -> the learning rate of its optimizer group, now (schedulers change it)."""
    if optimizer is None:
        return {}
    return {id(p): float(g["lr"]) for g in optimizer.param_groups if "lr" in g for p in g["params"]}
