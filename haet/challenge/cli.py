"""``haet challenge``: the HAET 2021 challenge's rules as code.

    haet challenge --task mnist5k --recipe fast --time-budget 10 --runs 5 --out DIR
                   [--model M] [--method SPEC] [--optimizer SPEC] [--batch-size N]
                   [--data-dir D] [--leaderboard FILE] [--label NAME]

Writes DIR/run-<seed>/record.json for every run, DIR/score.json (mean test accuracy over the runs
with std, min, max and every run), DIR/record.json and appends one line to DIR/leaderboard.md (or
to --leaderboard FILE).
"""

from __future__ import annotations

import argparse
import sys

HELP = "the HAET challenge: best test accuracy when training is stopped at a time budget, mean of N runs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="mnist5k", help="a classification task of `haet tasks`, or mini-imagenet10")
    parser.add_argument("--recipe", default="baseline", help="baseline (Adam 1e-3, batch 64) or fast (haet.recipes.fast)")
    parser.add_argument("--model", help="replace the recipe's model (a name of `haet models`)")
    parser.add_argument("--method", help="replace the recipe's methods: NAME[:k=v][+NAME...]")
    parser.add_argument("--optimizer", help="replace the recipe's optimizer, e.g. sgd:lr=0.1,momentum=0.9")
    parser.add_argument("--batch-size", type=int, help="replace the recipe's batch size")
    parser.add_argument("--time-budget", type=float, default=10.0, help="wall seconds per run (default 10)")
    parser.add_argument("--runs", type=int, default=5, help="runs, seeds 0..N-1 (default 5)")
    parser.add_argument("--data-dir", help="files of tasks that need them (mini-imagenet10: .npy arrays or PNG folders)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--out", required=True, help="directory for score.json, record.json and run-<seed>/")
    parser.add_argument("--leaderboard", help="markdown file to append the submission's line to (default DIR/leaderboard.md)")
    parser.add_argument("--label", help="the submission's name on the leaderboard (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: timings on a shared machine)")
    parser.add_argument("--quiet", action="store_true")


def build_recipe(args, task):
    from ..core.errors import ConfigError
    from ..core.optim import make_optimizer
    from ..methods import parse_entry
    from ..models import MODELS
    from ..recipes import get_recipe

    overrides: dict = {}
    if args.model:
        if args.model not in MODELS:
            raise ConfigError(f"unknown model {args.model!r}; choose one of: {', '.join(MODELS)}")
        overrides["model_name"] = args.model
    if args.method:
        parse_entry(args.method)  # validated now: nothing is written for a bad spec
        overrides["methods"] = args.method
    if args.optimizer:
        make_optimizer(args.optimizer)
        overrides["optimizer"] = args.optimizer
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size must be a positive integer, got {args.batch_size}")
        overrides["batch_size"] = args.batch_size
    return get_recipe(args.recipe, task, **overrides)


def run(args) -> int:
    from rich.console import Console

    from ..core.errors import ConfigError
    from .rules import Rules, get_challenge_task
    from .submit import append_leaderboard, submit

    console = Console(stderr=True, quiet=args.quiet)
    if args.threads < 1:
        raise ConfigError(f"--threads must be a positive integer, got {args.threads}")
    task = get_challenge_task(args.task)
    if task.needs_data_dir and not args.data_dir:
        raise ConfigError(f"task {task.name} needs --data-dir")
    rules = Rules(time_budget_s=args.time_budget, runs=args.runs)
    recipe = build_recipe(args, task)
    label = args.label or (recipe.name if not (args.model or args.method or args.optimizer or args.batch_size)
                           else f"{recipe.name} (modified)")

    def on_run(seed, record):
        mm = record.method_metrics
        console.print(f"run {seed + 1}/{rules.runs}: test accuracy {mm['challenge/accuracy']:.4f}, "
                      f"{record.steps} steps, wall {mm['challenge/wall_s']:.2f} s of {rules.time_budget_s:g} s",
                      markup=False)

    import torch

    torch.set_num_threads(args.threads)
    console.print(f"{label} on {task.name}: {rules.runs} runs of {rules.time_budget_s:g} s", markup=False)
    doc = submit(task, recipe, rules, args.out, data_dir=args.data_dir, device=args.device, label=label, on_run=on_run)
    board = append_leaderboard(args.leaderboard or f"{args.out}/leaderboard.md", doc)
    s = doc["score"]
    print(f"score: {s['mean']:.4f} ± {s['std']:.4f} (min {s['min']:.4f}, max {s['max']:.4f}, {s['runs']} runs)")
    print(f"score: {args.out}/score.json\nleaderboard: {board}")
    return 130 if doc["interrupted"] else 0
