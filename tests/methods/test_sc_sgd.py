"""Momentum SGD on stochastic bit streams: unbiased, converging with the stream length, as documented at 1 bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import haet
from haet.cli import main as cli_main
from haet.methods import parse_entry
from haet.methods._sc_ops import hardware_model, pow2_scale, rms_error_bound, sc_momentum_update, \
    stochastic_moving_average
from haet.methods.fusion import OptimizerFusion
from haet.methods.sc_sgd import SCMomentumSGD, SCSGDConfig, StochasticMomentumSGD

BETA = 0.9
COPIES, LANES, STEPS = 400, 64, 40  # independent repetitions (rows) of the same 64 input sequences


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(STEPS, LANES, generator=g) - 0.5) * 0.9  # |x| < 0.45: the streams' full scale is 0.5
    return x


def _float_ema(x):
    m = torch.zeros(LANES)
    for t in range(STEPS):
        m = BETA * m + (1 - BETA) * x[t]
    return m


@pytest.mark.parametrize("encoding", ["lowdiscrepancy", "bernoulli"])
def test_stochastic_moving_average_is_unbiased_and_converges_as_streams_grow(encoding):
    x, target = _inputs(), _float_ema(_inputs())
    gen = torch.Generator().manual_seed(1)
    rms = {}
    for bits in (1, 4, 16, 64, 256, 4096):
        ema = torch.zeros(COPIES, LANES)
        for t in range(STEPS):
            stochastic_moving_average(ema, x[t].expand(COPIES, LANES), BETA, bits, encoding, gen)
        err = ema - target
        # unbiased: every lane's mean over the copies is within 5 standard errors of the float average
        assert (err.mean(0).abs() <= 5 * err.std(0) / COPIES ** 0.5 + 1e-7).all(), bits
        rms[bits] = float(err.pow(2).mean().sqrt())
        # and the spread stays under the analytic bound (full scale ≤ 1 with a 2× margin over 0.5)
        assert rms[bits] <= rms_error_bound(BETA, bits, encoding, scale=1.0), bits
    # converges: error ∝ 1/L with progressive-precision streams, ∝ 1/sqrt(L) with Bernoulli streams
    ratio = rms[16] / rms[256]
    assert ratio >= (8 if encoding == "lowdiscrepancy" else 2.5), rms
    assert rms[4096] <= (1e-4 if encoding == "lowdiscrepancy" else 5e-3)


@pytest.mark.parametrize("bits,encoding,scale", [(1, "lowdiscrepancy", "row"), (1, "bernoulli", "tensor"),
                                                 (4, "lowdiscrepancy", "tensor"), (4, "bernoulli", "row")])
def test_each_step_equals_torch_sgd_in_expectation(bits, encoding, scale):
    g = torch.Generator().manual_seed(2)
    w0, grad, buf0 = (torch.randn(8, 32, generator=g) for _ in range(3))
    grad = grad * torch.rand(8, 32, generator=g) ** 3  # heavy-tailed, like real gradients
    lr, wd, copies = 0.05, 1e-3, 4000
    w, ema = w0.repeat(copies, 1, 1), ((1 - BETA) * buf0).repeat(copies, 1, 1)  # copies: rows of a 3-D tensor
    ref = torch.optim.SGD([w0.clone().requires_grad_()], lr=lr, momentum=BETA, weight_decay=wd)
    ref.param_groups[0]["params"][0].grad = grad.clone()
    ref.state[ref.param_groups[0]["params"][0]]["momentum_buffer"] = buf0.clone()
    ref.step()
    expected = ref.param_groups[0]["params"][0].detach()
    sc_momentum_update(w, grad.repeat(copies, 1, 1), ema, lr=lr, momentum=BETA, stream_bits=bits, encoding=encoding,
                       weight_decay=wd, per_row=scale == "row", generator=torch.Generator().manual_seed(3))
    err = w - expected
    assert (err.mean(0).abs() <= 5 * err.std(0) / copies ** 0.5 + 1e-6).all()


def test_one_bit_streams_move_each_weight_by_at_most_one_counter_step():
    """stream_bits=1: every value is one random bit; the weight integrator moves by -1, 0 or +1 LSB."""
    g = torch.Generator().manual_seed(4)
    w, grad = torch.randn(16, 50, generator=g), torch.randn(16, 50, generator=g)
    ema0 = torch.randn(16, 50, generator=g) * 0.1
    ema, before = ema0.clone(), w.clone()
    sc_momentum_update(w, grad, ema, lr=0.05, momentum=BETA, stream_bits=1, generator=g)
    integrator_lsb = (1 - BETA) * torch.maximum(pow2_scale(grad, True), pow2_scale(ema0, True))
    ema_steps = (ema - ema0) / integrator_lsb
    assert torch.allclose(ema_steps, ema_steps.round(), atol=1e-4) and ema_steps.abs().max() <= 2  # up - down
    weight_steps = (w - before) / (0.05 / (1 - BETA) * pow2_scale(ema, True))
    assert torch.allclose(weight_steps, weight_steps.round(), atol=1e-4)
    assert set(weight_steps.round().unique().tolist()) <= {-1.0, 0.0, 1.0}


def _trained(optimizer, steps=30):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = optimizer(model.parameters())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(steps, 16, 1, 8, 8, generator=g), torch.randint(0, 4, (steps, 16), generator=g)
    for t in range(steps):
        nn.functional.cross_entropy(model(x[t]), y[t]).backward()
        opt.step()
        opt.zero_grad()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_long_progressive_streams_train_like_float_momentum_sgd():
    ref = _trained(lambda p: torch.optim.SGD(p, lr=0.05, momentum=BETA))
    gap = {bits: float((_trained(lambda p: SCMomentumSGD(p, lr=0.05, momentum=BETA, stream_bits=bits,
                                                         generator=torch.Generator().manual_seed(0))) - ref).abs().max())
           for bits in (4, 65536)}
    assert gap[65536] <= 1e-4 < gap[4]  # 30 steps: a stream of 2^16 bits is float SGD up to rounding


def test_hardware_model_matches_the_hand_count():
    hw = hardware_model(4)
    # per clock: 3 comparators + 3 random sources + 2 counter steps, plus 2 scale comparisons per update,
    # each a 16-bit op at 0.1 pJ * 16/32 (Horowitz's 32-bit add scaled to 16 bits)
    assert hw["stochastic"]["energy_pj"] == pytest.approx((8 * 4 + 2) * 0.05)
    assert hw["float32"]["energy_pj"] == pytest.approx(2 * (3.7 + 0.9))  # two float32 multiply-adds
    assert hw["fixed16"]["energy_pj"] == pytest.approx(2 * (0.2 * 4 + 0.1))  # 16-bit multiply ∝ bits², int32 add
    # gates: 5 comparators (16 full adders each), 3 LFSRs (16 flip-flops, 3 XOR), 2 counters (16 FF + 16 FA)
    assert hw["stochastic"]["gates"] == pytest.approx(5 * 16 * 7 + 3 * (16 * 6 + 3 * 3) + 2 * 16 * (6 + 7))
    assert hw["stochastic"]["cycles"] == 4 and hw["float32"]["cycles"] == 1


def _trainer(tiny_data, methods, **kw):
    haet.seed_everything(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    return haet.Trainer(model, tiny_data, tiny_data, methods=methods, progress=False, **kw)


def test_the_method_replaces_the_optimizer_and_records_its_energy(tiny_data, tmp_path):
    trainer = _trainer(tiny_data, [StochasticMomentumSGD(lr=0.05, stream_bits=4)])
    record = trainer.fit(epochs=2)
    assert isinstance(trainer.state.optimizer, SCMomentumSGD)
    n_params = sum(p.numel() for p in trainer.state.model.parameters())
    m = record.method_metrics
    assert m["sc_sgd/updates"] == record.steps * n_params
    assert m["sc_sgd/energy_per_update_pj"] == pytest.approx(1.7) and m["sc_sgd/energy_source"] == "model"
    assert m["sc_sgd/updater_energy_j"] == pytest.approx(record.steps * n_params * 1.7e-12)
    assert record.cost["memory_bytes"]["optimizer"] == 4 * n_params  # one moving average per weight

    def run(out, epochs, resume=False):  # the bit streams' random state is part of the checkpoint
        t = _trainer(tiny_data, [StochasticMomentumSGD()], out_dir=out, checkpoint=True)
        t.fit(epochs=epochs, resume_from=out if resume else None)
        return t.state.model.state_dict()

    straight = run(tmp_path / "a", 3)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 3, resume=True)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_bad_parameters_and_conflicts_are_refused(tiny_data, capsys):
    with pytest.raises(haet.ConfigError, match="stream_bits must be one of 1, 2, 4"):
        SCSGDConfig(stream_bits=3)
    with pytest.raises(haet.ConfigError, match=r"momentum must be a number in \[0, 1\)"):
        SCSGDConfig(momentum=1.0)
    assert cli_main(["train", "--task", "digits", "--method", "sc_sgd:encoding=analog", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "encoding" in err and "lowdiscrepancy" in err
    assert parse_entry("sc_sgd:stream_bits=16,scale=tensor")[0].config == SCSGDConfig(stream_bits=16, scale="tensor")
    with pytest.raises(haet.ConfigError, match="both own 'optimizer_step'"):
        _trainer(tiny_data, [StochasticMomentumSGD(), OptimizerFusion()])
