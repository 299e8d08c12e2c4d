"""MoIL incremental training: the cache runs the trunk once per sample, bounds its bytes and
changes nothing in the result; mixing protects the global accuracy; bad input exits 2."""

import copy

import pytest
import torch
from torch import nn

from haet.cli import main
from haet.core.errors import ConfigError
from haet.data.loader import TensorData
from haet.incremental import FeatureCache, IncrementalConfig, run_updates, split_model
from haet.incremental.shifts import SHIFTS, apply_shift


class CountingTrunk(nn.Module):
    def __init__(self, d_in=12, d_out=8):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)
        self.samples = 0

    def forward(self, x):
        self.samples += len(x)
        return torch.relu(self.lin(x))


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(CountingTrunk(), nn.Linear(8, 3))


def _data(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centres = torch.randn(3, 12, generator=torch.Generator().manual_seed(99)) * 2
    return TensorData(centres[y] + shift + torch.randn(n, 12, generator=g), y)


def _run(model, cfg, seed=0):
    g, gt, u, ut = _data(300, 1), _data(200, 2), _data(120, 3, shift=1.0), _data(60, 4, shift=1.0)
    return run_updates(model, g, gt, u, ut, cfg, seed=seed)


def test_cache_runs_trunk_once_per_sample_and_matches_uncached_weights():
    cfg = dict(updates=3, epochs=4, last_layer=True, mix=0.2, batch_size=16)
    cached, plain = _model(), _model()
    res_c = _run(cached, IncrementalConfig(cache_mb=1, **cfg))
    res_p = _run(plain, IncrementalConfig(**cfg))
    distinct = res_c[-1]["samples"]  # the last update's set holds every sample any update used
    evaluation = cfg["updates"] * (60 + 200)  # each update evaluates user (60) and global (200) test sets
    probe = 1  # one sample through the trunk to count its FLOPs
    assert cached[0].samples - evaluation - probe == distinct == res_c[-1]["trunk_samples"] == 150
    # Without the cache the trunk runs on every sample of every epoch of every update.
    assert plain[0].samples - evaluation == sum(r["samples"] for r in res_p) * cfg["epochs"]
    for a, b in zip(cached.parameters(), plain.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()
    assert not torch.equal(cached[1].weight, _model()[1].weight)  # the head did learn


def test_last_layer_leaves_the_trunk_unchanged():
    model = _model()
    trunk_before = copy.deepcopy(model[0].state_dict())
    _run(model, IncrementalConfig(updates=2, epochs=2, last_layer=True))
    assert all(torch.equal(v, model[0].state_dict()[k]) for k, v in trunk_before.items())


def test_cache_never_exceeds_its_bound_and_evicts_lru():
    trunk = nn.Linear(12, 8)
    cache = FeatureCache(max_bytes=10 * 8 * 4)  # room for 10 float32 features of 8 values
    x = torch.randn(40, 12)
    for start in range(0, 40, 7):
        ids = torch.arange(start, min(40, start + 7))
        cache.features(trunk, x[ids], ids)
        assert cache.bytes <= cache.max_bytes and len(cache) <= 10
    assert cache.evictions == 30 and set(cache._store) == set(range(30, 40))
    half = FeatureCache(max_bytes=10 * 8 * 4, dtype="bfloat16")  # 16-bit storage holds twice as many
    half.features(trunk, x, torch.arange(40))
    assert len(half) == 20 and half.bytes <= half.max_bytes


def test_mixing_keeps_global_accuracy_where_no_mixing_loses_more():
    # Global set: classes separable along feature 0; the user's data flips the sign of one class,
    # so training on the user's data alone destroys the global rule for it.
    torch.manual_seed(0)
    def make(n, seed, flip):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 2, (n,), generator=g)
        x = torch.randn(n, 12, generator=g) * 0.5
        x[:, 0] += torch.where(y == 1, 2.0, -2.0) * (-1 if flip else 1)
        x[:, 1] += 3.0 if flip else 0.0  # the user's data is also marked by feature 1
        return TensorData(x, y)
    base = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 2))
    from haet.core.trainer import Trainer
    Trainer(base, make(400, 1, False), None, progress=False, device="cpu", seed=0).fit(5)
    accs = {}
    for mix in (0.0, 0.5):
        m = copy.deepcopy(base)
        res = run_updates(m, make(400, 1, False), make(300, 2, False), make(200, 3, True), make(100, 4, True),
                          IncrementalConfig(updates=2, epochs=5, mix=mix, optimizer="adam:lr=0.01"), seed=0)
        accs[mix] = (res[-1]["global_accuracy"], res[-1]["user_accuracy"])
    from haet.core.evaluation import evaluate
    before = evaluate(base, make(300, 2, False), nn.functional.cross_entropy, torch.device("cpu"))["accuracy"]
    margin = 0.05  # mixing keeps the global accuracy within 5 points of the pre-trained model's
    assert accs[0.5][0] >= before - margin
    assert accs[0.0][0] < before - margin  # while updating on the user's data alone loses more
    assert accs[0.5][1] > 0.8  # and the user's data is still learnt


def test_split_by_name_and_index():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert len(split_model(model)[1]) == 1
    assert len(split_model(model, 1)[0]) == 1
    with pytest.raises(ConfigError, match="not a layer"):
        split_model(model, "fc")


def test_shifts_change_the_images():
    x, y = torch.rand(50, 1, 28, 28), torch.arange(50) % 10
    for shift in SHIFTS:
        xs, ys = apply_shift(shift, x, y, user=0)
        assert len(xs) == len(ys) > 0
        assert shift == "classes" or not torch.allclose(xs, x)


@pytest.mark.parametrize("argv, word", [
    (["--shift", "tilt"], "tilt"),
    (["--cache-mb", "4"], "last-layer"),
    (["--mix", "1.5"], "mix"),
    (["--updates", "0"], "updates"),
    (["--task", "digits", "--last-layer", "--split", "fc"], "fc"),
    (["--cache-mb", "4", "--last-layer", "--cache-dtype", "int8"], "cache_dtype"),
])
def test_bad_input_exits_2_writing_nothing(tmp_path, capsys, argv, word):
    out = tmp_path / "run"
    assert main(["incremental", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word in err[0]
    assert not out.exists()


def test_cli_writes_per_update_records_summary_and_plot(tmp_path):
    from haet.core.record import RunRecord

    out = tmp_path / "run"
    assert main(["incremental", "--task", "digits", "--shift", "noise", "--updates", "2", "--last-layer",
                 "--cache-mb", "1", "--cache-dtype", "bfloat16", "--mix", "0.1", "--pretrain-epochs", "1",
                 "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    summary = RunRecord.load(out)
    mm = summary.method_metrics
    assert mm["incremental/updates"] == 2 and mm["incremental/cache_bytes"] <= mm["incremental/cache_max_bytes"]
    assert len(summary.history) == 2 and summary.cost["energy_source"] == "model"
    for u in (1, 2):
        rec = RunRecord.load(out / f"update-{u}")
        assert rec.method_metrics["incremental/update"] == u and "incremental/global_accuracy" in rec.method_metrics
    assert (out / "incremental.png").stat().st_size > 0 and (out / "pretrained" / "model.safetensors").exists()
