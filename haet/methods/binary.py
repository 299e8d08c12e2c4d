"""Binary weights: exact-penalty training (`binary_penalty`) and straight-through BinaryConnect
(`binary_connect`, the baseline).

Paper (binary_penalty): T. Dockhorn, Y. Yu, V. Partovi Nia, E. Sari, "An exact penalty method for
binary training", HAET workshop at ICLR 2021: a penalty drives the weights to {−1, +1}; being exact, it converges in finitely many steps, and
its weight ρ trades convergence speed against accuracy. Baseline: M. Courbariaux, Y. Bengio,
J.-P. David, "BinaryConnect: training deep neural networks with binary weights during
propagations", NeurIPS 2015.

The exact penalty, as implemented here. Each selected layer l (Linear, Conv) has a scale α_l =
mean |W_l| of its initial weights (the least-squares scale of sign(W_l)), fixed; the binary
constraint W_l ∈ {−α_l, α_l}^n is relaxed to the box B = [−α_l, α_l]^n plus the penalty
    P(W) = Σ_l Σ_i (α_l − |W_li|)  ≥ 0,  zero exactly at binary points:  min_{W∈B} f(W) + ρ·P(W).
Exactness: let G = sup_{W∈B} ‖∇f(W)‖_∞. If ρ > G, moving any non-binary coordinate outward
(away from 0) strictly decreases f + ρP, since its derivative is ∂_i f·sign(W_i) − ρ < 0; so
every local minimizer on B is binary and min_B (f + ρP) = min over binary W of f. No ρ → ∞ needed.
Algorithm (projected subgradient): the penalty's gradient −ρ·sign(W) is added to ∇f, the
optimizer steps, and W is projected onto the box: W ← clip(W − η(∇f(W) − ρ·sign(W)), −α, α).
Finite convergence (gradient descent, step η): if ρ > G, each step moves every coordinate
outward by at least η(ρ − G) (it cannot cross zero), so after at most ⌈α / (η(ρ − G))⌉ steps
every weight is exactly ±α; from then on each step pushes it outward and the projection returns
it exactly to ±α. With momentum or Adam the same holds once ρ > G: every gradient a weight sees
has the outward sign, so the moving averages and the update have it too. Conditions: ρ > G, step
sizes bounded away from 0, α fixed. G is not known in advance: `rho_growth` multiplies ρ after
each epoch, so the condition is met eventually; a small ρ first lets the network learn (weights
with gradients larger than ρ stay free), a large ρ binarizes within few steps, near the
initialization's signs (the paper's trade-off between speed and accuracy).
At the end (`snap_at_end`), weights not yet binary are projected to ±α (`snapped_fraction`), so
the final evaluation is always of an exactly binary network.

Functional forms: `binary_layers(model)`, `layer_scales(weights)`, then around each optimizer
step `exact_penalty_grad(weights, rho)` (after backward) and `project_box(weights, scales)` (after
the step); `fraction_binary(weights, scales)`; `apply_binary_connect(model)` for the baseline.
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
from ._binary_ops import WEIGHT_LAYERS, add_penalty_grad_, binarize_, count_binary, to_binary_connect

@dataclass(frozen=True)
class ExactPenaltyConfig:
    rho: float = 1e-3        # penalty weight ρ, in gradient units (mnist5k-cnn's weight gradients are ~1e-3..1e-1)
    rho_growth: float = 3.0  # ρ ← ρ·rho_growth after each epoch: small ρ to learn first, then exact
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
                  filter_fn: Callable[[str, nn.Module], bool] | None = None) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs whose weights are binarized: Linear and Conv layers, in order."""
    layers = [(n, m) for n, m in model.named_modules() if type(m) in WEIGHT_LAYERS
              and (filter_fn is None or filter_fn(n, m))]
    return layers if binarize_first_last else layers[1:-1]


def layer_scales(weights: list[torch.Tensor]) -> list[float]:
    """α_l = mean |W_l|: the least-squares scale of sign(W_l)."""
    return [float(w.detach().abs().mean()) for w in weights]


def exact_penalty_grad(weights: list[torch.Tensor], rho: float) -> None:
    """Add the penalty's gradient −ρ·sign(W) to each weight's gradient (after backward)."""
    for w in weights:
        add_penalty_grad_(w, rho)


@torch.no_grad()
def project_box(weights: list[torch.Tensor], scales: list[float]) -> None:
    """W ← clip(W, −α, α) for each layer (after the optimizer step)."""
    for w, alpha in zip(weights, scales):
        w.clamp_(-alpha, alpha)


def fraction_binary(weights: list[torch.Tensor], scales: list[float]) -> float:
    total = sum(w.numel() for w in weights)
    return sum(count_binary(w, a) for w, a in zip(weights, scales)) / max(total, 1)


def apply_binary_connect(model: nn.Module, binarize_first_last: bool = True,
                         filter_fn: Callable[[str, nn.Module], bool] | None = None, *,
                         optimizer: torch.optim.Optimizer | None = None, state=None) -> list[str]:
    """Replace the selected layers by BinaryConnect layers (forward with α·sign(W), straight-through
    gradient to the latent W), clip W to [−α, α]; returns the names replaced."""
    chosen = {n: m for n, m in binary_layers(model, binarize_first_last, filter_fn)}
    scales = dict(zip(chosen, layer_scales([m.weight for m in chosen.values()])))
    project_box([m.weight for m in chosen.values()], list(scales.values()))
    return replace_modules(model, optimizer, lambda n, m: to_binary_connect(m, scales[n]) if n in chosen else None,
                           what="binary_connect", state=state)


class ExactPenaltyBinary(Method):
    name = "binary_penalty"
    summary = "exact penalty drives weights to ±scale per layer, exactly binary in finitely many steps"
    paper = "Dockhorn, Yu, Partovi Nia, Sari: An exact penalty method for binary training (HAET @ ICLR 2021)"
    config_class = ExactPenaltyConfig
    owns = frozenset({"weight_format", "weight_sparsity"})

    def __init__(self, config: ExactPenaltyConfig | None = None, /, **params) -> None:
        super().__init__(config, **params)
        self.weights: list[torch.nn.Parameter] = []
        self.scales: list[float] = []
        self.rho = self.config.rho
        self.first_all_binary_step: int | None = None
        self.fraction = 0.0
        self.snapped: float | None = None
        self._latent: list[torch.Tensor] | None = None
        self._names: list[str] = []
        self._version = -1

    def fit_start(self, state) -> None:
        self._bind(state)

    def batch_start(self, state) -> None:
        if state.model_version != self._version:  # another method replaced layers (growth): follow them
            self._bind(state)

    def _bind(self, state) -> None:
        """Hold the model's current weights; a layer seen before keeps its scale α."""
        layers = binary_layers(state.unwrapped_model, self.config.binarize_first_last)
        if not layers:
            raise ConfigError("binary_penalty: the model has no Linear or Conv layer to binarize")
        old = dict(zip(self._names, self.scales))
        fresh = layer_scales([m.weight for _, m in layers])
        self._names = [n for n, _ in layers]
        self.weights = [m.weight for _, m in layers]
        self.scales = [old.get(n, s) for n, s in zip(self._names, fresh)]
        self._version = state.model_version
        project_box(self.weights, self.scales)  # start inside the box

    def after_backward(self, state) -> None:
        exact_penalty_grad(self.weights, self.rho)

    def after_step(self, state) -> None:
        project_box(self.weights, self.scales)
        self.fraction = fraction_binary(self.weights, self.scales)
        if self.fraction < 1.0:
            self.first_all_binary_step = None
        elif self.first_all_binary_step is None:
            self.first_all_binary_step = state.step

    def epoch_end(self, state) -> None:
        self._epoch = {"binary_penalty/fraction_binary": self.fraction, "binary_penalty/rho": self.rho}
        self.rho *= self.config.rho_growth

    def before_eval(self, state) -> None:
        # The final evaluation sees the binary network: weights not yet binary are projected to
        # ±α, and restored after it (so a checkpoint resumes exactly); fit_end projects for good.
        last = state.epoch >= state.epochs or state.stop_reason is not None
        if self.config.snap_at_end and last and self._latent is None and self.weights:
            self.snapped = 1.0 - fraction_binary(self.weights, self.scales)
            self._latent = [w.detach().clone() for w in self.weights]
            for w, alpha in zip(self.weights, self.scales):
                binarize_(w, alpha)

    def after_eval(self, state) -> None:
        if self._latent is not None:
            with torch.no_grad():
                for w, latent in zip(self.weights, self._latent):
                    w.copy_(latent)
            self._latent = None

    def fit_end(self, state) -> None:
        if self.config.snap_at_end:
            for w, alpha in zip(self.weights, self.scales):
                binarize_(w, alpha)

    def epoch_metrics(self) -> dict:
        return dict(getattr(self, "_epoch", {}))

    def metrics(self) -> dict:
        return {"binary_penalty/first_all_binary_step": self.first_all_binary_step,
                "binary_penalty/fraction_binary": self.fraction,
                "binary_penalty/snapped_fraction": self.snapped or 0.0,
                "binary_penalty/rho": self.rho, "binary_penalty/layers": len(self.weights)}

    def state_dict(self) -> dict:
        return {"scales": list(self.scales), "rho": self.rho, "first": self.first_all_binary_step,
                "fraction": self.fraction, "snapped": self.snapped}

    def load_state_dict(self, sd: dict) -> None:
        self.scales, self.rho, self.fraction = list(sd["scales"]), sd["rho"], sd["fraction"]
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
        names = apply_binary_connect(model, self.config.binarize_first_last, optimizer=state.optimizer, state=state)
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

