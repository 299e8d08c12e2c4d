"""Cost data flows one way: methods charge the state's ledger, meters read it, budgets read meters."""

from __future__ import annotations

import pytest

import haet
from haet.core.errors import ConfigError
from haet.meters.flops import label_flops, labelled_layers
from haet.meters.hardware import HardwareTable
from haet.methods import parse_entry
from haet.methods.qat import QATConfig, apply_qat
from tests.conftest import tiny_cnn


class Charger(haet.Method):
    name = "charger"
    summary, paper = "charges a fixed amount of work each step", "-"

    def after_step(self, state):
        state.charge(flops=1e6, dtype="int8", bytes_moved=1e3, what="charger/work")


def test_charged_work_reaches_flops_energy_and_the_record(trainer_factory):
    plain = trainer_factory(budget=haet.Budget(steps=3)).fit(1)
    charged = trainer_factory(methods=[Charger()], budget=haet.Budget(steps=3)).fit(1)
    assert charged.cost["flops"] == pytest.approx(plain.cost["flops"] + 3e6)
    assert charged.cost["flops_by_dtype"]["int8"] == 3e6
    assert charged.cost["flops_charged_by_methods"] == {"charger/work": 3e6}
    assert charged.cost["bytes_moved"] == pytest.approx(plain.cost["bytes_moved"] + 3e3)
    table = HardwareTable()
    extra_j = (3e6 * table.pj_per_flop("int8") + 3e3 * table.dram_pj_per_byte) * 1e-12
    assert charged.cost["energy_j"] == pytest.approx(plain.cost["energy_j"] + extra_j, rel=1e-9)


def test_a_flops_budget_counts_charged_work(trainer_factory):
    plain = trainer_factory(budget=haet.Budget(steps=3)).fit(1)
    per_step = plain.cost["flops"] / 3
    budget = haet.Budget(flops=3 * per_step)
    assert trainer_factory(budget=budget).fit(5).steps == 3
    record = trainer_factory(methods=[Charger()], budget=budget).fit(5)
    assert record.stopped_by == "budget:flops" and record.steps == 2  # 2 steps + 2e6 charged >= 3 steps


def test_bad_charges_are_refused(trainer_factory):
    trainer = trainer_factory()
    with pytest.raises(ConfigError, match="flops must be a finite number"):
        trainer.state.charge(flops=float("nan"))
    with pytest.raises(ConfigError, match="phase must be one of"):
        trainer.state.charge(flops=1.0, phase="later")


def test_flops_are_labelled_per_layer_from_the_layers_that_ran():
    model = tiny_cnn()
    apply_qat(model, QATConfig(bits_w=4, bits_a=4), filter_fn=lambda name, m: name == "0")  # the conv only
    names = labelled_layers(model)
    assert list(names) == ["Sequential.0"]
    forward = {"Global": 100.0, "Sequential": 100.0, "Sequential.0": 70.0, "Sequential.3": 30.0}
    backward = {"Global": 200.0, "Sequential.0": 120.0}
    assert label_flops(model, forward, backward, "float32") == {"int4": 70.0, "float32": 30.0 + 200.0}
