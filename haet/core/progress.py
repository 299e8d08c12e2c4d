"""The training progress bar (rich): epoch, batches, loss, accuracy, elapsed time, budget left.

On a terminal: one live line per epoch, laid out to fit 80 columns (a short bar, compact fields;
the budget's remainder goes last and is the only field cut when the terminal is narrower). When
output is piped or written to a file, no live display (its control codes make logs unreadable):
one plain line per finished epoch instead.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column

from .budget import Budget


class TrainProgress:
    def __init__(self, state, budget: Budget, console: Console | None = None) -> None:
        self.state, self.budget = state, budget
        self.console = console or Console(file=sys.stderr)
        self.live = self.console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(bar_width=16), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]} {task.fields[acc]}"), TimeElapsedColumn(),
            TextColumn("{task.fields[budget]}", table_column=Column(no_wrap=True, overflow="ellipsis")),
            console=self.console, transient=False, disable=not self.live)
        self._task = None
        self._epoch = None
        self._loss = None
        self._step = 0
        self._start = time.perf_counter()

    def __enter__(self) -> "TrainProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._end_epoch()
        self.progress.__exit__(*exc)

    def _headline(self) -> str:
        """The headline of the last evaluation: accuracy, or a generative task's NLL in nats."""
        metrics = self.state.eval_metrics
        if isinstance(metrics.get("nll"), float) and "accuracy" not in metrics:
            return f"nll {metrics['nll']:.2f}"
        acc = metrics.get("accuracy")
        return f"acc {acc:.3f}" if isinstance(acc, float) else "acc -"

    def _end_epoch(self) -> None:
        """Put the evaluation that followed the finished epoch on its line (or print the line)."""
        if self._task is None:
            return
        if self.live:
            self.progress.update(self._task, acc=self._headline())
        else:
            loss = "-" if self._loss is None else f"{self._loss:.4f}"
            left = self._budget_left()
            self.console.print(f"epoch {self._epoch}/{self.state.epochs}  step {self._step}  loss {loss}  "
                               f"{self._headline()}  {time.perf_counter() - self._start:.1f}s"
                               + (f"  {left}" if left else ""), soft_wrap=True, highlight=False)

    def advance(self, loss: float) -> None:
        state = self.state
        if self._epoch != state.epoch:
            self._end_epoch()
            self._epoch = state.epoch
            try:
                total = len(state.train_loader)
            except TypeError:
                total = None
            fields = {"epoch": f"{state.epoch}/{state.epochs}", "loss": "-", "acc": "acc -", "budget": ""}
            self._task = self.progress.add_task("train", total=total, **fields)
        self._loss, self._step = loss, state.step
        if self.live:
            self.progress.update(self._task, advance=1, loss=f"{loss:.4f}", budget=self._budget_left())

    def _budget_left(self) -> str:
        b, state = self.budget, self.state
        parts = []
        if b.time_s is not None:
            parts.append(f"{max(0.0, b.time_s - state.clock.train_s):.0f}s")
        if b.steps is not None:
            parts.append(f"{max(0, b.steps - state.step)} steps")
        if b.energy_j is not None:
            parts.append(f"{max(0.0, b.energy_j - state.meters['energy'].readings(state)['energy_j']):.3g}J")
        if b.flops is not None:
            parts.append(f"{max(0.0, b.flops - state.meters['flops'].readings(state)['flops']):.2g} FLOPs")
        return "left " + ", ".join(parts) if parts else ""
