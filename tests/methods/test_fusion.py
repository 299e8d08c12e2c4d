"""Optimizer fusion: the same parameters as the standard loop, gradients freed in backward, clear refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import haet
from haet.cli import main as cli_main
from haet.methods import parse_entry
from haet.methods.fusion import FusionConfig, OptimizerFusion, fuse_optimizer

STEPS = 50
OPTIMIZERS = {  # every option the issue names: momentum, Nesterov, weight decay, AMSGrad, decoupled decay
    "sgd": lambda p, **kw: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, **kw),
    "adam": lambda p, **kw: torch.optim.Adam(p, lr=1e-2, amsgrad=True, weight_decay=1e-4, **kw),
    "adamw": lambda p, **kw: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, **kw),
}


class Net(nn.Module):
    """Frozen, shared and 'orphan' parameters (read outside their module's forward) in one model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.frozen = nn.Linear(256, 256)
        self.frozen.requires_grad_(False)
        self.a = nn.Linear(256, 16)
        self.shared = nn.Linear(16, 16)
        self.shared_again = self.shared           # the same module (and parameters) used twice
        self.orphan = nn.Linear(16, 16)           # only its weights are read, by this module's forward
        self.head = nn.Linear(16, 4)
        self.scale = nn.Parameter(torch.ones(()))  # a parameter of the root module itself

    def forward(self, x):
        h = self.frozen(torch.relu(self.conv(x)).flatten(1))
        h = torch.relu(self.shared_again(torch.relu(self.shared(torch.relu(self.a(h))))))
        h = torch.relu(nn.functional.linear(h, self.orphan.weight, self.orphan.bias))
        return self.head(h) * self.scale


def _batches(n=STEPS):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 16, 1, 8, 8, generator=g), torch.randint(0, 4, (n, 16), generator=g)


def _train(opt_name, mode=None, kernel="fused", clip=0.0, accumulate=1, **opt_kw):
    """50 steps with a StepLR schedule; mode=None is the standard torch.optim loop."""
    torch.manual_seed(0)
    model = Net()
    opt = OPTIMIZERS[opt_name]([p for p in model.parameters() if p.requires_grad], **opt_kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    handle = fuse_optimizer(model, opt, mode, kernel=kernel, max_grad_norm=clip,
                            accumulate_grad_batches=accumulate) if mode else opt
    x, y = _batches(STEPS * accumulate)
    for t in range(STEPS):
        for k in range(accumulate):
            i = t * accumulate + k
            nn.functional.cross_entropy(model(x[i]), y[i]).backward()
        if mode is None and clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip)
        handle.step()
        handle.zero_grad()
        sched.step()
    if mode:
        handle.remove()
    return model


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("mode", ["backward", "forward"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_parameters_equal_the_standard_loop_after_50_steps(opt_name, mode):
    # kernel=optimizer runs the optimizer's own code per parameter: bit for bit the standard loop.
    assert _max_diff(_train(opt_name, mode, kernel="optimizer"), _train(opt_name)) == 0.0
    # kernel=fused runs torch's fused kernel: what the same optimizer with fused=True computes.
    assert _max_diff(_train(opt_name, mode, kernel="fused"), _train(opt_name, fused=True)) <= 1e-6
    assert _max_diff(_train(opt_name, mode, kernel="fused"), _train(opt_name)) <= 1e-6  # and its default, here
    torch.manual_seed(0)
    initial = Net().frozen.weight.detach().clone()
    assert torch.equal(_train(opt_name, mode).frozen.weight, initial)  # frozen stays frozen


def test_forward_mode_clips_and_accumulates_exactly():
    clipped = _train("sgd", "forward", kernel="optimizer", clip=0.05)
    assert _max_diff(clipped, _train("sgd", clip=0.05)) == 0.0
    assert _max_diff(clipped, _train("sgd")) > 1e-3  # the clipping did bite
    assert _max_diff(_train("adam", "forward", kernel="optimizer", accumulate=2), _train("adam", accumulate=2)) == 0.0


def test_backward_mode_frees_each_gradient_as_soon_as_it_is_used():
    torch.manual_seed(0)
    model = Net()
    fused = fuse_optimizer(model, torch.optim.Adam(model.parameters(), lr=1e-3), "backward")
    alive = []
    for p in fused.fused_params:  # registered after fusion's hooks, so they run right after them
        p.register_post_accumulate_grad_hook(
            lambda _: alive.append(sum(q.grad is not None for q in model.parameters())))
    x, y = _batches(1)
    nn.functional.cross_entropy(model(x[0]), y[0]).backward()
    assert len(alive) == len(fused.fused_params) == 11  # conv, a, shared, orphan, head: weight and bias; scale
    assert max(alive) == 0  # no gradient outlives its own update


def _trainer(tiny_data, methods=(), fused_adam=False, **kw):
    haet.seed_everything(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = (lambda p: torch.optim.Adam(p, lr=1e-2, fused=True)) if fused_adam else (lambda p: torch.optim.Adam(p, lr=1e-2))
    return haet.Trainer(model, tiny_data, tiny_data, optimizer=opt, methods=list(methods), progress=False, **kw)


def test_memory_meter_gradient_bytes_drop_by_the_parameter_bytes_in_backward_mode(tiny_data):
    base = _trainer(tiny_data)
    base_record = base.fit(epochs=2)
    param_bytes = sum(p.numel() * 4 for p in base.state.model.parameters())
    for mode, grads in (("backward", 0), ("forward", param_bytes)):
        trainer = _trainer(tiny_data, [OptimizerFusion(mode=mode, kernel="optimizer")])
        record = trainer.fit(epochs=2)
        assert base_record.cost["memory_bytes"]["grads"] - record.cost["memory_bytes"]["grads"] == param_bytes - grads
        assert record.method_metrics == {"fusion/fused_params": 4, "fusion/fused_param_bytes": param_bytes}
        assert _max_diff(trainer.state.model, base.state.model) == 0.0  # pending updates applied before the end
        assert record.metrics == base_record.metrics  # and before every evaluation
    fused = _trainer(tiny_data, [OptimizerFusion()])
    fused.fit(epochs=2)
    assert _max_diff(fused.state.model, _fitted(_trainer(tiny_data, fused_adam=True))) <= 1e-6
    assert not fused.state.model[1].weight._post_accumulate_grad_hooks  # hooks removed at the end of fit


def _fitted(trainer):
    trainer.fit(epochs=2)
    return trainer.state.model


def test_forward_mode_checkpoint_resumes_to_the_same_weights(tiny_data, tmp_path):
    def run(out, epochs, resume=False):
        t = _trainer(tiny_data, [OptimizerFusion(mode="forward", kernel="optimizer")], out_dir=out, checkpoint=True)
        t.fit(epochs=epochs, resume_from=out if resume else None)
        return t.state.model

    straight = run(tmp_path / "a", 3)
    run(tmp_path / "b", 2)
    assert _max_diff(run(tmp_path / "b", 3, resume=True), straight) == 0.0


def test_what_fusion_cannot_do_exactly_is_refused_up_front(tiny_data):
    model = Net()
    with pytest.raises(haet.ConfigError, match="SGD, Adam and AdamW"):
        fuse_optimizer(model, torch.optim.RMSprop(model.parameters()))
    with pytest.raises(haet.ConfigError, match="max_grad_norm"):
        FusionConfig(mode="backward", max_grad_norm=1.0)
    with pytest.raises(haet.ConfigError, match="accumulation"):
        fuse_optimizer(model, torch.optim.Adam(model.parameters()), "backward", accumulate_grad_batches=2)
    fused = fuse_optimizer(model, torch.optim.Adam(model.parameters()), "backward")
    with pytest.raises(haet.ConfigError, match="closure"):
        fused.step(lambda: 0.0)
    x, y = _batches(2)
    nn.functional.cross_entropy(model(x[0]), y[0]).backward()
    with pytest.raises(RuntimeError, match="accumulation"):  # a second backward without step()
        nn.functional.cross_entropy(model(x[1]), y[1]).backward()

    class Clip(haet.Method):  # works on gradients at after_backward, where backward mode has none left
        name = "clip"

        def after_backward(self, state):
            torch.nn.utils.clip_grad_norm_(state.model.parameters(), 1.0)

    with pytest.raises(haet.ConfigError, match="mode=forward"):
        _trainer(tiny_data, [Clip(), OptimizerFusion(mode="backward")])
    _trainer(tiny_data, [Clip(), OptimizerFusion(mode="forward")])  # forward mode composes with it


def test_command_line_errors_name_the_parameter(capsys):
    assert cli_main(["train", "--task", "digits", "--method", "fusion:mode=sideways", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mode" in err and "backward, forward" in err
    assert parse_entry("fusion:mode=forward,kernel=optimizer,max_grad_norm=2")[0].config == \
        FusionConfig(mode="forward", kernel="optimizer", max_grad_norm=2.0)
    with pytest.raises(haet.ConfigError, match="max_grad_norm"):
        parse_entry("fusion:max_grad_norm=1")  # default mode is backward
