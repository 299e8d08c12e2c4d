"""GRAD-MATCH and the random subset: exact OMP, closed-form gradients, better matching than random,
weighted subsets in the Trainer, time budgets, parameter errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import haet
from haet.data import TensorData
from haet.methods import parse_method
from haet.methods import _gradmatch_ops as ops
from haet.methods.gradmatch import GradMatch, GradMatchConfig, RandomSubset, grad_match_select, held_out_split
from haet.models import build_model


def test_omp_recovers_a_sparse_nonnegative_combination_exactly():
    g = torch.Generator().manual_seed(0)
    d, n = 200, 300  # incoherent enough columns for OMP's exact-recovery regime
    Ks, cs, bbs, truths = [], [], [], []
    for k in (8, 5, 3):  # three independent pools solved in one batch, each with its own sparsity
        A = torch.randn(d, n, generator=g, dtype=torch.float64)
        support = torch.randperm(n, generator=g)[:k]
        weights = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
        b = A[:, support] @ weights
        Ks.append(A.T @ A), cs.append(A.T @ b), bbs.append(b @ b)
        truths.append(dict(zip(support.tolist(), weights.tolist())))
    sel, w, _ = ops.omp_gram(torch.stack(Ks), torch.stack(cs), torch.tensor([20, 20, 20]), lam=0.0,
                             bb=torch.stack(bbs), tol=1e-10)
    for p, truth in enumerate(truths):
        found = {int(i): float(x) for i, x in zip(sel[p], w[p]) if i >= 0}
        assert set(found) == set(truth)  # stops at the exact support, not at the budget of 20
        for i, x in truth.items():
            assert found[i] == pytest.approx(x, abs=1e-9)


def test_omp_weights_are_nonnegative_and_within_budget():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(2, 40, 120, generator=g, dtype=torch.float64)
    b = torch.randn(2, 40, generator=g, dtype=torch.float64)  # not a combination of few columns
    K, c = A.transpose(1, 2) @ A, (A.transpose(1, 2) @ b[..., None]).squeeze(-1)
    sel, w, _ = ops.omp_gram(K, c, torch.tensor([10, 4]), lam=0.1)
    assert ((sel >= 0).sum(1) <= torch.tensor([10, 4])).all()
    assert (w >= 0).all() and (w[sel < 0] == 0).all()


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(), nn.Linear(196, 10))


def test_closed_form_gram_equals_autograd_per_example_gradients(mnist5k):
    train, _ = mnist5k
    torch.manual_seed(0)
    model = small_cnn()
    x, y = train.x[:40], train.y[:40]
    H, G, _ = ops.last_layer_features(model, x, y)  # H = [h, 1]
    pools = ops.make_pools(y, len(x), 1024, torch.Generator().manual_seed(0))
    K = ops.pool_gram(*ops.gather_pools(H, G, pools))
    fc = model[-1]
    for p, pool in enumerate(pools):
        members = pool[pool >= 0]
        grads = []
        for i in members.tolist():  # one real backward per example: the reference
            loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
            gw, gb = torch.autograd.grad(loss, [fc.weight, fc.bias])
            grads.append(torch.cat([gw.flatten(), gb]))
        grads = torch.stack(grads)
        n = len(members)
        assert torch.allclose(K[p, :n, :n], grads @ grads.T, rtol=1e-4, atol=1e-6)
        assert (K[p, n:] == 0).all()


def last_layer_gradient(model, x, y, w):
    """Σ wᵢ ∇loss_i of the last layer's (weight, bias), by autograd."""
    fc = model[-1]
    loss = (F.cross_entropy(model(x), y, reduction="none") * w).sum()
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, [fc.weight, fc.bias])])


def test_selected_subset_matches_the_full_gradient_better_than_random_subsets(mnist5k):
    train, _ = mnist5k
    haet.seed_everything(0)
    model = build_model("mnist5k-cnn", (1, 28, 28), 10)
    data = TensorData(train.x[:1000], train.y[:1000])
    haet.Trainer(model, data, batch_size=64, progress=False).fit(epochs=1)  # a partly trained model
    full = last_layer_gradient(model, data.x, data.y, torch.ones(1000))
    info = {}
    idx, w = grad_match_select(model, data, 0.2, info=info, bfloat16=False)
    assert len(idx) <= 200 and len(set(idx.tolist())) == len(idx) and (w > 0).all()
    gm_error = float((last_layer_gradient(model, data.x[idx], data.y[idx], w) - full).norm() / full.norm())
    gen = torch.Generator().manual_seed(0)
    random_errors = []
    for _ in range(10):
        r = torch.randperm(1000, generator=gen)[:len(idx)]
        sub = last_layer_gradient(model, data.x[r], data.y[r], torch.full((len(r),), 1000 / len(r)))
        random_errors.append(float((sub - full).norm() / full.norm()))
    assert gm_error < 0.5 * min(random_errors), (gm_error, random_errors)
    # the reported error is the whole subset's against the whole gradient (not pool by pool)
    assert info["match_error"] == pytest.approx(gm_error, rel=1e-3, abs=1e-5)


def test_reported_match_error_is_against_the_full_held_out_gradient(mnist5k):
    train, _ = mnist5k
    haet.seed_everything(0)
    model = small_cnn()
    data, held = TensorData(train.x[:600], train.y[:600]), (train.x[600:800], train.y[600:800])
    info = {}
    idx, w = grad_match_select(model, data, 0.2, target_data=held, info=info, bfloat16=False)
    target = last_layer_gradient(model, *held, torch.full((200,), 600 / 200))  # scaled to 600 samples
    error = float((last_layer_gradient(model, data.x[idx], data.y[idx], w) - target).norm() / target.norm())
    assert info["match_error"] == pytest.approx(error, rel=1e-3, abs=1e-5)


def tiny_images(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return TensorData(x, (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long())


def tiny_model():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 4))


class BatchLog(haet.Method):
    name = ""

    def __init__(self):
        super().__init__()
        self.batches = []

    def batch_start(self, state):
        self.batches.append((state.epoch, *[t.clone() for t in state.batch]))


def test_training_uses_the_weighted_subset_and_warm_start():
    data, log = tiny_images(), BatchLog()
    method = GradMatch(fraction=0.25, select_every=1, warm_fraction=0.5)
    haet.seed_everything(0)
    record = haet.Trainer(tiny_model(), data, methods=[method, log], batch_size=16, progress=False).fit(epochs=4)
    warm = [b for b in log.batches if b[0] <= 2]
    assert len(warm) == 2 * 16 and all(len(b) == 3 for b in warm)  # epochs 1-2: all data, (x, y)
    last = [b for b in log.batches if b[0] == 4]
    assert sum(len(b[1]) for b in last) == len(method.indices) <= 64  # the subset only, weighted
    rows = {tuple(data.x[i].flatten().tolist()): float(w) for i, w in zip(method.indices, method.weights)}
    for _, x, _, w in last:
        assert [rows[tuple(r.flatten().tolist())] for r in x] == w.tolist()  # the selection's weights
    assert record.method_metrics["gradmatch/selections"] == 2  # epochs 3 and 4
    assert record.steps == 2 * 16 + len([b for b in log.batches if b[0] == 3]) + len(last)
    assert len(last) == math.ceil(len(method.indices) / 16)


def test_selection_time_counts_in_train_time_and_the_time_budget():
    method = GradMatch(fraction=0.5)
    haet.seed_everything(0)
    record = haet.Trainer(tiny_model(), tiny_images(), methods=[method], batch_size=16, progress=False,
                          budget=haet.Budget(time_s=1e-9)).fit(epochs=3)
    assert record.stopped_by == "budget:time" and record.steps == 1  # stopped after the first step
    selection_s = record.method_metrics["gradmatch/selection_s"]
    assert selection_s > 0 and record.method_metrics["gradmatch/selections"] == 1
    assert record.cost["phases_s"]["methods"] >= selection_s  # charged to the run's train time
    assert record.cost["train_s"] >= selection_s
    assert record.method_metrics["gradmatch/selection_flops"] > 0


def test_random_subset_draws_a_fresh_subset_at_each_selection():
    data, log = tiny_images(), BatchLog()
    method = RandomSubset(fraction=0.25, select_every=1)
    haet.seed_everything(0)
    haet.Trainer(tiny_model(), data, methods=[method, log], batch_size=16, progress=False).fit(epochs=2)
    seen = {e: {tuple(r.flatten().tolist()) for b in log.batches if b[0] == e for r in b[1]} for e in (1, 2)}
    assert len(seen[1]) == len(seen[2]) == 64  # round(0.25 · 256), no weights: (x, y) batches
    assert all(len(b) == 3 for b in log.batches)
    assert seen[1] != seen[2]


class IndexLog(haet.Method):
    """The training-data index of every sample each batch trains on (rows of tiny_images are unique)."""
    name = ""

    def __init__(self, data):
        super().__init__()
        self.row = {tuple(r.flatten().tolist()): i for i, r in enumerate(data.x)}
        self.seen: dict[int, set] = {}

    def batch_start(self, state):
        self.seen.setdefault(state.epoch, set()).update(self.row[tuple(r.flatten().tolist())] for r in state.batch[0])


def test_valid_target_never_trains_on_the_held_out_part_warm_epochs_included():
    data = tiny_images()
    log = IndexLog(data)
    method = GradMatch(fraction=0.3, target="valid", valid_fraction=0.25, warm_fraction=0.5, select_every=1)
    haet.seed_everything(0)
    haet.Trainer(tiny_model(), data, methods=[method, log], batch_size=16, progress=False, seed=3).fit(epochs=4)
    held, rest = held_out_split(256, 0.25, 3)
    assert len(held) == 64 and not set(held.tolist()) & set(rest.tolist())
    assert sorted(log.seen) == [1, 2, 3, 4]
    for epoch in (1, 2):  # warm epochs: every trainable sample, none held out
        assert log.seen[epoch] == set(rest.tolist())
    for epoch in (3, 4):
        assert log.seen[epoch] <= set(rest.tolist()) and len(log.seen[epoch]) <= round(0.3 * 192) + 4


def test_valid_target_selects_outside_the_held_out_part():
    method = GradMatch(fraction=0.3, target="valid", valid_fraction=0.25)
    data = tiny_images()
    haet.seed_everything(0)
    haet.Trainer(tiny_model(), data, methods=[method], batch_size=16, progress=False).fit(epochs=1)
    held = torch.randperm(256, generator=torch.Generator().manual_seed(0))[:64]
    assert not set(method.indices.tolist()) & set(held.tolist())
    assert 0 < len(method.indices) <= round(0.3 * 192) + 4


@pytest.mark.parametrize("spec, message", [
    ("gradmatch:fraction=0", r"gradmatch: fraction must be a number in \(0, 1\), got 0.0"),
    ("gradmatch:fraction=1.5", r"fraction must be a number in \(0, 1\)"),
    ("gradmatch:fraction=1.0", r"gradmatch: fraction=1 keeps every sample.*allowed: a number in \(0, 1\)"),
    ("random_subset:fraction=1", r"random_subset: fraction=1 keeps every sample.*allowed: a number in \(0, 1\)"),
    ("gradmatch:select_every=0", r"select_every must be an integer in \[1, inf\]"),
    ("gradmatch:target=test", r"gradmatch:target must be one of train, valid"),
    ("random_subset:fraction=-1", r"fraction must be a number in \(0, 1\)"),
    ("random_subset:select_every=0.5", r"select_every must be an integer"),
])
def test_bad_parameters_give_clear_errors(spec, message):
    with pytest.raises(haet.ConfigError, match=message):
        parse_method(spec)


def test_config_rejects_bad_values_in_python():
    with pytest.raises(haet.ConfigError, match="warm_fraction"):
        GradMatchConfig(warm_fraction=1.0)
    with pytest.raises(haet.ConfigError, match="lam"):
        GradMatch(lam=-1)
