"""gradmax: growth leaves the function unchanged, GradMax's fan-out maximizes the new fan-in's
gradient (= the SVD optimum, above random), the optimizer state grows with the parameters, and the
method grows on schedule, re-measures the meters and resumes to the same weights."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import haet
from haet.core.errors import ConfigError
from haet.methods import parse_entry
from haet.methods._gradmax_ops import GrowReLU, fan_in_gradients, find_pairs
from haet.methods.gradmax import GradMaxGrowth, grow


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4))


def cnn():  # the mnist5k-cnn shape, small: conv → pool → conv → pool → flatten → linear
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 5, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(5 * 2 * 2, 4))


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (32,), generator=g)


@pytest.mark.parametrize("make, layer", [(mlp, "1"), (mlp, "3"), (cnn, "0"), (cnn, "3")])
@pytest.mark.parametrize("init", ["gradmax", "random", "zeros"])
def test_growth_leaves_the_network_function_unchanged(make, layer, init):
    torch.manual_seed(0)
    model = make().double()
    x, y = batch()
    before, width = model(x), model.get_submodule(layer).weight.shape[0]
    info = grow(model, layer, 3, init, (x, y), generator=torch.Generator().manual_seed(1))
    assert info["width"] == width + 3 == model.get_submodule(layer).weight.shape[0]
    assert torch.allclose(model(x), before, rtol=0, atol=1e-12)     # float64: only summation-order rounding


def new_fan_in_grad_norm(model, layer, old_width, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return model.get_submodule(layer).weight.grad[old_width:].norm().item()


@pytest.mark.parametrize("make, layer", [(mlp, "1"), (cnn, "0"), (cnn, "3")])
def test_gradmax_maximizes_the_gradient_of_the_new_weights(make, layer):
    x, y = batch()
    norms = {}
    for init in ("gradmax", "random"):
        torch.manual_seed(0)
        model = make().double()
        old = model.get_submodule(layer)
        width = old.weight.shape[0]
        info = grow(model, layer, 2, init, (x, y), scale=0.5, generator=torch.Generator().manual_seed(3))
        norms[init] = new_fan_in_grad_norm(model, layer, width, x, y)
        if init == "gradmax":  # the optimum: each new unit's fan-out has norm c, so ‖g‖² = c² (σ_1² + σ_2²)
            consumer = model.get_submodule(find_pairs(model)[layer].consumer)
            fan_out = consumer.weight.reshape(consumer.weight.shape[0], width + 2, -1)
            c = fan_out[:, width:].transpose(0, 1).reshape(2, -1).norm(dim=1)
            assert torch.allclose(c, c[0].expand(2))
            expected = c[0].item() * sum(s * s for s in info["singular_values"]) ** 0.5
            assert norms["gradmax"] == pytest.approx(expected, rel=1e-9)
    assert norms["gradmax"] > norms["random"] > 0


def test_directions_are_the_top_singular_vectors_of_m_for_linear_layers():
    """For Linear → Linear, Aᵀ is the paper's M = Σ_batch (∂L/∂z_{l+1}) h_{l-1}ᵀ."""
    torch.manual_seed(0)
    model = mlp().double()
    model[2] = GrowReLU()
    x, y = batch()
    grads, flops = fan_in_gradients(model, find_pairs(model)["1"], (x, y), F.cross_entropy)
    h = x.flatten(1)
    z = model[3](model[2](model[1](h)))
    z.retain_grad()
    F.cross_entropy(model[5](model[4](z)), y).backward()
    assert torch.allclose(grads, z.grad.t() @ h, rtol=0, atol=1e-15)
    assert flops > 0


def test_optimizer_state_of_old_parameters_is_preserved():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = batch()
    x = x.float()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    old_w, old_next = model[1].weight, model[3].weight
    saved = {k: v.clone() for k, v in opt.state[old_w].items()}
    saved_next = {k: v.clone() for k, v in opt.state[old_next].items()}
    position = [id(p) for p in opt.param_groups[0]["params"]].index(id(old_w))
    grow(model, "1", 4, "gradmax", (x, y), optimizer=opt)
    new_w, new_next = model[1].weight, model[3].weight
    assert opt.param_groups[0]["params"][position] is new_w
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in model.parameters()}
    state, state_next = opt.state[new_w], opt.state[new_next]
    assert torch.equal(state["step"], saved["step"])
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state[key][:12], saved[key]) and not state[key][12:].any()          # new rows: zero
        assert torch.equal(state_next[key][:, :12], saved_next[key]) and not state_next[key][:, 12:].any()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()  # shapes agree: the step runs and moves the new units' fan-in off zero
    assert new_w[12:].abs().sum() > 0


def test_method_grows_on_schedule_and_resumes_to_the_same_weights(tmp_path, tiny_data):
    def run(epochs, out, resume=False, spec="gradmax:grow_every=2,grow_until=6"):
        haet.seed_everything(0)
        model = cnn()
        trainer = haet.Trainer(model, tiny_data, tiny_data, methods=parse_entry(spec), progress=False,
                               out_dir=out, checkpoint=True)
        return trainer.fit(epochs, resume_from=out if resume else None), model

    record, model = run(3, tmp_path / "a")     # 4 steps per epoch: events at steps 2, 4, 6
    widths = [(h["gradmax/width/0"], h["gradmax/width/3"]) for h in record.history]
    # start at round(0.25 × (3, 5)) = (1, 1); event e of 3 targets 1 + round((full - 1)·e/3)
    assert widths == [(2, 4), (3, 5), (3, 5)]
    assert record.method_metrics["gradmax/growth_events"] == 3
    assert type(model[1]) is nn.ReLU and type(model[4]) is nn.ReLU   # GrowReLU only while growing
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in cnn().parameters())
    full, _ = run(3, tmp_path / "full", spec="baseline")
    assert record.cost["flops"] < full.cost["flops"]   # re-measured at each width (model_version bumped)
    for stop in (1, 2):  # resumed mid-growth (widths rebuilt) and after it (ReLUs restored)
        run(stop, tmp_path / f"b{stop}")
        resumed, resumed_model = run(3, tmp_path / f"b{stop}", resume=True)
        assert resumed.history[-1]["gradmax/width/3"] == 5
        for (k, a), b in zip(model.state_dict().items(), resumed_model.state_dict().values()):
            assert torch.equal(a, b), k


class Residual(nn.Module):
    """Not an nn.Sequential: its growable-looking pair sees (batch, seq, features) inputs."""

    def __init__(self):
        super().__init__()
        self.ff = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = x.flatten(1).view(len(x), 8, 8)
        return self.head((h + self.ff(h)).mean(1))


@pytest.mark.parametrize("model, message", [
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 4)), r"got Sequential with no growable pair"),
    (Residual, r"got Residual \(not an nn.Sequential\)"),
])
def test_models_gradmax_cannot_grow_are_refused_at_fit_start(tiny_data, model, message):
    with pytest.raises(ConfigError, match="gradmax needs an nn.Sequential model with a growable pair.*" + message):
        haet.Trainer(model(), tiny_data, methods=[GradMaxGrowth()], progress=False).fit(1)


def test_grow_needs_no_trainer_state():
    import inspect

    assert "state" not in inspect.signature(grow).parameters


def test_bad_parameters_name_the_parameter():
    with pytest.raises(ConfigError, match="init must be one of"):
        parse_entry("gradmax:init=ones")
    with pytest.raises(ConfigError, match="start_width"):
        GradMaxGrowth(start_width=0)
    with pytest.raises(ConfigError, match="growable"):
        with warnings.catch_warnings():
            grow(mlp(), "5", 1, "random")
