"""Numbers that used to come out silently wrong: report grouping, accuracy of non-classifiers,
fit() twice, TensorData in a DataLoader, memory budgets on CPU, timing under contention."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import haet
from haet import ConfigError, Method, TensorData
from haet.core.evaluation import evaluate
from haet.core.record import RunRecord
from haet.meters.contention import ContentionWarning, contention_verdict
from haet.report import build_report

from ..conftest import tiny_cnn


# -- 1. reports never average runs of different tasks or models ---------------------------------
def _save(path, task, model, label, acc, train_s):
    RunRecord(task=task, model=model, label=label, seed=0, metrics={"accuracy": acc},
              cost={"train_s": train_s, "energy_j": 1.0, "energy_source": "model", "peak_mem_mb": 10.0,
                    "flops": 5.0}).save(path)


def test_report_groups_by_task_and_model(tmp_path):
    _save(tmp_path / "a", "mnist5k", "mnist5k-cnn", "baseline", 0.9, 2.0)
    _save(tmp_path / "b", "digits", "mlp", "baseline", 0.5, 1.0)
    _save(tmp_path / "c", "digits", "mlp", "qat", 0.4, 0.5)
    result = build_report([tmp_path])
    base = [s for s in result["summaries"] if s.method == "baseline"]
    assert sorted((s.task, s.model, s.mean["accuracy"]) for s in base) == [
        ("digits", "mlp", 0.5), ("mnist5k", "mnist5k-cnn", 0.9)]  # not one row averaging 0.7
    qat = next(s for s in result["summaries"] if s.method == "qat")
    assert qat.ratio["train_s"] == pytest.approx(0.5)  # against the digits baseline, not a mixed one
    md = result["report"].read_text()
    assert "## mnist5k / mnist5k-cnn" in md and "## digits / mlp" in md
    assert len(result["pareto_all"]) == 2 and all(p.is_file() for p in result["pareto_all"])


def test_report_marks_contended_runs(tmp_path):
    RunRecord(task="t", model="m", label="baseline", metrics={"accuracy": 0.9},
              cost={"train_s": 1.0, "contended": True}).save(tmp_path / "a")
    md = build_report([tmp_path])["report"].read_text()
    assert "contended machine" in md and "| ⚠ 1/1 contended |" in md


# -- 2. accuracy only for classification shapes -------------------------------------------------
def test_regression_gets_loss_only_with_a_note():
    x = torch.randn(32, 3)
    data = TensorData(x, x.sum(1, keepdim=True))
    model = nn.Linear(3, 1)
    with pytest.warns(UserWarning, match="not a classification"):
        metrics = evaluate(model, data, nn.functional.mse_loss, torch.device("cpu"))
    assert set(metrics) == {"loss"}
    assert metrics["loss"] == pytest.approx(float(nn.functional.mse_loss(model(x), data.y)), rel=1e-5)


class _TokenCE(nn.CrossEntropyLoss):
    def forward(self, outputs, targets):
        return super().forward(outputs.transpose(1, 2), targets)


class _Fixed(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x):
        return self.out[: len(x)]


def test_per_token_accuracy_respects_ignore_index():
    out = torch.zeros(2, 3, 4)
    out[..., 1] = 1.0                                    # predicts class 1 everywhere
    y = torch.tensor([[1, 1, 3], [2, 1, 3]])             # 3 of 4 counted tokens right; 3 is ignored
    metrics = evaluate(_Fixed(out), [(torch.zeros(2), y)], _TokenCE(ignore_index=3), torch.device("cpu"))
    assert metrics["accuracy"] == pytest.approx(3 / 4)
    y = torch.tensor([[1, 1, -100], [2, 1, -100]])       # negative targets are never classes
    metrics = evaluate(_Fixed(out), [(torch.zeros(2), y)], _TokenCE(), torch.device("cpu"))
    assert metrics["accuracy"] == pytest.approx(3 / 4)


def test_classifier_accuracy_unchanged(tiny_data):
    model = tiny_cnn()
    metrics = evaluate(model, tiny_data, nn.functional.cross_entropy, torch.device("cpu"))
    expected = float((model(tiny_data.x).argmax(1) == tiny_data.y).float().mean())
    assert metrics["accuracy"] == pytest.approx(expected)


# -- 3. fit() twice is refused; returned records never change ------------------------------------
def test_fit_twice_is_refused_and_the_record_is_kept(trainer_factory):
    trainer = trainer_factory(batch_size=128)
    record = trainer.fit(epochs=2)
    history = [dict(line) for line in record.history]
    with pytest.raises(ConfigError, match="already called"):
        trainer.fit(epochs=1)
    trainer.history.append({"epoch": 99})
    assert record.history == history and [h["epoch"] for h in record.history] == [1, 2]


# -- 4. TensorData in a DataLoader; TensorDataset for subset selection ----------------------------
def test_tensordata_works_in_a_dataloader(tiny_data):
    x, y = next(iter(DataLoader(tiny_data, batch_size=8, shuffle=False)))
    assert torch.equal(x, tiny_data.x[:8]) and torch.equal(y, tiny_data.y[:8])


@pytest.mark.parametrize("wrap", ["dataset", "loader"])
def test_gradmatch_accepts_a_tensordataset(tiny_data, wrap):
    from haet.methods.gradmatch import RandomSubset

    ds = TensorDataset(tiny_data.x, tiny_data.y)
    data = ds if wrap == "dataset" else DataLoader(ds, batch_size=32)
    haet.seed_everything(0)
    record = haet.Trainer(tiny_cnn(), data, tiny_data, methods=[RandomSubset(fraction=0.5)], progress=False,
                          batch_size=32).fit(epochs=2)
    assert record.stopped_by == "epochs"
    assert record.history[-1]["random_subset/subset_size"] == 128  # it selected from the converted tensors


# -- 5. memory budget on CPU: memory added by training ------------------------------------------
def test_memory_budget_below_the_process_size_does_not_stop_at_once(trainer_factory):
    before = haet.meters.memory._process_rss_mb()
    limit = before / 2   # far below what the process holds, far above what the tiny model adds
    record = trainer_factory(budget=haet.Budget(peak_mem_mb=limit), batch_size=64).fit(epochs=2)
    assert record.stopped_by == "epochs" and record.steps == 8
    assert record.cost["peak_mem_added_mb"] < limit <= record.cost["peak_mem_mb"]


# -- 6. contention: recorded, flagged, warned -----------------------------------------------------
def test_contention_verdict():
    assert contention_verdict(cpu_s=9.5, wall_s=10, threads=1, load_avg=1.0, cores=2)[0] is False
    contended, share, reasons = contention_verdict(cpu_s=6.0, wall_s=10, threads=2, load_avg=1.0, cores=2)
    assert contended and share == pytest.approx(0.3) and "0.30 CPU-s" in reasons[0]
    assert contention_verdict(cpu_s=10, wall_s=10, threads=1, load_avg=5.0, cores=2)[0] is True
    assert contention_verdict(cpu_s=0.1, wall_s=10, threads=1, load_avg=1.0, cores=2, cpu_bound=False)[0] is False


class Waits(Method):
    """Stands for a busy machine: each step waits 30 ms for a core it does not get."""
    name = "waits"

    def after_step(self, state):
        time.sleep(0.03)


def test_a_run_that_waits_for_cpu_is_flagged(trainer_factory):
    with pytest.warns(ContentionWarning, match="timing contended"):
        record = trainer_factory(methods=[Waits()], batch_size=32).fit(epochs=1)
    c = record.cost
    assert c["contended"] is True and c["cpu_per_thread"] < 0.5
    assert c["threads"] == torch.get_num_threads() and c["cpu_s"] > 0
    assert set(c["load_avg"]) == {"start", "end"}


def test_an_unshardable_loader_under_torchrun_is_warned_about(trainer_factory, tiny_data):
    from haet.core import evaluation

    batches = [(tiny_data.x[:32], tiny_data.y[:32])]
    trainer = haet.Trainer(tiny_cnn(), batches, progress=False)
    trainer.world_size = 2  # as under torchrun, without starting processes
    evaluation._noted.discard("unsharded")
    with pytest.warns(UserWarning, match="every rank trains on all of it"):
        assert trainer._epoch_batches(1) is batches
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer._epoch_batches(2)  # once
