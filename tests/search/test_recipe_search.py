"""haet search recipe: both backends find a cheap synthetic optimum; Ctrl-C keeps what finished;
the recipe objective never reads the test split; the CLI end to end on a tiny budget."""

from __future__ import annotations

import json
import math

import pytest

from haet.search.recipe import SPACES, Var, recipe_overrides, search
from haet.recipes import fast

SPACE = (Var("lr", "log", -3.0, 0.0, -2.5), Var("width", "int", 4, 64, 40))
#: The optimum: lr = 10^-1.5, width = 16; the objective is 1 there and below it elsewhere.
def synthetic(params, report):
    return 1 - (math.log10(params["lr"]) + 1.5) ** 2 - ((params["width"] - 16) / 20) ** 2


@pytest.mark.parametrize("backend,evals", [("nomad", 60), ("optuna", 60)])
def test_both_backends_find_the_optimum_of_a_cheap_objective_within_60_evaluations(backend, evals):
    result = search(synthetic, SPACE, backend=backend, max_evals=evals, seed=0)
    assert len(result["evaluations"]) <= evals and not result["interrupted"]
    best = result["best"]["params"]
    assert abs(math.log10(best["lr"]) + 1.5) < 0.2 and abs(best["width"] - 16) <= 3, best


@pytest.mark.parametrize("backend", ["nomad", "optuna"])
def test_ctrl_c_keeps_every_finished_evaluation_and_reports_the_best(backend):
    calls = []

    def interrupted(params, report):
        calls.append(params)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return synthetic(params, report)

    result = search(interrupted, SPACE, backend=backend, max_evals=50, seed=0)
    assert result["interrupted"] and len(result["evaluations"]) == 3
    assert result["best"]["score"] == max(e["score"] for e in result["evaluations"])


def test_a_point_of_the_space_becomes_recipe_fields():
    base = fast("mnist5k")
    params = {v.name: v.value(v.x0) for v in SPACES["full"]}
    fields = recipe_overrides({**params, "label_smoothing": 0.0}, base)
    assert fields["batch_size"] == 64 and fields["methods"] == "baseline" and fields["augment"] is False
    assert "nesterov=true" in fields["optimizer"]


def test_cli_searches_scores_on_holdout_and_reruns_the_best_as_a_challenge(tmp_path):
    from haet.cli import main

    out = tmp_path / "s"
    assert main(["search", "recipe", "--task", "digits", "--time-budget", "0.3", "--search-budget", "2",
                 "--backend", "optuna", "--space", "small", "--runs", "1", "--out", str(out), "--quiet"]) == 0
    doc = json.loads((out / "search.json").read_text())
    assert len(doc["evaluations"]) == 2 and doc["best"] is not None
    assert json.loads((out / "best" / "score.json").read_text())["split"] == "test"
    record = json.loads((out / "record.json").read_text())
    assert record["method_metrics"]["search/evaluations"] == 2
    assert main(["search", "recipe", "--backend", "grid", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
