"""The HAET 2021 challenge's rules as code.

One submission = a recipe (or a model and methods) trained N times (seeds 0..N-1). Each run:

1. the clock starts, then the data are loaded and prepared, the model is built and trained — all
   of it is wall time counted against the budget;
2. training stops *at* the budget: a step whose expected duration (the last step's) would end
   past it is not started (``Budget(time_s=..., no_overrun=True)``);
3. the model is evaluated once on the test split. The test split never reaches training,
   selection or early stopping; a search scores its candidates on a held-out part of the
   training split instead (``holdout``).

Score = mean test accuracy over the runs, with std, min and max.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.budget import Budget
from ..core.errors import ConfigError
from ..core.optim import make_optimizer
from ..core.record import RunRecord
from ..core.trainer import Trainer, seed_everything
from ..data.loader import TensorData
from ..data.tasks import TASKS, Task
from ..recipes import Recipe, predict
from .data import MINI_IMAGENET10

#: A run's training never goes beyond this many epochs: the time budget is what stops it.
MAX_EPOCHS = 100_000


def challenge_tasks() -> dict[str, Task]:
    """Every classification task haet has (images or signals, cross-entropy), plus mini-imagenet10."""
    tasks = {name: t for name, t in TASKS.items() if t.loss_fn is None and t.eval_fn is None}
    return {**tasks, MINI_IMAGENET10.name: MINI_IMAGENET10}


def get_challenge_task(name: str) -> Task:
    tasks = challenge_tasks()
    if name not in tasks:
        raise ConfigError(f"unknown challenge task {name!r}; choose one of: {', '.join(tasks)}")
    return tasks[name]


@dataclass(frozen=True)
class Rules:
    time_budget_s: float = 10.0   # wall seconds per run: data preparation, model build, training
    runs: int = 5                 # seeds 0..runs-1
    holdout: float = 0.0          # share of the training split held out and scored instead of the test split
    max_steps: int | None = None  # also stop after this many steps (reproducible comparisons; not a challenge rule)

    def __post_init__(self) -> None:
        if isinstance(self.time_budget_s, bool) or not isinstance(self.time_budget_s, (int, float)) \
                or not math.isfinite(self.time_budget_s) or self.time_budget_s <= 0:
            raise ConfigError(f"time budget must be a positive number of seconds, got {self.time_budget_s!r}")
        if isinstance(self.runs, bool) or not isinstance(self.runs, int) or not 1 <= self.runs <= 100:
            raise ConfigError(f"runs must be a whole number in 1..100, got {self.runs!r}")
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int)
                                           or self.max_steps < 1):
            raise ConfigError(f"max_steps must be a positive whole number, got {self.max_steps!r}")
        if not 0 <= self.holdout < 1:
            raise ConfigError(f"holdout must be in [0, 1), got {self.holdout!r}")


def split_holdout(train: TensorData, share: float, seed: int) -> tuple[TensorData, TensorData]:
    """(fit, held out) parts of the training split, a seeded shuffle."""
    n_out = max(1, round(share * len(train)))
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(10_000 + seed))
    keep, out = perm[n_out:], perm[:n_out]
    return TensorData(train.x[keep], train.y[keep]), TensorData(train.x[out], train.y[out])


def run_once(task: Task, recipe: Recipe, rules: Rules, seed: int, *, data_dir: str | None = None,
             device: str = "cpu", out_dir: str | Path | None = None, data=None) -> tuple[RunRecord, torch.nn.Module]:
    """One run under the rules: (record, trained model); the record has ``challenge/accuracy`` (test, or held out with
    ``rules.holdout``), ``challenge/wall_s`` (the budgeted part) and ``challenge/overrun_s``.
    `data` (train, test) skips loading (a test's poisoned set); loading is then not timed."""
    start = time.perf_counter()
    seed_everything(seed)
    train, test = data if data is not None else task.load(seed, data_dir)
    if rules.holdout:
        train, test = split_holdout(train, rules.holdout, seed)
    model = recipe.build_model(task.input_shape, task.num_classes)
    left = rules.time_budget_s - (time.perf_counter() - start)
    trainer = Trainer(model, train, None, optimizer=make_optimizer(recipe.optimizer),
                      methods=recipe.build_methods(), budget=Budget(time_s=max(left, 1e-3), steps=rules.max_steps,
                                                                    no_overrun=True),
                      device=device, seed=seed, progress=False, batch_size=recipe.batch_size,
                      precision=recipe.precision, scheduler=_schedule(recipe, rules, left),
                      task=task.name, model_name=recipe.model_name, label=recipe.name, out_dir=out_dir)
    # Building the Trainer (meters, hardware probes) is the submission's time too: the budget
    # the training gets is what is left now.
    left = rules.time_budget_s - (time.perf_counter() - start)
    trainer.budget = Budget(time_s=max(left, 1e-3), steps=rules.max_steps, no_overrun=True)
    record = trainer.fit(epochs=MAX_EPOCHS)  # the budget stops it (a spent budget still allows one step)
    wall_s = time.perf_counter() - start
    model = trainer.state.unwrapped_model
    x, y = test.x.to(trainer.state.device), test.y.to(trainer.state.device)
    accuracy = float((predict(model, x, tta_flip=recipe.tta_flip).cpu() == test.y).float().mean()) if len(y) else 0.0
    record.metrics = {**record.metrics, "accuracy": accuracy}
    record.method_metrics.update({"challenge/accuracy": accuracy, "challenge/split": "holdout" if rules.holdout else "test",
                                  "challenge/wall_s": wall_s, "challenge/budget_s": rules.time_budget_s,
                                  "challenge/overrun_s": max(0.0, wall_s - rules.time_budget_s)})
    if out_dir is not None:
        record.save(out_dir)
    return record, model


def _schedule(recipe: Recipe, rules: Rules, left: float):
    # Over the time left; over the steps when a step limit makes the run reproducible (the lr then
    # does not depend on how fast the machine happened to be).
    return recipe.schedule() if rules.max_steps else recipe.schedule(max(left, 1e-3))


def score(accuracies: list[float]) -> dict:
    """Mean test accuracy over the runs, with std (sample; 0 for one run), min and max."""
    if not accuracies:
        raise ConfigError("no finished runs to score")
    return {"mean": statistics.fmean(accuracies),
            "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "min": min(accuracies), "max": max(accuracies), "runs": len(accuracies)}
