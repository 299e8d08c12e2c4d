"""``haet search recipe``: run a recipe search and re-run its best point as a challenge.

Writes DIR/search.json (every evaluation: parameters, held-out score, wall time; the best), the
challenge of the best recipe under DIR/best/ (score.json, run records) and DIR/record.json
(``search/...``: evaluations, wall time, training time, energy where metered; the best's test
score under ``challenge/...``).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path


def parse_search_budget(text: str) -> tuple[int, float | None]:
    """``20`` -> (20 evaluations, no time limit); ``600s``/``10m``/``1h`` -> (a large count, seconds)."""
    from ..core.errors import ConfigError

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|min|h)?\s*", str(text))
    if not m:
        raise ConfigError(f"bad --search-budget {text!r}; a number of evaluations (20) or a time (600s, 10m, 1h)")
    value, unit = float(m.group(1)), m.group(2)
    if unit is None:
        if value != int(value) or value < 1:
            raise ConfigError(f"bad --search-budget {text!r}; evaluations must be a whole number >= 1")
        return int(value), None
    seconds = value * {"s": 1, "m": 60, "min": 60, "h": 3600}[unit]
    if seconds <= 0:
        raise ConfigError(f"bad --search-budget {text!r}; the time must be positive")
    return 10_000, seconds


def run_recipe(args) -> int:
    import torch
    from rich.console import Console

    from ..challenge.rules import Rules, get_challenge_task
    from ..challenge.submit import append_leaderboard, submit
    from ..core.errors import ConfigError
    from ..core.record import RunRecord
    from ..recipes import get_recipe
    from .recipe import BACKENDS, get_space, recipe_objective, recipe_overrides, search

    console = Console(stderr=True, quiet=args.quiet)
    max_evals, max_seconds = parse_search_budget(args.search_budget)
    if args.backend not in BACKENDS:
        raise ConfigError(f"unknown --backend {args.backend!r}; choose one of: {', '.join(BACKENDS)}")
    space = get_space(args.space)
    task = get_challenge_task(args.task)
    base = get_recipe(args.recipe, task)
    Rules(time_budget_s=args.time_budget, runs=args.runs, holdout=args.holdout)  # validated before any work
    for name, v in (("eval-runs", args.eval_runs), ("threads", args.threads)):
        if v < 1:
            raise ConfigError(f"--{name} must be a positive integer, got {v}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = {seed: task.load(seed, args.data_dir) for seed in range(args.eval_runs)}
    records: list = []

    def on_eval(e):
        console.print(f"evaluation {e['index'] + 1}: held-out accuracy {e['score']:.4f} "
                      f"({e['wall_s']:.1f} s) {e['params']}", markup=False)

    objective = recipe_objective(task, base, args.time_budget, args.eval_runs, args.holdout, data, args.device, records)
    result = search(objective, space, backend=args.backend, max_evals=max_evals, max_seconds=max_seconds,
                    seed=args.seed, on_eval=on_eval)
    out.mkdir(parents=True, exist_ok=True)
    best = result["best"]
    doc = {"task": task.name, "base_recipe": base.name, "backend": args.backend, "space": args.space,
           "time_budget_s": args.time_budget, "holdout": args.holdout, "eval_runs": args.eval_runs, **result}
    if best is None:
        (out / "search.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
        console.print("no evaluation finished: nothing to re-run", markup=False)
        return 130 if result["interrupted"] else 1
    doc["best_recipe"] = replace(base, **recipe_overrides(best["params"], base)).params()
    (out / "search.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    console.print(f"best held-out accuracy {best['score']:.4f} after {len(result['evaluations'])} evaluations "
                  f"({result['wall_s']:.0f} s); re-running it as a challenge", markup=False)
    recipe = replace(base, name=f"searched-{args.backend}", **recipe_overrides(best["params"], base))
    challenge = submit(task, recipe, Rules(time_budget_s=args.time_budget, runs=args.runs), out / "best",
                       data_dir=args.data_dir, device=args.device)
    append_leaderboard(out / "best" / "leaderboard.md", challenge)
    energy = [r.cost.get("energy_j") for r in records if r.cost.get("energy_j") is not None]
    s = challenge["score"]
    RunRecord(task=task.name, model=recipe.model_name, label=recipe.name, stopped_by="interrupt" if result["interrupted"]
              else "search_budget", metrics={"accuracy": s["mean"]}, budget={"time_s": args.time_budget},
              cost={"train_s": sum(r.cost.get("train_s", 0.0) for r in records)},
              method_metrics={"search/evaluations": len(result["evaluations"]), "search/wall_s": result["wall_s"],
                              "search/best_holdout_accuracy": best["score"], "search/backend": args.backend,
                              "search/energy_j": sum(energy) if energy else None,
                              "search/energy_source": records[0].cost.get("energy_source") if energy else None,
                              "challenge/score_mean": s["mean"], "challenge/score_std": s["std"],
                              "challenge/score_min": s["min"], "challenge/score_max": s["max"]}).save(out)
    print(f"searched recipe: test score {s['mean']:.4f} ± {s['std']:.4f} over {s['runs']} runs; "
          f"search: {len(result['evaluations'])} evaluations, {result['wall_s']:.0f} s")
    print(f"search: {out / 'search.json'}\nchallenge: {out / 'best' / 'score.json'}")
    return 130 if result["interrupted"] else 0
