"""Every registered method trains for two steps inside the Trainer, on the main job's setting."""

from __future__ import annotations

import math

import pytest

import haet
from haet.methods import PLANNED, get_method_class, parse_entry, registry
from haet.models import build_model

METHODS = list(registry())


def test_registry_names_come_from_the_design_table():
    assert set(registry()) <= set(PLANNED), "a method name that is not in DESIGN.md's table"


@pytest.mark.parametrize("name", METHODS)
def test_method_trains_two_steps_on_mnist5k(name, mnist5k):
    cls = get_method_class(name)
    assert cls.summary and cls.paper, f"{name} needs a summary and a paper for `haet methods`"
    train, test = mnist5k
    haet.seed_everything(0)
    model = build_model("mnist5k-cnn", (1, 28, 28), 10)
    record = haet.Trainer(model, train, test, methods=parse_entry(name), budget=haet.Budget(steps=2),
                          progress=False).fit(epochs=1)
    assert record.steps == 2 and record.stopped_by == "budget:steps"
    assert record.methods[0]["name"] == name
    assert math.isfinite(record.metrics["loss"])
    for key in record.method_metrics:
        assert "/" in key, f"metric {key} is not namespaced <method>/<quantity>"
