"""Equilibrium propagation: a layered energy-based network, its relaxation and its local update.

Scellier & Bengio, "Equilibrium propagation: bridging the gap between energy-based models and
backpropagation" (Front. Comput. Neurosci. 2017); the discrete-time, layered form of Ernoult et
al. (NeurIPS 2019) and Laborieux et al., "Scaling equilibrium propagation to deep ConvNets by
drastically reducing its gradient estimator bias" (Front. Neurosci. 2021; symmetric nudging).

The network. Units ``s = (s_1 … s_L)`` in the box [0, 1], input ``s_0 = x``, weights ``W_l`` and
biases ``b_l`` between consecutive layers. The primitive function and the energy are

    Φ(x, s) = Σ_l s_l · (W_l s_{l−1} + b_l)          E(s) = ½ Σ_l ‖s_l‖² − Φ(x, s)

and, with the squared-error cost ``ℓ(s) = ½‖y − s_L‖²`` (y one-hot), the nudged energy is
``F = E + β ℓ``. Relaxation minimizes F layer by layer (block coordinate descent, layers 1..L in
order, each seeing its neighbours' latest states): F is quadratic in each ``s_l`` with an identity
Hessian, so the exact minimizer over the box is a clamp,

    s_l ← clamp(W_l s_{l−1} + b_l + W_{l+1}ᵀ s_{l+1}, 0, 1)             (hidden layers)
    s_L ← clamp((W_L s_{L−1} + b_L + β y) / (1 + β), 0, 1)             (output layer)

and every layer update lowers F: the relaxation converges monotonically (asserted in the tests).
This is the hard-sigmoid dynamics of Laborieux et al. written as exact block minimization.

The update. With ``∂Φ/∂W_l = s_l s_{l−1}ᵀ`` and ``∂Φ/∂b_l = s_l``, the gradient of the loss at the
free equilibrium is estimated from two (or three) equilibria, with local quantities only:

    standard   ∇ ≈ −(∂Φ/∂θ(s^{+β}) − ∂Φ/∂θ(s^0)) / β
    symmetric  ∇ ≈ −(∂Φ/∂θ(s^{+β}) − ∂Φ/∂θ(s^{−β})) / (2β)          (Laborieux et al.: third phase)
    centered   ∇ ≈ −(∂Φ/∂θ(s^{+β/2}) − ∂Φ/∂θ(s^{−β/2})) / β        (nudges of ±β/2, same total spread β)

No autograd is involved: the relaxation runs under ``torch.no_grad`` and nothing is saved for a
backward pass. The estimate is handed to the optimizer as the parameters' ``.grad``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

NUDGES = ("standard", "symmetric", "centered")


class EqPropMLP(nn.Module):
    """A layered energy-based network; calling it relaxes the free phase and returns ``s_L``.

    In training mode the free equilibrium of the last call is kept in ``free_states`` (the
    method's nudged phases start from it). ``t_free`` is the number of relaxation sweeps.
    """

    def __init__(self, sizes: Sequence[int], t_free: int = 30) -> None:
        super().__init__()
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes must be at least two positive layer widths, got {list(sizes)}")
        self.sizes = [int(s) for s in sizes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(self.sizes[:-1], self.sizes[1:]))
        self.t_free = t_free
        self.free_states: list[torch.Tensor] | None = None

    def init_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x.new_zeros(len(x), n) for n in self.sizes[1:]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        with torch.no_grad():
            states = relax(self, x, self.init_states(x), self.t_free)
        if self.training:
            self.free_states = states
        return states[-1]


def relax(net: EqPropMLP, x: torch.Tensor, states: list[torch.Tensor], steps: int, beta: float = 0.0,
          target: torch.Tensor | None = None) -> list[torch.Tensor]:
    """`steps` sweeps of block minimization of E + β ℓ from `states` (not modified); returns the new states."""
    s = list(states)
    layers = net.layers
    last = len(layers) - 1
    for _ in range(steps):
        for i, layer in enumerate(layers):
            below = x if i == 0 else s[i - 1]
            drive = layer(below)
            if i < last:
                drive = drive + F.linear(s[i + 1], layers[i + 1].weight.t())
                s[i] = drive.clamp(0.0, 1.0)
            else:
                if beta:
                    drive = (drive + beta * target) / (1.0 + beta)
                s[i] = drive.clamp(0.0, 1.0)
    return s


def energy(net: EqPropMLP, x: torch.Tensor, states: list[torch.Tensor], beta: float = 0.0,
           target: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample F = E + β ℓ (for checks and plots; the dynamics never evaluate it)."""
    x = x.flatten(1)
    phi = sum((s * layer(x if i == 0 else states[i - 1])).sum(1) for i, (s, layer) in enumerate(zip(states, net.layers)))
    e = 0.5 * sum((s * s).sum(1) for s in states) - phi
    if beta:
        e = e + beta * 0.5 * ((target - states[-1]) ** 2).sum(1)
    return e


def phi_grads(net: EqPropMLP, x: torch.Tensor, states: list[torch.Tensor]) -> list[torch.Tensor]:
    """∂Φ/∂θ for every parameter of `net` (weights then bias, per layer), averaged over the batch."""
    out = []
    n = len(x)
    for i, s in enumerate(states):
        below = x if i == 0 else states[i - 1]
        out += [s.t() @ below / n, s.mean(0)]
    return out


def eqprop_gradients(net: EqPropMLP, x: torch.Tensor, target: torch.Tensor, *, beta: float = 0.1,
                     t_nudge: int = 10, nudge: str = "symmetric",
                     free: list[torch.Tensor] | None = None, t_free: int | None = None) -> list[torch.Tensor]:
    """EqProp's estimate of the loss gradient for every parameter of `net` (in ``parameters()``
    order), from the free equilibrium `free` (relaxed here when None) and the nudged phase(s)."""
    if nudge not in NUDGES:
        raise ValueError(f"nudge must be one of {', '.join(NUDGES)}, got {nudge!r}")
    x = x.flatten(1)
    with torch.no_grad():
        if free is None:
            free = relax(net, x, net.init_states(x), net.t_free if t_free is None else t_free)
        if nudge == "standard":
            plus, minus, scale = relax(net, x, free, t_nudge, beta, target), free, beta
        elif nudge == "symmetric":
            plus = relax(net, x, free, t_nudge, beta, target)
            minus, scale = relax(net, x, free, t_nudge, -beta, target), 2 * beta
        else:
            plus = relax(net, x, free, t_nudge, beta / 2, target)
            minus, scale = relax(net, x, free, t_nudge, -beta / 2, target), beta
        return [-(a - b) / scale for a, b in zip(phi_grads(net, x, plus), phi_grads(net, x, minus))]


def one_hot(y: torch.Tensor, classes: int) -> torch.Tensor:
    return F.one_hot(y, classes).to(torch.float32)


def eqprop_mlp(input_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int] = (256,)) -> EqPropMLP:
    """The model registry's builder: flattened input, `hidden` layers, one output unit per class."""
    return EqPropMLP([math.prod(input_shape), *hidden, num_classes])
