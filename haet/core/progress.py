"""The training progress bar (rich): epoch, steps, loss, accuracy, elapsed time, budget left."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .budget import Budget


class TrainProgress:
    def __init__(self, state, budget: Budget) -> None:
        self.state, self.budget = state, budget
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}"), TimeElapsedColumn(),
            TextColumn("{task.fields[budget]}"),
            console=Console(file=sys.stderr), transient=False)
        self._task = None
        self._epoch = None

    def __enter__(self) -> "TrainProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._show_accuracy()
        self.progress.__exit__(*exc)

    def _show_accuracy(self) -> None:
        """Put the evaluation that followed the finished epoch on its line."""
        acc = self.state.eval_metrics.get("accuracy")
        if self._task is not None and acc is not None:
            self.progress.update(self._task, acc=f"{acc:.3f}")

    def advance(self, loss: float) -> None:
        state = self.state
        if self._epoch != state.epoch:
            self._epoch = state.epoch
            try:
                total = len(state.train_loader)
            except TypeError:
                total = None
            self._show_accuracy()
            fields = {"epoch": f"{state.epoch}/{state.epochs}", "loss": "-", "acc": "-", "budget": ""}
            self._task = self.progress.add_task("train", total=total, **fields)
        self.progress.update(self._task, advance=1, loss=f"{loss:.4f}", budget=self._budget_left())

    def _budget_left(self) -> str:
        b, state = self.budget, self.state
        parts = []
        if b.time_s is not None:
            parts.append(f"time left {max(0.0, b.time_s - state.clock.train_s):.0f}s")
        if b.steps is not None:
            parts.append(f"steps left {max(0, b.steps - state.step)}")
        if b.energy_j is not None:
            parts.append(f"energy left {max(0.0, b.energy_j - state.meters['energy'].readings(state)['energy_j']):.3g}J")
        if b.flops is not None:
            parts.append(f"FLOPs left {max(0.0, b.flops - state.meters['flops'].readings(state)['flops']):.3g}")
        return "  ".join(parts)
