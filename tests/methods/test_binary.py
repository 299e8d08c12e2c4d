"""binary_penalty and binary_connect: the exact penalty's proximal map, applied after the optimizer's
step (never through its moments); finite, exact convergence to binary weights on a convex problem,
ρ as the speed knob, the Trainer's binary metrics, BinaryConnect's forward and gradient, and
refusal of models with nothing to binarize."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import haet
from haet.core.errors import ConfigError
from haet.methods import parse_entry, parse_method
from haet.methods._binary_ops import BinaryConnectLinear, prox_binary_penalty_
from haet.methods.binary import (BinaryConnect, ExactPenalty, ExactPenaltyBinary, apply_binary_connect,
                                 apply_exact_penalty, binary_layers, fraction_binary)
from haet.models import build_model

from ..conftest import tiny_cnn


def logistic_problem(n: int = 400, d: int = 12):
    """Logistic regression whose weights must be ±1; G bounds ‖∇f‖∞ on the whole box."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w_true = torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0).double()
    y = torch.sign(x @ w_true + 0.5 * torch.randn(n, generator=g, dtype=torch.float64))
    bound = float(x.abs().mean(0).max())  # |∂f/∂w_j| = |mean_i y_i x_ij σ(·)| ≤ mean_i |x_ij|
    return x, y, bound


def penalized_descent(x, y, rho: float, eta: float = 0.05, steps: int = 1500):
    """Proximal gradient descent on f + ρP: (first step of the final all-binary stretch or None,
    weights at that step, final weights)."""
    w = (0.01 * torch.randn(x.shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    w.requires_grad_()
    penalty = ExactPenalty(["w"], [w], [1.0], rho, optimizer=None, lr=eta)
    first, at_first = None, None
    for step in range(1, steps + 1):
        w.grad = None
        F.softplus(-y * (x @ w)).mean().backward()
        with torch.no_grad():
            w -= eta * w.grad
        penalty.prox_step()                                   # W ← prox_{ηρP}(W − η∇f)
        if fraction_binary([w], [1.0]) < 1.0:
            first = None
        elif first is None:
            first, at_first = step, w.detach().clone()
        elif step >= first + 200:   # binary for 200 steps in a row: it stays (the final check)
            break
    return first, at_first, w.detach()


def test_exact_penalty_reaches_a_binary_point_in_finitely_many_steps_and_stays():
    x, y, bound = logistic_problem()
    eta = 0.05
    for factor in (1.2, 2.0, 4.0):
        rho = factor * bound
        first, at_first, final = penalized_descent(x, y, rho, eta)
        assert first is not None and first <= math.ceil(1.0 / (eta * (rho - bound)))  # the derived bound
        assert set(final.abs().tolist()) == {1.0}                                   # exactly ±1
        assert torch.equal(final, at_first)                                          # and it stayed there


def test_larger_rho_reaches_the_binary_point_in_fewer_steps():
    x, y, bound = logistic_problem()
    steps = [penalized_descent(x, y, factor * bound)[0] for factor in (0.5, 1.0, 2.0, 4.0, 8.0)]
    assert None not in steps
    assert all(a > b for a, b in zip(steps, steps[1:])), steps


def test_prox_moves_each_weight_toward_the_nearer_sign_and_lands_exactly():
    w = torch.tensor([-0.5, 0.0, 0.25, 0.95, 1.3, -1.02, 1.0])
    prox_binary_penalty_(w, 1.0, 0.1)
    assert torch.allclose(w, torch.tensor([-0.6, 0.1, 0.35, 1.0, 1.2, -1.0, 1.0]))
    assert w[3] == 1.0 and w[5] == -1.0 and w[6] == 1.0                 # within t of ±1: exactly ±1
    # it is the minimizer of t·| |u| − 1 | + ½(u − w)² (checked on a fine grid)
    grid = torch.linspace(-2, 2, 40001, dtype=torch.float64)
    for value in (-0.5, 0.03, 0.25, 0.95, 1.3):
        best = grid[(0.1 * (grid.abs() - 1).abs() + 0.5 * (grid - value) ** 2).argmin()]
        out = torch.tensor([value], dtype=torch.float64)
        assert float(prox_binary_penalty_(out, 1.0, 0.1)) == pytest.approx(float(best), abs=1e-4)


def test_the_prox_runs_after_the_optimizer_step_and_never_through_its_moments():
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    model, reference = tiny_cnn(), tiny_cnn()
    reference.load_state_dict(model.state_dict())
    trainer = haet.Trainer(model, [(x, y)], [(x, y)], optimizer=lambda p: torch.optim.Adam(p, lr=0.01),
                           methods=[ExactPenaltyBinary(rho=0.5, snap_at_end=False)], progress=False)
    trainer.fit(1)                                                      # one batch: one step
    opt = torch.optim.Adam(reference.parameters(), lr=0.01)
    penalty = apply_exact_penalty(reference, ExactPenaltyBinary.config_class(rho=0.5), optimizer=opt)
    assert penalty.names == ["0", "3"]                                  # α_l from the initial weights
    F.cross_entropy(reference(x), y).backward()
    opt.step()                                                          # the step on f alone
    penalty.prox_step()                                                 # then the prox, t = ρ·lr
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-7)
    adam = trainer.state.optimizer.state[model[0].weight]
    assert torch.allclose(adam["exp_avg"], opt.state[reference[0].weight]["exp_avg"])   # moments saw ∇f only


def test_trainer_records_the_first_all_binary_step_and_the_fraction_per_epoch(trainer_factory):
    trainer = trainer_factory(methods=parse_entry("binary_penalty:rho=1,rho_growth=1"),
                              optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    record = trainer.fit(3)
    m = record.method_metrics
    # SGD's steps here are far below the prox's t = ρ·lr = 0.1, and the largest scale (the conv's,
    # mean |W| of a 3×3 kernel init) is < 0.2: every weight is exactly ±α within 2 steps and stays.
    assert m["binary_penalty/first_all_binary_step"] is not None and m["binary_penalty/first_all_binary_step"] <= 3
    assert m["binary_penalty/fraction_binary"] == 1.0 and m["binary_penalty/snapped_fraction"] == 0.0
    assert [h["binary_penalty/fraction_binary"] for h in record.history] == [1.0, 1.0, 1.0]
    method = trainer.methods[0]
    for w, alpha in zip(method.weights, method.scales):
        assert w.detach().abs().unique().tolist() == [alpha]


def test_the_final_network_is_binary_even_before_convergence(trainer_factory):
    trainer = trainer_factory(methods=parse_entry("binary_penalty:rho=1e-6,rho_growth=1"))
    record = trainer.fit(1)
    m = record.method_metrics
    assert m["binary_penalty/first_all_binary_step"] is None and m["binary_penalty/snapped_fraction"] > 0.5
    method = trainer.methods[0]
    assert fraction_binary(method.weights, method.scales) == 1.0   # projected before the final evaluation


def test_rho_grows_per_epoch(trainer_factory):
    record = trainer_factory(methods=parse_entry("binary_penalty:rho=0.001,rho_growth=3")).fit(3)
    assert [h["binary_penalty/rho"] for h in record.history] == pytest.approx([0.001, 0.003, 0.009])


def test_binary_connect_forward_is_scale_times_sign_and_gradient_is_straight_through():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    params = [id(p) for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    names = apply_binary_connect(model, optimizer=optimizer)
    assert names == ["0", "2"] and isinstance(model[0], BinaryConnectLinear)
    assert [id(p) for p in model.parameters()] == params == [id(p) for p in optimizer.param_groups[0]["params"]]
    x = torch.randn(8, 6)
    w0 = torch.where(model[0].weight >= 0, model[0].scale, -model[0].scale).detach().requires_grad_()
    w2 = torch.where(model[2].weight >= 0, model[2].scale, -model[2].scale).detach().requires_grad_()
    reference = F.linear(F.relu(F.linear(x, w0, model[0].bias)), w2, model[2].bias)
    out = model(x)
    assert torch.equal(out, reference)
    out.square().sum().backward()
    reference.square().sum().backward()
    assert torch.equal(model[0].weight.grad, w0.grad) and torch.equal(model[2].weight.grad, w2.grad)


def test_binary_connect_in_trainer_keeps_latent_weights_in_the_box(trainer_factory):
    trainer = trainer_factory(methods=parse_entry("binary_connect"), optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    record = trainer.fit(2)
    layers = trainer.methods[0].layers
    assert len(layers) == 2 and record.method_metrics["binary_connect/first_all_binary_step"] == 0
    assert all(float(m.weight.detach().abs().max()) <= float(m.scale) for m in layers)
    assert record.method_metrics["binary_connect/fraction_latent_saturated"] > 0  # lr 1 saturates some


def test_binarize_first_last_false_keeps_the_outer_layers_float():
    model = build_model("mnist5k-cnn", (1, 28, 28), 10)
    assert [n for n, _ in binary_layers(model, binarize_first_last=False)] == ["3"]
    assert [n for n, _ in binary_layers(model)] == ["0", "3", "7"]


def test_bad_parameters_and_conflicts_are_clear_errors():
    with pytest.raises(ConfigError, match=r"rho must be a number in \(0, inf\]"):
        parse_method("binary_penalty:rho=0")
    with pytest.raises(ConfigError, match=r"rho_growth must be a number in \[1, 100\]"):
        parse_method("binary_penalty:rho_growth=0.5")
    with pytest.raises(ConfigError, match="binary_penalty and binary_connect cannot run together"):
        haet.Trainer(tiny_cnn(), [(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long))],
                     methods=parse_entry("binary_penalty+binary_connect"))


@pytest.mark.parametrize("method", [ExactPenaltyBinary, BinaryConnect])
def test_a_model_with_nothing_to_binarize_is_refused(method):
    batch = [(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))]
    no_layer = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(64))
    with pytest.raises(ConfigError, match="nothing to binarize.*no nn.Linear or nn.Conv"):
        haet.Trainer(no_layer, batch, methods=[method()], progress=False).fit(1)
    with pytest.raises(ConfigError, match="binarize_first_last=False leaves none of its 2"):
        haet.Trainer(tiny_cnn(), batch, methods=[method(binarize_first_last=False)], progress=False).fit(1)


def test_resume_restores_the_penalty_state(trainer_factory, tmp_path):
    spec = "binary_penalty:rho=0.01,rho_growth=2"
    full = trainer_factory(methods=parse_entry(spec))
    full.fit(2)
    trainer_factory(methods=parse_entry(spec), out_dir=tmp_path, checkpoint=True).fit(1)
    resumed = trainer_factory(methods=parse_entry(spec), out_dir=tmp_path, checkpoint=True)
    resumed.fit(2, resume_from=tmp_path)
    a, b = full.state.model.state_dict(), resumed.state.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.methods[0].metrics() == resumed.methods[0].metrics()
