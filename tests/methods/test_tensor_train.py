"""tensor_train: TT-SVD exactness, FLOPs = the analytic contraction count, memory ratios = a hand
count, straight-through fake quantization, TT-rounding, the per-slice rank prior (λ's closed form,
the proximal shrink, slice pruning with the optimizer in step), ranks that shrink on the MLP, and
refusal of settings that would change nothing."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import haet
from haet.core.errors import ConfigError
from haet.layers import TensorTrainLinear, fake_quantize, full_ranks, tt_modes
from haet.methods import parse_entry
from haet.data import get_task
from haet.methods._param_state import swap_parameters
from haet.methods.tensor_train import (TensorTrain, TensorTrainConfig, apply_tensor_train, prune_rank_slices,
                                       shrink_rank_slices_, tt_memory, update_rank_scales_)
from haet.models import build_model


def test_modes_factor_the_features():
    assert tt_modes(784, 3) == (14, 7, 8) and math.prod(tt_modes(784, 3)) == 784
    assert tt_modes(512, 3) == (8, 8, 8)
    assert tt_modes(10, 3) == (5, 1, 2)
    assert full_ranks((4, 6), (3, 5)) == (12,)


def test_full_rank_tt_svd_reproduces_the_dense_layer():
    torch.manual_seed(0)
    dense = nn.Linear(48, 30)
    in_modes, out_modes = tt_modes(48, 3), tt_modes(30, 3)
    tt = TensorTrainLinear.from_linear(dense, in_modes, out_modes, full_ranks(in_modes, out_modes))
    assert (tt.to_dense() - dense.weight.t()).abs().max() < 1e-5
    x = torch.randn(7, 48)
    assert (tt(x) - dense(x)).abs().max() < 1e-5
    # an independent reference for the contraction order: tensorly's own TT-matrix reconstruction
    import tensorly as tl
    from tensorly.tt_matrix import tt_matrix_to_tensor
    with tl.backend_context("pytorch"):
        ref = tt_matrix_to_tensor([c.detach().double() for c in tt.cores]).reshape(48, 30)
    assert (tt.to_dense().double() - ref).abs().max() < 1e-6


@pytest.mark.parametrize("input_requires_grad", [False, True])
def test_flops_equal_the_analytic_contraction_count(input_requires_grad):
    torch.manual_seed(0)
    tt = TensorTrainLinear((4, 6, 5), (3, 2, 4), (3, 5), bits=8)
    x = torch.randn(9, 120, requires_grad=input_requires_grad)
    forward, backward = tt.flops(9, input_requires_grad)
    with FlopCounterMode(display=False) as fwd:
        out = tt(x)
    with FlopCounterMode(display=False) as bwd:
        out.square().sum().backward()
    # hand count: Σ_k 2·B·(n_1..n_{k-1})·(m_{k+1}..m_d)·r_{k-1} m_k n_k r_k
    per_core = [2 * 9 * 1 * 30 * 1 * 4 * 3 * 3, 2 * 9 * 3 * 5 * 3 * 6 * 2 * 5, 2 * 9 * 6 * 1 * 5 * 5 * 4 * 1]
    assert forward == sum(per_core) == fwd.get_total_flops()
    assert backward == 2 * sum(per_core) - (0 if input_requires_grad else per_core[0]) == bwd.get_total_flops()


def test_memory_ratios_match_a_hand_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    names = apply_tensor_train(model, TensorTrainConfig(rank=2, cores=2, min_params=1000), optimizer=opt)
    assert names == ["0"]  # 32×4 = 128 weights < min_params: the classifier stays dense anyway
    assert [tuple(c.shape) for c in model[0].cores] == [(1, 8, 8, 2), (2, 8, 4, 1)]
    model(torch.randn(5, 64)).sum().backward()
    opt.step()
    m = tt_memory(model, opt, bits=8)
    tt_numel = 8 * 8 * 2 + 2 * 8 * 4 + 32             # cores + bias = 224
    dense_numel = 64 * 32 + 32                        # 2080
    step_bytes = 4                                    # Adam's float32 "step" per parameter tensor
    assert m["param_bytes"] == 4 * tt_numel + 4 * 2   # and the edge's two slice variances (a buffer)
    assert m["grad_bytes"] == 4 * tt_numel == 896
    assert m["optimizer_bytes"] == 2 * 4 * tt_numel + 3 * step_bytes == 1804
    assert m["dense_param_bytes"] == m["dense_grad_bytes"] == 4 * dense_numel
    assert m["dense_optimizer_bytes"] == 2 * 4 * dense_numel + 2 * step_bytes
    layers_tt, layers_dense = 4 * tt_numel * 4 + 8 + 3 * step_bytes, 4 * dense_numel * 4 + 2 * step_bytes
    classifier = 4 * 132 * 4 + 2 * step_bytes         # 32×4 + 4, counted alike on both sides
    assert m["memory_ratio_layers"] == pytest.approx(layers_dense / layers_tt, rel=1e-12)
    assert m["memory_ratio_model"] == pytest.approx((layers_dense + classifier) / (layers_tt + classifier), rel=1e-12)
    assert m["model_bytes"] == layers_tt + classifier and m["dense_model_bytes"] == layers_dense + classifier
    assert m["quantized_param_bytes"] == 192 + 4 * 2 + 4 * 32   # cores at 8 bits, a scale per core, float bias


def test_fake_quantized_cores_use_the_grid_and_pass_gradients_straight_through():
    torch.manual_seed(0)
    tt = TensorTrainLinear((4, 5), (3, 4), 3, bits=4)
    for core in tt.cores:
        q = fake_quantize(core, 4)
        scale = core.abs().max() / 7
        assert torch.allclose(q / scale, torch.round(q / scale), atol=1e-5)   # on the 4-bit grid
        assert len(torch.unique(torch.round(q / scale))) <= 15
        assert (q - core).abs().max() <= scale / 2 + 1e-7
    x = torch.randn(6, 20)
    tt(x).square().sum().backward()
    # straight through: the float cores get the gradient a layer holding the quantized values gets
    ref = TensorTrainLinear((4, 5), (3, 4), 3)
    with torch.no_grad():
        for c_ref, c in zip(ref.cores, tt.cores):
            c_ref.copy_(fake_quantize(c, 4))
        ref.bias.copy_(tt.bias)
    out = ref(x)
    out.square().sum().backward()
    assert torch.allclose(out, x @ ref.to_dense() + ref.bias, atol=1e-5)
    for c_ref, c in zip(ref.cores, tt.cores):
        assert torch.allclose(c.grad, c_ref.grad, atol=1e-5)


def test_rounding_drops_exactly_the_small_directions():
    torch.manual_seed(0)
    tt = TensorTrainLinear((4, 6), (3, 5), 6)
    opt = torch.optim.Adam(tt.parameters())
    tt(torch.randn(3, 24)).sum().backward()
    opt.step()
    with torch.no_grad():  # give the single edge a known spectrum: 4 large directions, 2 tiny ones
        left = torch.linalg.qr(torch.randn(12, 6))[0] * torch.tensor([4.0, 3, 2, 1, 1e-3, 5e-4])
        tt.cores[0].copy_(left.reshape(1, 4, 3, 6))
        tt.cores[1].copy_(torch.linalg.qr(torch.randn(30, 6))[0].t().reshape(6, 6, 5, 1))
    before = tt.to_dense().detach()
    spectrum = tt.edge_spectra()[0]
    assert torch.allclose(spectrum, torch.tensor([4.0, 3, 2, 1, 1e-3, 5e-4]), rtol=1e-4)
    swap_parameters(opt, tt.round_ranks(0.01), None)
    assert tt.ranks == (4,)
    error = (tt.to_dense().detach() - before).norm()
    assert error == pytest.approx(math.hypot(1e-3, 5e-4), rel=1e-3)      # the dropped singular values
    assert all(any(p is c for p in opt.param_groups[0]["params"]) for c in tt.cores)
    assert all(c not in opt.state for c in tt.cores)                       # a new basis: fresh state
    assert tt.round_ranks(0.01) == []


def test_slice_variances_maximize_the_posterior_given_the_cores():
    torch.manual_seed(0)
    tt = TensorTrainLinear((2, 3, 2), (2, 2, 3), (3, 4))
    update_rank_scales_(nn.Sequential(tt), prior_scale=0.5)
    lam0, lam1 = tt.rank_scales()
    # edge 1, slice j: s_j = Σ_a G_1[a,·,·,j]² / λ_0a + Σ ‖G_2[j]‖², n_j = 3·3·2 + 2·3·1 entries
    g1, g2 = tt.cores[1].detach().double(), tt.cores[2].detach().double()
    s = (g1 ** 2 / lam0.double()[:, None, None, None]).sum((0, 1, 2)) + (g2 ** 2).sum((1, 2, 3))
    n = 3 * 3 * 2 + 2 * 3

    def neg_log_posterior(lam):   # −log N(G | 0, λ) − log half-Cauchy(√λ | 0, η) in λ
        return s / (2 * lam) + n / 2 * torch.log(lam) + torch.log(1 + lam / 0.25)

    best = neg_log_posterior(lam1.double())
    for factor in (0.9, 0.99, 1.01, 1.1):
        assert (neg_log_posterior(lam1.double() * factor) > best).all()


def test_the_prior_step_spares_the_strongest_slice_and_zeroes_weak_ones():
    tt = TensorTrainLinear((4, 6), (3, 5), 3)
    with torch.no_grad():
        tt.cores[0].zero_()
        tt.cores[1].zero_()
        for j, scale in enumerate([1.0, 0.5, 0.02]):   # slice j: G_0[..., j] and G_1[j] of norm `scale` each
            tt.cores[0][0, j, 0, j] = scale
            tt.cores[1][j, j, 0, 0] = scale
    model = nn.Sequential(tt)
    update_rank_scales_(model)
    lam = tt.rank_scales()[0]
    weight = (lam.max() / lam).sqrt()
    norms = torch.tensor([1.0, 0.5, 0.02]) * math.sqrt(2)
    t = 0.01
    shrink_rank_slices_(model, t)
    after = (tt.cores[0].square().sum((0, 1, 2)) + tt.cores[1].square().sum((1, 2, 3))).sqrt().detach()
    assert float(after[0]) == pytest.approx(float(norms[0]))                                   # w = 1: not shrunk
    assert float(after[1]) == pytest.approx(float(norms[1] - t * norms[0] * (weight[1] - 1)), rel=1e-5)
    assert float(after[2]) == 0.0                                                       # pushed past zero: exactly zero


def test_pruning_removes_collapsed_slices_and_keeps_the_optimizer_state_of_the_rest():
    torch.manual_seed(0)
    tt = TensorTrainLinear((4, 6), (3, 5), 5)
    opt = torch.optim.Adam(tt.parameters(), lr=1e-3)
    tt(torch.randn(3, 24)).square().sum().backward()
    opt.step()
    with torch.no_grad():   # slices 1 and 3 carry (almost) nothing
        tt.cores[0][..., [1, 3]] *= 1e-4
        tt.cores[1][[1, 3]] *= 1e-4
    model = nn.Sequential(tt)
    update_rank_scales_(model)
    before_w, before_state = tt.to_dense().detach(), [dict(opt.state[c]) for c in tt.cores]
    kept = torch.tensor([0, 2, 4])
    reference = tt.cores[0].detach()[..., kept].reshape(12, 3) @ tt.cores[1].detach()[kept].reshape(3, 30)
    assert prune_rank_slices(model, threshold=1e-2, optimizer=opt) == {"0": (3,)}
    assert tt.ranks == (3,) and tt.rank_scales()[0].shape == (3,)
    w = tt.to_dense().detach()
    assert torch.allclose(w, reference.reshape(4, 3, 6, 5).permute(0, 2, 1, 3).reshape(24, 15), atol=1e-6)
    assert (w - before_w).abs().max() < 1e-6 * before_w.abs().max() * 100   # the removed terms were ~0
    assert all(any(p is c for p in opt.param_groups[0]["params"]) for c in tt.cores)
    assert torch.equal(opt.state[tt.cores[0]]["exp_avg"], before_state[0]["exp_avg"][..., kept])
    assert torch.equal(opt.state[tt.cores[1]]["exp_avg_sq"], before_state[1]["exp_avg_sq"][kept])


def test_classifier_rule_and_eligibility():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 10))
    assert apply_tensor_train(model, TensorTrainConfig(rank=4)) == ["1", "3"]   # auto: the classifier stays dense
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    assert apply_tensor_train(cnn, TensorTrainConfig(rank=4)) == ["2"]          # the only candidate: converted


def test_settings_that_would_change_nothing_are_refused(tiny_data):
    with pytest.raises(ConfigError, match="change nothing.*min_params=4096"):
        apply_tensor_train(nn.Sequential(nn.Linear(8, 8)))                     # no eligible layer
    with pytest.raises(ConfigError, match="change nothing.*at rank 64.*fewer weights"):
        apply_tensor_train(nn.Sequential(nn.Linear(64, 64)), TensorTrainConfig(rank=64, cores=2, min_params=1))
    trainer = haet.Trainer(nn.Sequential(nn.Flatten(), nn.Linear(64, 4)), tiny_data, tiny_data,
                           methods=[TensorTrain()], progress=False)
    with pytest.raises(ConfigError, match="tensor_train would change nothing"):
        trainer.fit(1)


def test_ranks_shrink_from_16_on_the_mlp_within_2_points_of_dense():
    train, test = get_task("digits").load(0, None)

    def run(methods):
        haet.seed_everything(0)
        model = build_model("mlp", (1, 8, 8), 10)
        return haet.Trainer(model, train, test, methods=methods, progress=False).fit(6)

    dense, tt = run([]), run([TensorTrain(rank=16)])
    ranks = tt.method_metrics["tensor_train/ranks"]
    assert set(ranks) == {"1", "3"} and all(r["initial"] == [16, 16] for r in ranks.values())
    assert sum(map(sum, (r["final"] for r in ranks.values()))) < 64                # the prior removed slices
    assert all(f <= i for r in ranks.values() for f, i in zip(r["final"], r["initial"]))
    assert [h["tensor_train/rank_total"] for h in tt.history][-1] < 64
    assert tt.metrics["accuracy"] >= dense.metrics["accuracy"] - 0.02
    m = tt.method_metrics
    assert m["tensor_train/memory_ratio_layers"] > m["tensor_train/memory_ratio_model"] > 1


def test_method_records_memory_and_ranks_and_resumes(tmp_path, tiny_data):
    def run(epochs, out, resume=False):
        haet.seed_everything(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 4))
        method = TensorTrain(rank=6, cores=2, min_params=1, classifier="tt", prior_weight=300)
        trainer = haet.Trainer(model, tiny_data, tiny_data, methods=[method], progress=False, out_dir=out,
                               checkpoint=True)
        return trainer.fit(epochs, resume_from=out if resume else None), model

    record, model = run(2, tmp_path / "a")
    ranks = [h["tensor_train/ranks/1"] for h in record.history]
    assert ranks[0][0] < 6 and ranks[1][0] <= ranks[0][0]               # a strong prior prunes at each epoch end
    assert record.method_metrics["tensor_train/ranks"]["1"] == {"initial": [6], "final": ranks[1]}
    assert isinstance(model[1], TensorTrainLinear) and isinstance(model[3], TensorTrainLinear)
    assert record.method_metrics["tensor_train/grad_bytes"] == 4 * sum(p.numel() for p in model.parameters())
    assert record.method_metrics["tensor_train/dense_param_bytes"] == 4 * (64 * 48 + 48 + 48 * 4 + 4)
    final = record.method_metrics["tensor_train/memory_ratio_layers"]
    assert record.history[-1]["tensor_train/memory_ratio_layers"] == final
    run(1, tmp_path / "b")
    resumed, resumed_model = run(2, tmp_path / "b", resume=True)
    for (k, a), b in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), k


def test_bad_parameters_name_the_parameter():
    with pytest.raises(ConfigError, match="bits must be one of"):
        parse_entry("tensor_train:bits=5")
    with pytest.raises(ConfigError, match="rank must be an integer"):
        TensorTrain(rank=0)
    with pytest.raises(ConfigError, match="prior_weight"):
        TensorTrain(prior_weight=-1)
