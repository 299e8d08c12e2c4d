"""The Trainer loop: events, budgets, stop reasons, weighted batches, checkpoints and resume."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from torch import nn

import haet
from haet import Budget, Event, Method

from ..conftest import tiny_cnn


class Recorder(Method):
    """Records every event it sees and the training clock after each step."""
    name = "recorder"

    def __init__(self, sleep_s: float = 0.0):
        super().__init__()
        self.events: list[str] = []
        self.train_s: list[float] = []
        self.sleep_s = sleep_s

    def on(self, event):
        return lambda state: self.events.append(event.value)

    def handlers(self):
        out = {e: self.on(e) for e in Event}
        out[Event.AFTER_STEP] = self._after_step
        return out

    def _after_step(self, state):
        self.events.append("after_step")
        if self.sleep_s:
            time.sleep(self.sleep_s)
        self.train_s.append(state.clock.train_s)


def test_events_fire_in_order(trainer_factory):
    rec = Recorder()
    trainer_factory(methods=[rec], batch_size=128).fit(epochs=1)  # 256 samples: 2 batches
    step = ["batch_start", "after_forward", "after_backward", "after_step", "batch_end"]
    assert rec.events == ["fit_start", "epoch_start", *step, *step, "epoch_end", "before_eval", "after_eval",
                          "fit_end"]


def test_steps_budget_stops_exactly(trainer_factory):
    record = trainer_factory(budget=Budget(steps=7)).fit(epochs=5)
    assert record.steps == 7 and record.stopped_by == "budget:steps" and record.epochs == 2
    assert "accuracy" in record.metrics  # evaluated after stopping


def test_time_budget_stops_at_the_first_step_past_it(trainer_factory):
    rec = Recorder(sleep_s=0.02)  # each step takes at least 20 ms, charged to the methods phase
    record = trainer_factory(methods=[rec], budget=Budget(time_s=0.15)).fit(epochs=50)
    assert record.stopped_by == "budget:time"
    assert rec.train_s[-1] >= 0.15  # stopped at the first step past the budget (on a loaded machine, the first)
    assert len(rec.train_s) == 1 or rec.train_s[-2] < 0.15
    assert record.steps == len(rec.train_s)
    assert record.cost["phases_s"]["methods"] >= 0.02 * record.steps


class MemoryHog(Method):
    """Holds 64 MiB (touched, so resident) from the end of step 3 on."""
    name = "hog"

    def after_step(self, state):
        if state.step == 3:
            self.block = torch.ones(16 * 2**20)


@pytest.mark.parametrize("kind,budget", [("flops", Budget(flops=1e6)), ("energy", Budget(energy_j=1e-5)),
                                         ("mem", Budget(peak_mem_mb=32.0))])
def test_other_budgets_stop_at_the_first_step_past_them(trainer_factory, kind, budget):
    record = trainer_factory(budget=budget, methods=[MemoryHog()] if kind == "mem" else []).fit(epochs=20)
    assert record.stopped_by == f"budget:{kind}"
    per_step = record.cost["flops"] / record.steps
    if kind == "flops":
        assert record.cost["flops"] >= 1e6 > record.cost["flops"] - per_step
    if kind == "energy":
        assert record.cost["energy_j"] >= 1e-5 > record.cost["energy_j"] * (record.steps - 1) / record.steps
    if kind == "mem":
        # On CPU the budget reads memory added by training (the process held far more than 32 MiB
        # before fit): the tiny model stays under it until the hog's 64 MiB arrive at step 3.
        assert record.steps == 3 and record.cost["peak_mem_added_mb"] >= 64
        assert record.cost["peak_mem_mb"] - record.cost["peak_mem_added_mb"] == pytest.approx(
            record.cost["mem_start_mb"], abs=1.0)


def test_nonfinite_loss_stops_before_the_update_and_keeps_the_record(trainer_factory, tmp_path):
    class Poison(Method):
        name = "poison"

        def batch_start(self, state):
            if state.step == 3:
                x, y = state.batch
                state.batch = (x * float("nan"), y)

    trainer = trainer_factory(methods=[Poison()], out_dir=tmp_path)
    record = trainer.fit(epochs=3)
    assert record.stopped_by == "nonfinite_loss" and record.steps == 3
    assert all(torch.isfinite(p).all() for p in trainer.state.model.parameters())
    assert json.loads((tmp_path / "record.json").read_text())["stopped_by"] == "nonfinite_loss"


def test_interrupt_and_error_keep_the_record(trainer_factory, tmp_path):
    class Raise(Method):
        name = "raise"

        def __init__(self, exc):
            super().__init__()
            self.exc = exc

        def after_step(self, state):
            if state.step == 2:
                raise self.exc

    record = trainer_factory(methods=[Raise(KeyboardInterrupt())], out_dir=tmp_path / "i").fit(epochs=2)
    assert record.stopped_by == "interrupt" and record.steps == 2
    assert json.loads((tmp_path / "i" / "record.json").read_text())["stopped_by"] == "interrupt"

    with pytest.raises(RuntimeError, match="boom"):
        trainer_factory(methods=[Raise(RuntimeError("boom"))], out_dir=tmp_path / "e").fit(epochs=2)
    saved = json.loads((tmp_path / "e" / "record.json").read_text())
    assert saved["stopped_by"] == "error" and "boom" in saved["error"] and saved["steps"] == 2


def test_weighted_batches_weight_the_loss(tiny_data):
    """A subset loader with weights gives the loss Σ w·l / Σ w (compared with a hand computation)."""
    idx = torch.arange(0, 64)
    w = torch.linspace(0.5, 2.0, 64)

    class Subset(Method):
        name = "subset"

        def epoch_start(self, state):
            state.train_loader = haet.Loader(state.train_data, 64, seed=0, indices=idx, weights=w).set_epoch(1)

        def after_forward(self, state):
            x, y, wb = state.batch
            per = nn.functional.cross_entropy(state.outputs, y, reduction="none")
            self.expected = float((per * wb).sum().detach() / wb.sum())
            self.got = float(state.loss.detach())

    m = Subset()
    record = haet.Trainer(tiny_cnn(), tiny_data, None, methods=[m], progress=False).fit(epochs=1)
    assert record.steps == 1
    assert m.got == pytest.approx(m.expected, rel=1e-6)


def _dropout_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 4))


def test_resumed_run_ends_with_the_same_weights(tiny_data, tmp_path):
    """Dropout makes the result depend on the restored RNG state, not only on the weights."""
    def trainer(out):
        haet.seed_everything(1)
        return haet.Trainer(_dropout_model(), tiny_data, tiny_data, progress=False, seed=1, out_dir=out,
                            checkpoint=True, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))

    straight = trainer(tmp_path / "a")
    straight.fit(epochs=3)
    first = trainer(tmp_path / "b")
    first.fit(epochs=2)
    resumed = trainer(tmp_path / "b")
    record = resumed.fit(epochs=3, resume_from=tmp_path / "b")
    a, b = straight.state.model.state_dict(), resumed.state.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert record.epochs == 3 and record.steps == 12 and len(record.history) == 3
    assert record.metrics == straight.record.metrics
    assert record.cost["flops"] == straight.record.cost["flops"]  # meters continue, not restart


def test_checkpoint_is_written_atomically_and_refuses_unsafe_files(tiny_data, tmp_path):
    haet.Trainer(tiny_cnn(), tiny_data, None, progress=False, out_dir=tmp_path, checkpoint=True).fit(epochs=1)
    assert (tmp_path / "checkpoint.pt").is_file() and not list(tmp_path.glob("*.tmp"))
    import pickle

    class Evil:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('ran')" % str(tmp_path / "pwned"),))

    bad = tmp_path / "bad"
    bad.mkdir()
    with open(bad / "checkpoint.pt", "wb") as f:
        pickle.dump({"format": 1, "x": Evil()}, f)
    with pytest.raises(haet.ConfigError, match="refused to load"):
        haet.Trainer(tiny_cnn(), tiny_data, None, progress=False).fit(epochs=1, resume_from=bad)
    assert not (tmp_path / "pwned").exists()


def test_metrics_jsonl_has_one_line_per_epoch(trainer_factory, tmp_path):
    trainer_factory(out_dir=tmp_path).fit(epochs=3)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2, 3]
    assert all(math.isfinite(l["train_loss"]) and 0 <= l["accuracy"] <= 1 for l in lines)
    assert lines[-1]["train_s"] >= lines[0]["train_s"]


def test_any_dataset_or_iterable_of_batches(tiny_data):
    class MapStyle(torch.utils.data.Dataset):
        def __len__(self):
            return len(tiny_data)

        def __getitem__(self, i):
            return tiny_data.x[i], tiny_data.y[i]

    batches = [(tiny_data.x[i:i + 32], tiny_data.y[i:i + 32]) for i in range(0, 256, 32)]
    for data, steps in ((MapStyle(), 4), (batches, 8)):
        record = haet.Trainer(tiny_cnn(), data, batches, progress=False).fit(epochs=1)
        assert record.steps == steps and 0 <= record.metrics["accuracy"] <= 1
    with pytest.raises(haet.ConfigError, match="one-shot iterator"):
        haet.Trainer(tiny_cnn(), iter(batches))


def test_bad_arguments_are_clear_errors(tiny_data):
    with pytest.raises(haet.ConfigError, match="nn.Module"):
        haet.Trainer("model", tiny_data)
    with pytest.raises(haet.ConfigError, match="epochs must be a positive integer"):
        haet.Trainer(tiny_cnn(), tiny_data, progress=False).fit(epochs=0)
    with pytest.raises(haet.ConfigError, match="device 'tpu' is not supported"):
        haet.Trainer(tiny_cnn(), tiny_data, device="tpu")
    with pytest.raises(haet.ConfigError, match="given twice"):
        haet.Trainer(tiny_cnn(), tiny_data, methods=[Recorder(), Recorder()])
    with pytest.raises(haet.ConfigError, match="checkpoint=True needs an out_dir"):
        haet.Trainer(tiny_cnn(), tiny_data, checkpoint=True)


def test_incompatible_methods_fail_at_construction(tiny_data):
    class Exclusive(Method):
        name = "exclusive"

        def check_compatible(self, others):
            if others:
                raise haet.ConfigError("exclusive cannot run with " + ", ".join(o.name for o in others))

    with pytest.raises(haet.ConfigError, match="exclusive cannot run with recorder"):
        haet.Trainer(tiny_cnn(), tiny_data, methods=[Exclusive(), Recorder()])
