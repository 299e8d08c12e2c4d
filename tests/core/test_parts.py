"""Budget parsing, config parsing, surgery, the loader and the RunRecord schema."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import pytest
import torch
from torch import nn

from haet import Budget, ConfigError, RunRecord, TensorData
from haet.core.config import check_choice, check_range, parse_params
from haet.core.surgery import replace_modules
from haet.data import Loader


# -- budget ------------------------------------------------------------------------------------
def test_budget_parse_units():
    b = Budget.parse("time=2m,energy=1.5kJ,steps=1000,flops=1e12,mem=1GB")
    assert b == Budget(time_s=120.0, energy_j=1500.0, steps=1000, flops=1e12, peak_mem_mb=1024.0)
    assert Budget.parse("time=60s,energy=200J,mem=512MB") == Budget(time_s=60, energy_j=200, peak_mem_mb=512)
    assert Budget.parse("flops=2T").flops == 2e12


@pytest.mark.parametrize("text,match", [
    ("time=abc", "bad budget value time='abc'"), ("speed=3", "key one of: time, energy, steps, flops, mem"),
    ("steps=1.5", "whole number"), ("time=-1s", "bad budget value"), ("time=1s,time=2s", "given twice"),
    ("energy=5W", "unit one of"), ("steps=0", "must be a positive number"),
])
def test_budget_parse_errors_name_the_bad_item(text, match):
    with pytest.raises(ConfigError, match=match):
        Budget.parse(text)


def test_budget_exhausted_names_the_first_limit():
    b = Budget(time_s=10, steps=5)
    kw = dict(train_s=1.0, energy_j=0.0, steps=1, flops=0.0, peak_mem_mb=None)
    assert b.exhausted(kw) is None
    assert b.exhausted({**kw, "steps": 5}) == "steps"
    assert b.exhausted({**kw, "train_s": 10.0}) == "time"
    assert b.needs() == {"steps", "train_s"}


# -- config ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cfg:
    fraction: float = 0.3
    every: int = 1
    mode: Literal["backward", "forward"] = "backward"
    flag: bool = False
    ranks: tuple[int, ...] = (4, 4)
    label: str | None = None

    def __post_init__(self):
        check_range("fraction", self.fraction, 0, 1, lo_open=True)
        check_range("every", self.every, 1, None, integer=True)
        check_choice("mode", self.mode, ("backward", "forward"))


def test_parse_params_converts_by_annotation():
    c = parse_params(Cfg, {"fraction": "0.5", "every": "3", "mode": "forward", "flag": "true", "ranks": "2/3/4",
                           "label": "none"}, owner="m")
    assert c == Cfg(0.5, 3, "forward", True, (2, 3, 4), None)


@pytest.mark.parametrize("raw,match", [
    ({"fraction": "1.5"}, r"m: fraction must be a number in \(0, 1\], got 1.5"),
    ({"fraction": "x"}, "m:fraction must be a number, got 'x'"),
    ({"every": "0"}, r"every must be an integer in \[1, inf\]"),
    ({"every": "2.5"}, "m:every must be an integer"),
    ({"mode": "sideways"}, "m:mode must be one of backward, forward, got 'sideways'"),
    ({"flag": "maybe"}, "must be true or false"),
    ({"nope": "1"}, "unknown parameter 'nope' for m; choose from: fraction, every, mode, flag, ranks, label"),
])
def test_parse_params_errors_name_the_parameter_and_allowed_values(raw, match):
    with pytest.raises(ConfigError, match=match):
        parse_params(Cfg, raw, owner="m")


# -- surgery -----------------------------------------------------------------------------------
def test_replace_modules_keeps_optimizer_in_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.Adam([{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.2}])
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    kept_state = {k: v.clone() for k, v in opt.state[model[0].weight].items()}

    class State:
        model_version = 0

    st = State()
    names = replace_modules(model, opt, lambda n, m: nn.Linear(8, 2) if n == "2" else None, state=st)
    assert names == ["2"] and st.model_version == 1
    params = [set(map(id, g["params"])) for g in opt.param_groups]
    assert params[0] == {id(model[0].weight), id(model[0].bias)}
    assert params[1] == {id(model[2].weight), id(model[2].bias)}  # the new layer took the old one's group
    assert all(torch.equal(opt.state[model[0].weight][k], v) for k, v in kept_state.items())
    assert len(opt.state) == 2  # state of the replaced parameters is gone
    model(torch.randn(3, 4)).sum().backward()
    opt.step()  # and the optimizer still works

    with pytest.warns(UserWarning, match="no module of the model matched"):
        assert replace_modules(model, opt, lambda n, m: None) == []


# -- loader ------------------------------------------------------------------------------------
def test_loader_order_depends_only_on_seed_and_epoch_and_covers_all():
    data = TensorData(torch.arange(100).float().unsqueeze(1), torch.arange(100))
    a = torch.cat([y for _, y in Loader(data, 32, seed=3).set_epoch(2)])
    b = torch.cat([y for _, y in Loader(data, 32, seed=3).set_epoch(2)])
    c = torch.cat([y for _, y in Loader(data, 32, seed=3).set_epoch(3)])
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sorted(a.tolist()) == list(range(100)) and len(Loader(data, 32)) == 4


def test_loader_subsets_weights_and_shards():
    data = TensorData(torch.arange(100).float().unsqueeze(1), torch.arange(100))
    idx = torch.tensor([5, 7, 9, 11])
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    batches = list(Loader(data, 3, indices=idx, weights=w, shuffle=False))
    assert [b[1].tolist() for b in batches] == [[5, 7, 9], [11]]
    assert batches[0][2].tolist() == [1.0, 2.0, 3.0]
    shards = [torch.cat([y for _, y in Loader(data, 10, seed=1, rank=r, world_size=3)]) for r in range(3)]
    assert all(len(s) == 33 for s in shards)
    assert len(set().union(*[set(s.tolist()) for s in shards])) == 99  # disjoint


# -- record ------------------------------------------------------------------------------------
DESIGN_KEYS = ["schema", "haet_version", "task", "model", "methods", "seed", "device", "hardware", "epochs", "steps",
               "stopped_by", "metrics", "history", "cost", "method_metrics"]
DESIGN_COST = ["wall_s", "train_s", "eval_s", "phases_s", "peak_mem_mb", "memory_bytes", "flops", "mfu", "energy_j",
               "energy_source"]


def test_record_has_the_design_schema_and_round_trips(trainer_factory, tmp_path):
    record = trainer_factory(out_dir=tmp_path, task="tiny", model_name="tiny-cnn").fit(epochs=1)
    d = json.loads((tmp_path / "record.json").read_text())
    assert list(d)[:2] == ["schema", "haet_version"] and d["schema"] == 1
    assert set(DESIGN_KEYS) <= set(d) and set(DESIGN_COST) <= set(d["cost"])
    assert set(d["cost"]["phases_s"]) == {"data", "forward", "backward", "optimizer", "methods"}
    assert set(d["cost"]["memory_bytes"]) == {"params", "grads", "optimizer", "activations"}
    assert set(d["hardware"]) >= {"cpu", "gpu", "threads", "torch"}
    assert d["methods"] == [] and d["stopped_by"] == "epochs" and d["task"] == "tiny"
    assert RunRecord.load(tmp_path).to_dict() == record.to_dict()


def test_record_json_has_no_nan_and_bad_records_are_clear_errors(tmp_path):
    r = RunRecord(metrics={"loss": float("nan")})
    assert r.to_dict()["metrics"]["loss"] is None
    (tmp_path / "record.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a valid record"):
        RunRecord.load(tmp_path)
    (tmp_path / "record.json").write_text('{"schema": 99}')
    with pytest.raises(ConfigError, match="schema 99 is not supported"):
        RunRecord.load(tmp_path)
