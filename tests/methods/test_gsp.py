"""Grouped sparse projection: the target is hit, the solution matches a generic solver, the cost
per size is a fixed number of passes, and the method holds the sparsity in training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import haet
from haet.core.errors import ConfigError
from haet.methods import parse_entry, parse_method
from haet.methods.gsp import (GroupedSparseProjection, GSPConfig, apply_gsp, grouped_sparse_projection, hoyer_sparsity,
                              project_model_)


def _sp(z: np.ndarray) -> float:
    n = len(z)
    return (np.sqrt(n) - np.abs(z).sum() / np.linalg.norm(z)) / (np.sqrt(n) - 1)


def test_hoyer_sparsity_of_known_vectors():
    v = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 3.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    assert torch.allclose(hoyer_sparsity(v), torch.tensor([0.0, 1.0, (2 - 2**0.5) / 1], dtype=torch.float64))


@pytest.mark.parametrize("target", [0.3, 0.8, 0.95])
def test_average_hoyer_sparsity_equals_target(target):
    g = torch.Generator().manual_seed(1)
    matrix = torch.randn(32, 144, generator=g)
    out = grouped_sparse_projection(matrix, target)
    assert out.shape == matrix.shape
    assert abs(float(hoyer_sparsity(out).mean()) - target) < 1e-4
    # vectors of different lengths and scales in one group (the "model" group)
    vectors = [torch.randn(9, generator=g), 5 * torch.randn(144, generator=g), 0.1 * torch.randn(1568, generator=g)]
    out = grouped_sparse_projection(vectors, target)
    assert [o.shape for o in out] == [v.shape for v in vectors]
    assert abs(float(hoyer_sparsity(out).mean()) - target) < 1e-4
    for o, v in zip(out, vectors):   # signs kept, zeros only where the threshold cut
        assert torch.all((o == 0) | (torch.sign(o) == torch.sign(v)))


def test_group_projection_equals_generic_constrained_solver():
    from scipy import optimize as scipy_optimize   # the dev extra installs scipy
    rng = np.random.default_rng(0)
    lengths, target = [4, 6, 5], 0.6
    c = [rng.normal(size=n) for n in lengths]
    a = [np.abs(v) for v in c]
    cuts = np.cumsum([0] + lengths)

    def split(x):
        return [x[cuts[i]:cuts[i + 1]] for i in range(len(lengths))]

    # the paper's problem: unit directions z_i >= 0 maximizing sum <|c_i|, z_i>, mean sparsity >= target
    constraints = [{"type": "eq", "fun": (lambda x, i=i: split(x)[i] @ split(x)[i] - 1)} for i in range(len(lengths))]
    constraints.append({"type": "ineq", "fun": lambda x: np.mean([_sp(z) for z in split(x)]) - target})
    x0 = np.concatenate([v / np.linalg.norm(v) for v in a])
    res = scipy_optimize.minimize(lambda x: -sum(ai @ zi for ai, zi in zip(a, split(x))), x0, method="SLSQP",
                                  constraints=constraints, bounds=[(0, None)] * len(x0),
                                  options={"ftol": 1e-12, "maxiter": 1000})
    assert res.success
    reference = [np.sign(ci) * (ai @ zi) * zi for ci, ai, zi in zip(c, a, split(res.x))]
    ours = grouped_sparse_projection([torch.tensor(v) for v in c], target)
    for o, r in zip(ours, reference):
        np.testing.assert_allclose(o.numpy(), r, atol=1e-4)


def test_single_vector_is_the_euclidean_projection():
    from scipy import optimize as scipy_optimize   # the dev extra installs scipy
    rng = np.random.default_rng(1)
    v, target = rng.normal(size=8), 0.7
    s = np.sign(v)   # the nearest point keeps v's signs, so solve over y >= 0 with x = s * y (smooth)
    res = scipy_optimize.minimize(lambda y: ((s * y - v) ** 2).sum(), np.abs(v), method="SLSQP",
                                  constraints=[{"type": "eq", "fun": lambda y: _sp(y) - target}],
                                  bounds=[(0, None)] * len(v), options={"ftol": 1e-14, "maxiter": 1000})
    assert res.success
    ours = grouped_sparse_projection(torch.tensor(v)[None], target)[0].numpy()
    np.testing.assert_allclose(ours, s * res.x, atol=1e-4)
    assert ((ours - v) ** 2).sum() == pytest.approx(res.fun, rel=1e-6)   # the same distance


def test_a_group_already_sparser_than_the_target_is_unchanged():
    x = torch.zeros(4, 50)
    x[:, :2] = torch.randn(4, 2)
    out, info = grouped_sparse_projection(x, 0.5, return_info=True)
    assert torch.equal(out, x) and info["mu"] == 0.0


def test_passes_over_the_data_do_not_grow_with_size():
    """Each evaluation of g is one pass over the entries; the count stays bounded from 10^2 to 10^6
    entries, so the projection is linear in the size (timings: benchmarks/gsp.py)."""
    g = torch.Generator().manual_seed(2)
    counts = []
    for rows, cols in [(4, 25), (40, 250), (100, 2500), (400, 2500)]:
        _, info = grouped_sparse_projection(torch.randn(rows, cols, generator=g), 0.85, return_info=True)
        assert info["converged"]
        counts.append(info["evaluations"])
    assert max(counts) <= 20, counts


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 4))


def test_project_model_per_layer_and_whole_model():
    torch.manual_seed(0)
    model = _model()
    project_model_(model, 0.8, "layer")
    for layer in (model[0], model[3]):
        assert abs(float(hoyer_sparsity(layer.weight.reshape(layer.weight.shape[0], -1)).mean()) - 0.8) < 1e-4
    torch.manual_seed(0)
    model = _model()
    project_model_(model, 0.8, "model")
    per_layer = [hoyer_sparsity(m.weight.reshape(m.weight.shape[0], -1)) for m in (model[0], model[3])]
    assert abs(float(torch.cat(per_layer).mean()) - 0.8) < 1e-4
    assert abs(float(per_layer[0].mean()) - float(per_layer[1].mean())) > 0.01   # layers set their own level


def test_training_holds_the_target_and_reports_zeros(trainer_factory):
    model = _model()
    method = GroupedSparseProjection(target=0.8, every=2)
    record = trainer_factory(model, methods=[method]).fit(epochs=2)
    m = record.method_metrics
    for name in ("0", "3"):
        layer = model.get_submodule(name)
        assert abs(m[f"gsp/{name}/hoyer"] - 0.8) < 1e-4       # projected before the final evaluation
        assert m[f"gsp/{name}/zero_fraction"] == pytest.approx(float((layer.weight == 0).float().mean()))
    zeros = sum(int((l.weight == 0).sum()) for l in (model[0], model[3]))
    assert m["gsp/zero_fraction"] == pytest.approx(zeros / (36 + 1024)) and zeros > 0
    assert m["gsp/projections"] == 2 * 4 // 2 + 2             # every 2nd of 4 steps per epoch, plus before eval


def test_oneshot_freezes_the_zeros_while_fine_tuning(trainer_factory):
    model = _model()
    method = GroupedSparseProjection(target=0.9, mode="oneshot", start_epoch=2)
    record = trainer_factory(model, methods=[method]).fit(epochs=3)
    masks = method.masks
    assert record.method_metrics["gsp/projections"] == 1
    for layer, mask in zip((model[0], model[3]), masks):
        assert torch.equal(layer.weight != 0, mask)           # no pruned weight came back, none was added
    assert sum(int((~mk).sum()) for mk in masks) > 0


def test_bad_parameters_name_the_parameter_and_range():
    with pytest.raises(ConfigError, match=r"target must be a number in \(0, 1\)"):
        parse_method("gsp:target=1.5")
    with pytest.raises(ConfigError, match="group must be one of"):
        parse_method("gsp:group=net")
    with pytest.raises(ConfigError, match="every must be an integer"):
        GroupedSparseProjection(every=0)


def test_gsp_refuses_to_run_with_mbst(trainer_factory):
    with pytest.raises(ConfigError, match="gsp and mbst cannot run together: both own 'weight_sparsity'"):
        trainer_factory(methods=parse_entry("gsp+mbst"))


def test_trainer_free_functional_matches_method_projection():
    torch.manual_seed(0)
    a = _model()
    b = _model()
    b.load_state_dict(a.state_dict())
    project_model_(a, 0.7)
    for la, lb in ((a[0], b[0]), (a[3], b[3])):
        w = grouped_sparse_projection(lb.weight.detach().reshape(lb.weight.shape[0], -1), 0.7)
        assert torch.allclose(la.weight.reshape(w.shape), w, atol=1e-6)


def test_resumed_oneshot_run_keeps_its_mask(trainer_factory, tmp_path):
    whole = _model()
    trainer_factory(whole, methods=[GroupedSparseProjection(target=0.9, mode="oneshot")]).fit(epochs=2)
    first = _model()
    trainer_factory(first, methods=[GroupedSparseProjection(target=0.9, mode="oneshot")], out_dir=tmp_path,
                    checkpoint=True, budget=haet.Budget(steps=4)).fit(epochs=2)
    resumed = _model()
    trainer_factory(resumed, methods=[GroupedSparseProjection(target=0.9, mode="oneshot")], out_dir=tmp_path,
                    checkpoint=True).fit(epochs=2, resume_from=tmp_path)
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_train_mode_ends_with_a_final_projection_and_fine_tuning_on_a_fixed_pattern(trainer_factory):
    model = _model()
    method = GroupedSparseProjection(target=0.9, every=2, finetune=0.5)
    snapshots = []

    class Snapshot(haet.Method):
        name = ""

        def epoch_end(self, state):
            snapshots.append([l.weight.detach().clone() for l in (model[0], model[3])])

    record = trainer_factory(model, methods=[method, Snapshot()]).fit(epochs=4)
    assert method.freeze_epoch == 3 and len(method.masks) == 2
    # epochs 1-2: every 2nd of 4 steps, plus before each evaluation; epoch 3: the final projection, then none
    assert record.method_metrics["gsp/projections"] == 2 * (4 // 2 + 1) + 1
    for mask, w2, w3, w4 in zip(method.masks, *snapshots[1:]):
        assert torch.equal(w3 != 0, mask) and torch.equal(w4 != 0, mask)   # the pattern of the final projection
        assert not torch.equal(w3, w4)                                       # fine-tuned: the survivors still learn
    hoyer = [float(hoyer_sparsity(w.reshape(w.shape[0], -1)).mean()) for w in snapshots[1]]
    assert all(abs(h - 0.9) < 1e-4 for h in hoyer)                           # projected up to the fine-tuning
    assert record.method_metrics["gsp/zero_fraction"] == pytest.approx(
        sum(int((~m).sum()) for m in method.masks) / (36 + 1024))


def test_finetune_zero_projects_until_the_end(trainer_factory):
    method = GroupedSparseProjection(target=0.8, every=2, finetune=0.0)
    trainer_factory(methods=[method]).fit(epochs=2)
    assert method.freeze_epoch is None and not method.masks


class NoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, 4))

    def forward(self, x):
        return x.flatten(1)[:, :4] * self.scale


def test_a_model_with_nothing_to_project_is_refused_at_fit_start(trainer_factory):
    with pytest.raises(ConfigError, match="gsp: NoLayers has no layer to project"):
        trainer_factory(NoLayers(), methods=[GroupedSparseProjection()]).fit(epochs=1)
    with pytest.raises(ConfigError, match="gsp: start_epoch=3 is after the last epoch"):
        trainer_factory(methods=[GroupedSparseProjection(start_epoch=3)]).fit(epochs=2)


def test_apply_gsp_is_the_functional_form_with_a_filter():
    model = _model()
    before = model[0].weight.detach().clone()
    info = apply_gsp(model, GSPConfig(target=0.8), filter_fn=lambda name, m: isinstance(m, nn.Linear))
    assert torch.equal(model[0].weight, before) and info["weights"] == 1024   # the conv was filtered out
    assert abs(float(hoyer_sparsity(model[3].weight).mean()) - 0.8) < 1e-4
    with pytest.raises(ConfigError, match="no layer to project"):
        apply_gsp(NoLayers(), GSPConfig())
