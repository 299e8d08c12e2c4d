"""Memory-bounded sparse training: the whole footprint (state + saved for backward + workspace),
counted independently at every step, stays under the bound; no dense weight is saved for backward;
micro-batches give the batch's gradient; degenerate bounds are refused; the layer-state counts
equal hand counts; sparse layers compute what the masked dense layer computes; block/channel
layers skip the pruned work; a resumed run ends identical."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import haet
from haet.core.errors import ConfigError
from haet.meters.memory import SavedTensorPeak, optimizer_state_bytes, tensor_bytes
from haet.methods import parse_entry, parse_method
from haet.methods._sparse_ops import BlockSparse, UnstructuredSparse, layer_shape, optimizer_state_cost, plan_changes
from haet.methods.mbst import (MIB, MBSTConfig, MemoryBoundedSparse, apply_mbst, bound_for_sparsity, footprint_bytes,
                               plan_sparsity, sparsify_)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 20), nn.ReLU(), nn.Linear(20, 4))


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 64, 4))


def _one_step(model, opt, x, y):
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


def test_optimizer_state_cost_per_element_and_per_tensor():
    p = [nn.Parameter(torch.zeros(3))]
    assert optimizer_state_cost(torch.optim.Adam(p), torch.float32) == (8, 4)        # two moments + step
    assert optimizer_state_cost(torch.optim.AdamW(p, amsgrad=True), torch.float32) == (12, 4)
    assert optimizer_state_cost(torch.optim.SGD(p, lr=0.1, momentum=0.9), torch.float32) == (4, 0)
    assert optimizer_state_cost(torch.optim.SGD(p, lr=0.1), torch.float32) == (0, 0)


def test_footprint_equals_hand_count_unstructured_adam():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters())
    first = layer_shape("1", model[1], "unstructured", (1, 1))
    second = layer_shape("3", model[3], "unstructured", (1, 1))
    plan = [{"name": "1", "shape": first, "kept": 150}, {"name": "3", "shape": second, "kept": 80}]
    modules = sparsify_(model, plan, optimizer=opt)
    assert isinstance(modules[0], UnstructuredSparse) and modules[1] is model[3]   # 80 of 80 stays dense
    _one_step(model, opt, torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0]))
    # layer 1: 150 values + 150 grads (4 B) + Adam's two moments (8 B) + its step (4 B) + 150 int32 indices,
    #          dense bias of 20: value, grad, two moments + step
    # layer 3: dense 80 weights and 4 biases: value, grad, two moments, and a step per tensor
    hand = (150 * (4 + 4 + 8) + 4 + 150 * 4 + 20 * 16 + 4) + (80 * 16 + 4 + 4 * 16 + 4)
    assert footprint_bytes(modules, opt) == hand
    state = sum(t.numel() * t.element_size() for m in modules for p in m.parameters(recurse=False)
                for t in opt.state[p].values())
    assert state == optimizer_state_bytes(opt)   # the same count as haet's memory meter


def test_footprint_equals_hand_count_block_sgd_momentum():
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    shape = layer_shape("2", model[2], "block", (4, 2))          # 8x8 channels: 2 row groups x 4 block columns
    assert (shape.rows, shape.units, shape.unit_numel) == (2, 4, 4 * 2 * 9)
    modules = sparsify_(model, [{"name": "2", "shape": shape, "kept": 1}], optimizer=opt)
    _one_step(model, opt, torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))
    # 2 groups x 1 block x 72 weights: value, grad, momentum (4 B each); 2 int32 block columns; bias 8 x 12 B
    assert footprint_bytes(modules, opt) == 144 * 12 + 2 * 4 + 8 * 12
    assert model[2].values.shape == (8, 2, 3, 3)


def test_plan_predicts_the_measured_footprint_and_fits_the_bound():
    model = _cnn()
    opt = torch.optim.Adam(model.parameters())
    plan = plan_sparsity(model, 0.02, "unstructured", optimizer=opt, drop_fraction=0.0)
    assert sum(p["bytes"] for p in plan) <= 0.02 * MIB
    modules = sparsify_(model, plan, optimizer=opt)
    _one_step(model, opt, torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))
    assert footprint_bytes(modules, opt) == sum(p["bytes"] for p in plan)


@pytest.mark.parametrize("scheme", ["unstructured", "block", "channel"])
def test_a_bound_too_small_fails_with_the_smallest_that_works(scheme):
    model = _cnn()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ConfigError, match=r"smallest bound that works is memory_mb=[0-9.]+ \((\d+) bytes") as err:
        plan_sparsity(model, 1e-5, scheme, optimizer=opt)
    smallest = int(err.value.args[0].split("(")[-1].split(" ")[0])
    plan = plan_sparsity(model, smallest / MIB, scheme, optimizer=opt)        # that many bytes work ...
    assert sum(p["bytes"] for p in plan) == smallest
    assert all(p["kept"] == p["shape"].min_kept or p["kept"] == p["shape"].units for p in plan)
    with pytest.raises(ConfigError):                                          # ... one byte less does not
        plan_sparsity(model, (smallest - 1) / MIB, scheme, optimizer=opt)


class _Count(haet.Method):
    """An independent count of every step's footprint, with the memory meter's hooks: parameters,
    buffers, gradients, optimizer state, and the live peak of what autograd saved for backward."""
    name = "count"

    def __init__(self):
        super().__init__()
        self.totals = []

    def batch_start(self, state):
        model = state.unwrapped_model
        self.window = SavedTensorPeak(exclude=[*model.parameters(), *model.buffers()]).__enter__()

    def after_backward(self, state):
        self.window.__exit__(None, None, None)
        model = state.unwrapped_model
        self.grads = tensor_bytes(p.grad for p in model.parameters())
        self.fixed = tensor_bytes([*model.parameters(), *model.buffers()])
        self.before = optimizer_state_bytes(state.optimizer)

    def after_step(self, state):
        state_bytes = self.fixed + self.grads + max(self.before, optimizer_state_bytes(state.optimizer))
        self.totals.append(state_bytes + self.window.peak)


@pytest.mark.parametrize("scheme,memory_fraction,weight_share", [
    ("unstructured", 0.3, 0.5),     # dense weights, micro-batches of 15
    ("unstructured", 0.1, 0.5),     # sparse, micro-batches of 1
    ("block", 0.4, 0.05), ("channel", 0.4, 0.05)])
def test_whole_footprint_held_at_every_step_by_an_independent_count(scheme, memory_fraction, weight_share,
                                                                    trainer_factory):
    count = _Count()
    method = MemoryBoundedSparse(memory_fraction=memory_fraction, weight_share=weight_share, scheme=scheme,
                                 update_every=1, update_end=1.0, block=(4, 2))
    record = trainer_factory(_cnn(), methods=[method, count], budget=haet.Budget(steps=3)).fit(epochs=1)
    m = record.method_metrics
    bound = m["mbst/bound_bytes"]
    assert len(count.totals) == record.steps and max(count.totals) <= bound - m["mbst/workspace_bytes"]
    assert m["mbst/footprint_bytes"] >= max(count.totals)          # mbst's own record covers the count
    assert 1 <= m["mbst/micro_batch"] < 64                           # dense training would not fit
    mem = record.cost["memory_bytes"]                                # the memory meter agrees
    assert mem["params"] + mem["grads"] + mem["optimizer"] + mem["activations"] <= bound
    if weight_share < 0.5 or memory_fraction < 0.2:
        assert m["mbst/sparsity"] > 0.2 and m["mbst/updates"] >= 2 and m["mbst/regrown_units"] > 0


def test_sparse_layer_saves_no_dense_weight_for_backward():
    torch.manual_seed(0)
    for dense, x in ((nn.Linear(256, 256), torch.randn(2, 256)), (nn.Conv2d(32, 32, 3, padding=1),
                                                                     torch.randn(2, 32, 4, 4))):
        layer = UnstructuredSparse(dense, layer_shape("l", dense, "unstructured", (1, 1)),
                                   dense.weight.numel() // 10)                      # 90% sparse
        with SavedTensorPeak() as saved:                                 # nothing excluded: values, index count
            out = layer(x.requires_grad_())
        dense_bytes = dense.weight.numel() * 4
        assert saved.peak < dense_bytes / 2
        out.sum().backward()                                             # and backward still works
        assert layer.values.grad.shape == layer.values.shape and x.grad.shape == x.shape


def test_micro_batches_give_the_whole_batch_gradient():
    model = _cnn()
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 4, (32,))
    run = apply_mbst(model, MBSTConfig(memory_fraction=0.2), batch=(x, y))
    assert run.micro_batch < 32 and run.plan.total <= run.plan.bound
    reference = __import__("copy").deepcopy(model)
    F.cross_entropy(reference(x), y).backward()
    outputs, loss = run.step(x, y)
    torch.testing.assert_close(loss, F.cross_entropy(reference(x), y).detach(), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    w = torch.rand(32)                                                    # weighted batches too
    model.zero_grad()
    reference.zero_grad()
    run.step(x, y, w)
    ((F.cross_entropy(reference(x), y, reduction="none") * w).sum() / w.sum()).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_degenerate_bounds_are_refused(trainer_factory):
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 4, (64,))
    with pytest.raises(ConfigError, match="at least the dense training footprint"):
        apply_mbst(_cnn(), MBSTConfig(memory_mb=100.0), batch=(x, y))
    with pytest.raises(ConfigError, match="at least the dense training footprint"):
        trainer_factory(_cnn(), methods=parse_entry("mbst:memory_mb=100")).fit(epochs=1)
    with pytest.raises(ConfigError, match=r"memory_fraction must be a number in \(0, 1\)"):
        parse_method("mbst:memory_fraction=1")
    with pytest.raises(ConfigError, match=r"smallest bound that works is memory_mb=[0-9.]+ \((\d+) bytes") as err:
        apply_mbst(_cnn(), MBSTConfig(memory_mb=0.001), batch=(x, y))
    smallest = int(err.value.args[0].split("(")[-1].split(" ")[0])
    run = apply_mbst(_cnn(), MBSTConfig(memory_mb=smallest / MIB + 1e-6), batch=(x, y))   # that bound works
    assert run.micro_batch == 1 and run.plan.total <= run.plan.bound


def test_prune_and_regrow_keeps_the_count_and_resets_new_units():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters())
    shape = layer_shape("1", model[1], "unstructured", (1, 1))
    second = layer_shape("3", model[3], "unstructured", (1, 1))
    (layer, _) = sparsify_(model, [{"name": "1", "shape": shape, "kept": 100},
                                   {"name": "3", "shape": second, "kept": 80}], optimizer=opt)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))
    _one_step(model, opt, x, y)
    opt.zero_grad()
    before = set(layer.index.tolist())
    weakest = set(layer.index[layer.values.detach().abs().argsort()[:10]].tolist())
    layer.changes = 10
    F.cross_entropy(model(x), y).backward()                      # the dense kernel's gradient plans the change
    dense_grad = layer.pending is not None
    slots, units = layer.pending
    layer.apply_pending(opt)
    after = set(layer.index.tolist())
    assert dense_grad and len(after) == 100 and len(before - after) == 10
    assert before - after == weakest                              # the 10 smallest magnitudes left
    assert not (set(units.tolist()) & before)                      # regrown where nothing was
    s = slots.long()
    assert torch.all(layer.values[s] == 0) and torch.all(layer.values.grad[s] == 0)
    assert torch.all(opt.state[layer.values]["exp_avg"][s] == 0)
    assert torch.all(opt.state[layer.values]["exp_avg_sq"][s] == 0)


def test_plan_changes_respects_row_groups():
    magnitudes = torch.tensor([[5.0, 0.1], [0.2, 4.0]])              # 2 groups, 2 kept each, of 4 units
    scores = torch.tensor([[9.0, 0.0, 1.0, 3.0], [0.0, 8.0, 7.0, 6.0]])
    kept = torch.tensor([[0, 1], [2, 3]])                            # units held by the slots
    slots, units = plan_changes(magnitudes, scores, kept, 2)
    # the two weakest slots are (0, 1) -> flat 1 and (1, 0) -> flat 2; each regrows in its own group
    # the best inactive unit: group 0 has units 2, 3 free (scores 1, 3); group 1 has units 0, 1 (0, 8)
    assert slots.tolist() == [1, 2] and units.tolist() == [3, 1]


@pytest.mark.parametrize("scheme,block", [("block", (4, 2)), ("channel", (1, 1)), ("unstructured", (1, 1))])
def test_sparse_layers_equal_the_masked_dense_layer(scheme, block):
    torch.manual_seed(0)
    for dense, x in ((nn.Conv2d(8, 8, 3, padding=1), torch.randn(3, 8, 6, 6)), (nn.Linear(12, 6), torch.randn(3, 12))):
        shape = layer_shape("l", dense, scheme, block)
        cls = UnstructuredSparse if scheme == "unstructured" else BlockSparse
        sparse = cls(dense, shape, max(1, shape.units // 2))
        w = sparse.dense_weight().detach()
        mask = w != 0
        assert torch.equal(w[mask], dense.weight.detach()[mask])     # kept weights are the originals
        reference = (dense.weight * mask).detach().requires_grad_()
        ref_out = F.conv2d(x, reference, dense.bias, padding=1) if x.dim() == 4 else F.linear(x, reference, dense.bias)
        out = sparse(x)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        out.square().sum().backward()
        (ref_grad,) = torch.autograd.grad(ref_out.square().sum(), reference)
        torch.testing.assert_close(_scatter_grad(sparse), ref_grad * mask, atol=1e-4, rtol=1e-4)


def _scatter_grad(sparse):
    """The kept weights' gradients placed in the dense kernel's layout."""
    saved = sparse.values.data.clone()
    sparse.values.data.copy_(sparse.values.grad)
    out = sparse.dense_weight().detach()
    sparse.values.data.copy_(saved)
    return out


@pytest.mark.parametrize("scheme,block,kept", [("block", (4, 2), 1), ("channel", (1, 1), 2)])
def test_block_and_channel_layers_skip_the_pruned_work(scheme, block, kept):
    dense = nn.Conv2d(8, 16, 3, padding=1)
    shape = layer_shape("l", dense, scheme, block)
    sparse = BlockSparse(dense, shape, kept)
    x = torch.randn(2, 8, 10, 10)
    with FlopCounterMode(display=False) as counter:
        sparse(x)
    kept_inputs = kept * shape.bi                       # input channels each output channel reads
    assert counter.get_total_flops() == 2 * 2 * 16 * 100 * kept_inputs * 9
    with FlopCounterMode(display=False) as counter:
        dense(x)
    assert counter.get_total_flops() == 2 * 2 * 16 * 100 * 8 * 9


def test_unstructured_reports_an_estimate_of_sparse_hardware_savings(trainer_factory):
    model = _cnn()
    method = MemoryBoundedSparse(memory_fraction=0.5, weight_share=0.05, update_every=1000)
    record = trainer_factory(model, methods=[method]).fit(epochs=1)
    saved = 0.0
    for name in ("0", "2", "5"):
        layer = model.get_submodule(name)
        if isinstance(layer, UnstructuredSparse):            # 6 FLOPs per skipped weight, position and sample
            saved += 6 * 256 * layer.positions * (layer.shape.numel - layer.values.numel())
    assert saved > 0 and record.method_metrics["mbst/sparse_hw_flops_saved_estimate"] == pytest.approx(saved)


def test_bad_parameters_name_the_parameter_and_range():
    with pytest.raises(ConfigError, match=r"memory_mb must be a number in \(0, inf\]"):
        parse_method("mbst:memory_mb=0")
    with pytest.raises(ConfigError, match="scheme must be one of"):
        parse_method("mbst:scheme=dense")
    with pytest.raises(ConfigError, match=r"drop_fraction must be a number in \[0, 1\)"):
        parse_method("mbst:drop_fraction=1")
    assert parse_method("mbst:scheme=block,block=4/4").config.block == (4, 4)


def test_density_compensated_learning_rate():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    run = apply_mbst(model, MBSTConfig(memory_fraction=0.2), optimizer=opt,
                     batch=(torch.randn(64, 1, 8, 8), torch.randint(0, 4, (64,))))
    assert run.sparse_layers()
    for m in run.sparse_layers():
        (group,) = [g for g in opt.param_groups if any(p is m.values for p in g["params"])]
        assert group["lr"] == pytest.approx(1e-3 * m.shape.numel / m.values.numel())
    assert opt.param_groups[0]["lr"] == 1e-3
    assert math.isfinite(sum(p["bytes"] for p in run.plan.layers))


@pytest.mark.parametrize("scheme", ["unstructured", "block"])
def test_resumed_run_ends_with_the_same_weights(scheme, trainer_factory, tmp_path):
    def method():
        return MemoryBoundedSparse(memory_fraction=0.5, weight_share=0.05, scheme=scheme, update_every=3, block=(4, 2))

    whole = _cnn()
    trainer_factory(whole, methods=[method()]).fit(epochs=2)
    first = _cnn()
    trainer_factory(first, methods=[method()], out_dir=tmp_path, checkpoint=True,
                    budget=haet.Budget(steps=4)).fit(epochs=2)      # stops after epoch 1 of 2
    resumed = _cnn()
    record = trainer_factory(resumed, methods=[method()], out_dir=tmp_path, checkpoint=True).fit(
        epochs=2, resume_from=tmp_path)
    assert record.method_metrics["mbst/updates"] == 1     # step 3 of 8 (at step 6 the cosine reaches 0)
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_refuses_an_optimizer_that_steps_inside_backward(trainer_factory):
    with pytest.raises(ConfigError, match="mode=backward would update the weights after each micro-batch"):
        trainer_factory(methods=parse_entry("mbst:lr_compensation=false+fusion:mode=backward"))
