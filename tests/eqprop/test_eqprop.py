"""Equilibrium propagation: its update equals backprop's gradient for small β, the relaxation
lowers the energy monotonically, and nothing is saved for autograd."""

from __future__ import annotations

import pytest
import torch

import haet
from haet.core.errors import ConfigError
from haet.eqprop import EqPropMLP, energy, eqprop_gradients, one_hot, relax
from haet.methods import parse_entry
from haet.models import build_model


def small_net(seed: int = 0) -> EqPropMLP:
    torch.manual_seed(seed)
    net = EqPropMLP([20, 16, 12, 5])
    with torch.no_grad():
        for layer in net.layers:
            layer.weight.mul_(0.5)   # a contraction: the relaxation converges fast
            layer.bias.add_(0.5)     # units mostly inside the box (6-20% at a bound)
    return net


def bptt_gradient(net: EqPropMLP, x, target, steps: int = 200) -> list[torch.Tensor]:
    """The loss gradient at the free equilibrium by backpropagation through the relaxation."""
    states = [x.new_zeros(len(x), n) for n in net.sizes[1:]]
    with torch.no_grad():
        states = relax(net, x, states, steps - 50)
    states = [s.clone() for s in states]
    free = relax(net, x, states, 50)  # the last 50 sweeps with autograd: enough once converged
    loss = 0.5 * ((target - free[-1]) ** 2).sum(1).mean()
    return list(torch.autograd.grad(loss, list(net.parameters())))


@pytest.mark.parametrize("nudge", ["symmetric", "centered", "standard"])
def test_eqprop_update_equals_the_backprop_gradient_for_small_beta(nudge):
    torch.manual_seed(1)
    net = small_net()
    x = torch.rand(32, 20)
    target = one_hot(torch.randint(0, 5, (32,)), 5)
    reference = bptt_gradient(net, x, target)
    estimate = eqprop_gradients(net, x, target, beta=0.01, t_nudge=200, nudge=nudge, t_free=300)
    for ref, est in zip(reference, estimate):
        cos = torch.nn.functional.cosine_similarity(ref.flatten(), est.flatten(), dim=0)
        assert cos >= 0.99, f"{nudge}: cosine {cos:.4f}"
        assert torch.allclose(est, ref, rtol=0.1, atol=1e-3 * ref.abs().max())


def test_free_phase_lowers_the_energy_at_every_sweep():
    net = small_net(2)
    x = torch.rand(16, 20)
    states = net.init_states(x)
    previous = energy(net, x, states)
    with torch.no_grad():
        for _ in range(40):
            states = relax(net, x, states, 1)
            now = energy(net, x, states)
            assert (now <= previous + 1e-5).all()
            previous = now
        settled = relax(net, x, states, 1)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(settled, states))  # a fixed point


def test_an_eqprop_step_saves_nothing_for_autograd_and_counts_its_relaxations(trainer_factory):
    from haet.data import TensorData

    torch.manual_seed(0)
    data = TensorData(torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,)))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        haet.seed_everything(0)
        record = haet.Trainer(build_model("eqprop-mlp", (1, 8, 8), 10), data, data, methods=parse_entry(
            "eqprop:t_free=5,t_nudge=3,nudge=symmetric"), budget=haet.Budget(steps=2), progress=False,
            batch_size=32).fit(1)
    assert saved == [] and record.cost["memory_bytes"]["activations"] == 0
    # Each sweep: one forward matmul per layer (64→256, 256→10) and one transposed matmul into the
    # hidden layer (10→256); 5 free + 2×3 nudged sweeps per step, batch 32, 2 FLOPs per MAC.
    per_sweep = 2 * 32 * (64 * 256 + 256 * 10 + 10 * 256)
    update = 2 * (256 * 32 * 64 + 10 * 32 * 256) * 3  # ∂Φ/∂W for the free and two nudged equilibria
    assert record.cost["flops"] == 2 * (11 * per_sweep + update - 2 * (256 * 32 * 64 + 10 * 32 * 256))


def test_eqprop_learns_digits():
    from haet.data.tasks import get_task

    train, test = get_task("digits").load(0, None)
    haet.seed_everything(0)
    record = haet.Trainer(build_model("eqprop-mlp", (1, 8, 8), 10), train, test,
                          methods=parse_entry("eqprop:t_free=20,t_nudge=6"), progress=False, batch_size=32,
                          optimizer=lambda p: torch.optim.SGD(p, lr=0.1)).fit(3)
    assert record.metrics["accuracy"] >= 0.8  # seed 0 reaches 0.85 (chance: 0.1)


def test_eqprop_is_refused_on_other_models_and_with_fusion(trainer_factory):
    with pytest.raises(ConfigError, match="use --model eqprop-mlp"):
        trainer_factory(methods=parse_entry("eqprop"))
    model = build_model("eqprop-mlp", (1, 8, 8), 4)
    with pytest.raises(ConfigError, match="fusion applies the updates from autograd.s backward, which eqprop replaces"):
        trainer_factory(model=model, methods=parse_entry("fusion+eqprop"))
    with pytest.raises(ConfigError, match=r"beta must be a number in \(0, 1\)"):
        parse_entry("eqprop:beta=0")
