"""Every registered method trains for two steps inside the Trainer, on the main job's setting."""

from __future__ import annotations

import math

import pytest

import haet
from haet.core.errors import ConfigError
from haet.core.method import CAPABILITIES
from haet.methods import ORDER, _USER, get_method_class, parse_entry, register_method, registry
from haet.models import build_model

METHODS = list(registry())


def test_registry_names_come_from_the_design_table():
    assert list(registry())[:len(ORDER)] == list(ORDER), "haet's methods are DESIGN.md's table, in its order"


def test_every_method_declares_known_capabilities():
    for name, cls in registry().items():
        assert set(cls.owns) <= set(CAPABILITIES), f"{name} owns an undeclared capability"


def test_a_users_method_is_registered_publicly_and_reaches_the_command_line(monkeypatch, capsys):
    from haet.cli import main

    class Halve(haet.Method):
        name = "halve_lr"
        summary, paper = "halves the learning rate once", "-"

        def fit_start(self, state):
            for g in state.optimizer.param_groups:
                g["lr"] /= 2

    monkeypatch.setattr("haet.methods._USER", dict(_USER))
    assert register_method(Halve) is Halve
    assert get_method_class("halve_lr") is Halve
    assert main(["methods"]) == 0 and "halve_lr" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="already registered"):
        register_method(type("Other", (haet.Method,), {"name": "qat", "summary": "x", "paper": "x"}))


def test_two_owners_of_one_capability_are_refused_naming_both(mnist5k):
    train, test = mnist5k
    model = build_model("mnist5k-cnn", (1, 28, 28), 10)
    with pytest.raises(ConfigError, match=r"fusion and sc_sgd .*'optimizer_step'"):
        haet.Trainer(model, train, test, methods=parse_entry("fusion+sc_sgd"), progress=False)


@pytest.mark.parametrize("name", METHODS)
def test_method_trains_two_steps_on_mnist5k(name, mnist5k):
    cls = get_method_class(name)
    assert cls.summary and cls.paper, f"{name} needs a summary and a paper for `haet methods`"
    train, test = mnist5k
    haet.seed_everything(0)
    model = build_model("eqprop-mlp" if name == "eqprop" else "mnist5k-cnn", (1, 28, 28), 10)
    record = haet.Trainer(model, train, test, methods=parse_entry(name), budget=haet.Budget(steps=2),
                          progress=False).fit(epochs=1)
    assert record.steps == 2 and record.stopped_by == "budget:steps"
    assert record.methods[0]["name"] == name
    assert math.isfinite(record.metrics["loss"])
    for key in record.method_metrics:
        assert "/" in key, f"metric {key} is not namespaced <method>/<quantity>"
