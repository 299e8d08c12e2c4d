"""Budgeted recipe search (paper 17, "Efficient training under limited resources"): architecture
(width), hyperparameters (lr, momentum, weight decay, batch size, label smoothing) and augmentation
searched by a blackbox solver, each evaluation a challenge run under the time budget scored on a
held-out part of the *training* split (never the test split).

Backends: NOMAD (PyNomadBBO, the mesh-adaptive direct search paper 17 used; mixed integer/real
variables) and optuna (TPE; an evaluation of several runs is pruned when its first runs fall
behind the median). `search` is the engine-agnostic part, usable with any objective.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

from ..core.errors import ConfigError

BACKENDS = ("nomad", "optuna")


@dataclass(frozen=True)
class Var:
    name: str
    kind: str        # "real", "log" (real, searched in log10), "int"
    lo: float
    hi: float
    x0: float        # the starting point (NOMAD) — the fast recipe's value

    def value(self, x: float):
        if self.kind == "int":
            return int(round(x))
        return 10 ** x if self.kind == "log" else float(x)


#: Named search spaces over the fast recipe's fields (log variables in log10 units).
SPACES: dict[str, tuple[Var, ...]] = {
    "small": (Var("lr", "log", -2.5, -0.3, -1.0), Var("batch_log2", "int", 5, 8, 6)),
    "default": (Var("lr", "log", -2.5, -0.3, -1.0), Var("momentum", "real", 0.8, 0.98, 0.9),
                Var("weight_decay", "log", -5.0, -2.0, math.log10(5e-4)), Var("batch_log2", "int", 5, 8, 6),
                Var("label_smoothing", "real", 0.0, 0.3, 0.1), Var("width", "int", 8, 32, 16)),
}
SPACES["full"] = SPACES["default"] + (Var("augment", "int", 0, 1, 0),)


def get_space(name: str) -> tuple[Var, ...]:
    if name not in SPACES:
        raise ConfigError(f"unknown search space {name!r}; choose one of: {', '.join(SPACES)}")
    return SPACES[name]


def search(objective: Callable[[dict, Callable[[int, float], bool]], float], space: tuple[Var, ...], *,
           backend: str, max_evals: int, max_seconds: float | None = None, seed: int = 0,
           on_eval: Callable[[dict], None] | None = None) -> dict:
    """Maximize ``objective(params, report)`` over `space` with `backend`, for at most `max_evals`
    evaluations (and `max_seconds` of wall time). ``report(step, value)`` lets an objective report
    intermediate values; it returns True when the evaluation should stop (pruned). Ctrl-C ends the
    search and keeps every finished evaluation. Returns {"evaluations", "best", "interrupted", "wall_s"}."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown search backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 1:
        raise ConfigError(f"the search budget must be a positive number of evaluations, got {max_evals!r}")
    evaluations: list[dict] = []
    start = time.perf_counter()
    state = {"interrupted": False}

    def out_of_budget() -> bool:
        return state["interrupted"] or len(evaluations) >= max_evals or \
            (max_seconds is not None and time.perf_counter() - start >= max_seconds)

    def evaluate(params: dict, report) -> float | None:
        t0 = time.perf_counter()
        try:
            value = float(objective(params, report))
        except KeyboardInterrupt:
            state["interrupted"] = True
            return None
        entry = {"index": len(evaluations), "params": params, "score": value, "wall_s": time.perf_counter() - t0}
        evaluations.append(entry)
        if on_eval is not None:
            on_eval(entry)
        return value

    try:
        (_nomad if backend == "nomad" else _optuna)(evaluate, space, max_evals, out_of_budget, seed)
    except KeyboardInterrupt:
        state["interrupted"] = True
    finite = [e for e in evaluations if math.isfinite(e["score"])]
    best = max(finite, key=lambda e: e["score"]) if finite else None
    return {"evaluations": evaluations, "best": best, "interrupted": state["interrupted"],
            "wall_s": time.perf_counter() - start, "backend": backend}


def _nomad(evaluate, space, max_evals, out_of_budget, seed) -> None:
    try:
        import PyNomad
    except ImportError:
        raise ConfigError("the nomad backend needs the search extra: pip install 'haet[search]'") from None

    ints = [v.kind == "int" for v in space]

    def bb(point) -> int:
        if out_of_budget():
            return 0  # a failed evaluation: NOMAD moves on without spending time
        x = [point.get_coord(i) for i in range(point.size())]
        params = {v.name: v.value(xi) for v, xi in zip(space, x)}
        value = evaluate(params, lambda step, v: False)
        if value is None:
            return 0
        point.setBBO(str(-value).encode("UTF-8"))  # NOMAD minimizes
        return 1

    params = ["BB_OUTPUT_TYPE OBJ", f"MAX_BB_EVAL {max_evals}", f"SEED {seed}", "DISPLAY_DEGREE 0",
              "BB_INPUT_TYPE (" + " ".join("I" if i else "R" for i in ints) + ")"]
    PyNomad.optimize(bb, [v.x0 for v in space], [v.lo for v in space], [v.hi for v in space], params)


def _optuna(evaluate, space, max_evals, out_of_budget, seed) -> None:
    try:
        import optuna
    except ImportError:
        raise ConfigError("the optuna backend needs the search extra: pip install 'haet[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3))
    study.enqueue_trial({v.name: (v.value(v.x0) if v.kind == "log" else v.value(v.x0)) for v in space})

    def objective(trial):
        params = {}
        for v in space:
            if v.kind == "int":
                params[v.name] = trial.suggest_int(v.name, int(v.lo), int(v.hi))
            else:
                lo, hi = (10 ** v.lo, 10 ** v.hi) if v.kind == "log" else (v.lo, v.hi)
                params[v.name] = trial.suggest_float(v.name, lo, hi, log=v.kind == "log")

        def report(step: int, value: float) -> bool:
            trial.report(value, step)
            return trial.should_prune()

        value = evaluate(params, report)
        if value is None:
            trial.study.stop()
            raise optuna.TrialPruned()
        if out_of_budget():
            trial.study.stop()
        return value

    study.optimize(objective, n_trials=max_evals, catch=())


# -- the recipe objective ----------------------------------------------------------------------
def recipe_overrides(params: dict, base) -> dict:
    """A point of the space -> fields of the base recipe to replace."""
    out: dict = {}
    if "lr" in params:
        m = params.get("momentum", 0.9)
        wd = params.get("weight_decay", 5e-4)
        out["optimizer"] = f"sgd:lr={params['lr']:.6g},momentum={m:.6g},nesterov=true,weight_decay={wd:.6g}"
        out["max_lr"] = float(f"{params['lr']:.6g}")
    if "batch_log2" in params:
        out["batch_size"] = 2 ** int(params["batch_log2"])
    if "label_smoothing" in params:
        others = [s for s in base.methods.split("+") if s.split(":")[0] not in ("label_smoothing", "baseline")]
        ls = params["label_smoothing"]
        out["methods"] = "+".join(([f"label_smoothing:smoothing={ls:.4g}"] if ls > 1e-3 else []) + others) or "baseline"
    if "width" in params:
        out["width"] = int(params["width"])
    if "augment" in params:
        out["augment"] = bool(params["augment"])
    return out


def recipe_objective(task, base, time_budget_s: float, runs: int, holdout: float, data: dict,
                     device: str = "cpu", records: list | None = None):
    """The objective of a recipe search: mean held-out accuracy of `runs` challenge runs (seeds
    0..runs-1) of `base` with a candidate's fields; `data[seed]` is the (train, test) of the seed,
    of which only train is read."""
    from dataclasses import replace

    from ..challenge.rules import Rules, run_once

    rules = Rules(time_budget_s=time_budget_s, runs=runs, holdout=holdout)

    def objective(params: dict, report) -> float:
        recipe = replace(base, **recipe_overrides(params, base))
        accs = []
        for seed in range(runs):
            train, _test = data[seed]
            record, _ = run_once(task, recipe, rules, seed, device=device, data=(train, None))
            accs.append(record.method_metrics["challenge/accuracy"])
            if records is not None:
                records.append(record)
            if report(seed, sum(accs) / len(accs)) and seed + 1 < runs:
                break  # pruned: behind the median
        return sum(accs) / len(accs)

    return objective
