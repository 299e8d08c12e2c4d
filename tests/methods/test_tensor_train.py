"""tensor_train: TT-SVD exactness, FLOPs = the analytic contraction count, memory ratio = a hand
count, straight-through fake quantization, TT-rounding, and the method inside the Trainer."""

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
from haet.methods.tensor_train import TensorTrain, apply_tensor_train, prune_tt_ranks, tt_memory, tt_rank_penalty


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


def test_memory_ratio_matches_a_hand_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    names = apply_tensor_train(model, ranks=2, cores=2, optimizer=opt, min_params=1000)
    assert names == ["0"]  # 32×4 = 128 weights < min_params: the classifier stays dense anyway
    assert [tuple(c.shape) for c in model[0].cores] == [(1, 8, 8, 2), (2, 8, 4, 1)]
    model(torch.randn(5, 64)).sum().backward()
    opt.step()
    m = tt_memory(model, opt)
    tt_numel = 8 * 8 * 2 + 2 * 8 * 4 + 32             # cores + bias = 224
    dense_numel = 64 * 32 + 32                        # 2080
    step_bytes = 4                                    # Adam's float32 "step" per parameter tensor
    assert m["param_bytes"] == m["grad_bytes"] == 4 * tt_numel == 896
    assert m["optimizer_bytes"] == 2 * 4 * tt_numel + 3 * step_bytes == 1804
    assert m["dense_param_bytes"] == m["dense_grad_bytes"] == 4 * dense_numel
    assert m["dense_optimizer_bytes"] == 2 * 4 * dense_numel + 2 * step_bytes
    hand = (4 * dense_numel * 4 + 2 * step_bytes) / (4 * tt_numel * 4 + 3 * step_bytes)
    assert m["memory_ratio"] == pytest.approx(hand, rel=1e-12) and m["memory_ratio"] == pytest.approx(9.2569, abs=1e-4)


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
    changed = prune_tt_ranks(nn.Sequential(tt), threshold=0.01, optimizer=opt)
    assert changed == {"0": (4,)} and tt.ranks == (4,)
    error = (tt.to_dense().detach() - before).norm()
    assert error == pytest.approx(math.hypot(1e-3, 5e-4), rel=1e-3)      # the dropped singular values
    assert all(any(p is c for p in opt.param_groups[0]["params"]) for c in tt.cores)
    assert all(c not in opt.state for c in tt.cores)                       # a new basis: fresh state
    assert prune_tt_ranks(nn.Sequential(tt), threshold=0.01, optimizer=opt) == {}


def test_penalty_is_the_sum_of_squared_core_norms():
    tt = TensorTrainLinear((2, 3), (2, 2), 2)
    assert tt_rank_penalty(nn.Sequential(tt)).item() == pytest.approx(sum((c ** 2).sum().item() for c in tt.cores))


def test_classifier_rule_and_eligibility():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 10))
    assert apply_tensor_train(model, 4) == ["1", "3"]                   # auto: the classifier stays dense
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    assert apply_tensor_train(cnn, 4) == ["2"]                          # the only candidate: converted
    with pytest.warns(UserWarning, match="nothing was changed"):
        assert apply_tensor_train(nn.Sequential(nn.Linear(8, 8)), 4) == []


def test_method_records_memory_and_ranks_and_resumes(tmp_path, tiny_data):
    def run(epochs, out, resume=False):
        haet.seed_everything(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 4))
        method = TensorTrain(rank=6, cores=2, min_params=1, classifier="tt", prune_threshold=0.9)
        trainer = haet.Trainer(model, tiny_data, tiny_data, methods=[method], progress=False, out_dir=out,
                               checkpoint=True)
        return trainer.fit(epochs, resume_from=out if resume else None), model

    record, model = run(2, tmp_path / "a")
    ranks = [h["tt/ranks/1"] for h in record.history]
    assert ranks[0][0] < 6 and ranks[1][0] <= ranks[0][0]               # threshold 0.9 prunes at each epoch end
    assert isinstance(model[1], TensorTrainLinear) and isinstance(model[3], TensorTrainLinear)
    numel = sum(p.numel() for p in model.parameters())
    dense = 64 * 48 + 48 + 48 * 4 + 4
    assert record.method_metrics["tt/param_bytes"] == 4 * numel
    assert record.method_metrics["tt/dense_param_bytes"] == 4 * dense
    assert record.history[-1]["tt/memory_ratio"] == record.method_metrics["tt/memory_ratio"]
    run(1, tmp_path / "b")
    resumed, resumed_model = run(2, tmp_path / "b", resume=True)
    for (k, a), b in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), k


def test_bad_parameters_name_the_parameter():
    with pytest.raises(ConfigError, match="bits must be one of"):
        parse_entry("tensor_train:bits=5")
    with pytest.raises(ConfigError, match="rank must be an integer"):
        TensorTrain(rank=0)
