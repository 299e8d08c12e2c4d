"""The Trainer: one readable loop that fires events to methods and meters.

    trainer = Trainer(model, train_data, eval_data, methods=[...], budget=Budget(time_s=600))
    record = trainer.fit(epochs=20)

The loop knows nothing of any particular method. Methods change the batch, the loss, the model or
the optimizer step through the state they receive with each event (`haet.core.events`); meters
listen after the methods and report what the run cost. `fit` returns a `RunRecord`.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from .. import __version__
from ..data.loader import Loader, TensorData, epoch_generator
from ..meters import Meter, default_meters
from . import checkpoint, distributed, files
from .budget import Budget
from .clock import PhaseClock
from .errors import ConfigError
from .events import Event
from .method import Method
from .record import RunRecord, hardware_info
from .state import State


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived during a run: it stops as on Ctrl-C and keeps its record ("terminated")."""


def on_sigterm(action: Callable[[], bool] | None = None) -> Callable[[], None]:
    """Handle SIGTERM in the main thread until the returned function restores the previous handler
    (installed only while a run is active, never at import). ``action()`` is called (a run asks
    its loop to stop after the current batch); without one, or when it returns False (a second
    SIGTERM), `Terminated` is raised where the program is."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        if action is None or not action():
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {str(device)!r} is not supported; choose one of: auto, cpu, cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available; use --device auto or cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {str(device)!r} is not supported; choose one of: auto, cpu, cuda")
    return device


class Trainer:
    """Train `model` on `train_data`, measuring time, memory, FLOPs and energy.

    Args:
        model: any ``nn.Module``.
        train_data: a `TensorData` (fastest), any map-style ``Dataset`` of (x, y), or a re-iterable
            of (x, y) batches (a list, a DataLoader), used as given each epoch.
        eval_data: evaluated after each epoch and at the end, same kinds as `train_data`.
        loss_fn: ``loss_fn(outputs, targets)``; default cross-entropy. For weighted batches
            (x, y, w) it is called with ``reduction="none"``.
        optimizer: an optimizer over ``model``'s parameters, or a callable ``params -> optimizer``;
            default Adam(lr=1e-3).
        methods: `Method` instances, notified in the order given.
        budget: a `Budget`; the run stops at the first exhausted limit.
        meters: the meters to use; default time, memory, FLOPs and energy.
        device: "auto" (CUDA when available), "cpu" or "cuda".
        seed: seeds Python, numpy and torch at the start of `fit` and the data order.
        progress: show a progress bar (on rank 0).
        batch_size: samples per batch when the Trainer batches the data itself.
        eval_fn: ``eval_fn(model, eval_data, device) -> dict`` replacing the default
            classification metrics (accuracy, loss).
        out_dir: when given, ``metrics.jsonl`` gets one line per epoch and ``record.json`` the
            record (rank 0 only); with ``checkpoint=True`` also ``checkpoint.pt`` each epoch.
        task, model_name, label: names for the record (label: how the methods were asked for).
    """

    def __init__(self, model: nn.Module, train_data: Any, eval_data: Any = None, *,
                 loss_fn: Callable | None = None,
                 optimizer: torch.optim.Optimizer | Callable[[Iterable], torch.optim.Optimizer] | None = None,
                 methods: Sequence[Method] = (), budget: Budget | None = None,
                 meters: Sequence[Meter] | None = None, device: str | torch.device = "auto", seed: int = 0,
                 progress: bool = True, batch_size: int = 64, eval_fn: Callable | None = None,
                 out_dir: str | Path | None = None, checkpoint: bool = False,
                 task: str | None = None, model_name: str | None = None, label: str | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.methods = list(methods)
        _check_methods(self.methods)
        self.budget = budget or Budget()
        if not isinstance(self.budget, Budget):
            raise ConfigError(f"budget must be a haet.Budget, got {type(self.budget).__name__}")
        self.meters = list(default_meters() if meters is None else meters)
        meter_names = {m.name for m in self.meters}
        for field, meter in (("energy_j", "energy"), ("flops", "flops"), ("peak_mem_mb", "memory")):
            if getattr(self.budget, field) is not None and meter not in meter_names:
                raise ConfigError(f"a budget on {field} needs the {meter} meter")

        device = resolve_device(device)
        self.rank, self.world_size = distributed.init(device)
        if device.type == "cuda" and self.world_size > 1:
            device = torch.device("cuda", distributed.env_world()[2])
        model.to(device)
        if optimizer is None:
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        elif not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer(model.parameters())
        _check_train_data(train_data)
        self.eval_data, self.eval_fn = eval_data, eval_fn
        self.batch_size, self.seed, self.progress = batch_size, seed, progress and self.rank == 0
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.checkpoint = checkpoint
        if checkpoint and self.out_dir is None:
            raise ConfigError("checkpoint=True needs an out_dir to write checkpoint.pt into")
        self.task, self.model_name = task, model_name or type(model).__name__
        self.label = label or "+".join(m.name for m in self.methods) or "baseline"
        self.state = State(model=model, optimizer=optimizer, loss_fn=loss_fn or nn.functional.cross_entropy,
                           device=device, seed=seed, clock=PhaseClock(device), train_data=train_data,
                           batch_size=batch_size, rank=self.rank, world_size=self.world_size,
                           meters={m.name: m for m in self.meters})
        self.history: list[dict] = []
        self.record: RunRecord | None = None
        self.record_path: Path | None = None  # set once record.json is written
        self._ddp: nn.Module | None = None
        self._method_handlers: dict[Event, list] = {}
        self._meter_handlers: dict[Event, list] = {}

    # ------------------------------------------------------------------------------------------
    def fit(self, epochs: int, *, resume_from: str | Path | None = None) -> RunRecord:
        """Train for `epochs` epochs in total (a resumed run continues to that count)."""
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"epochs must be a positive integer, got {epochs!r}")
        state = self.state
        state.epochs = epochs
        self._method_handlers = {e: [] for e in Event}
        self._meter_handlers = {e: [] for e in Event}
        for listener, table in [(m, self._method_handlers) for m in self.methods] + \
                               [(m, self._meter_handlers) for m in self.meters]:
            for event, fn in listener.handlers().items():
                table[event].append(fn)

        payload = checkpoint.load(resume_from) if resume_from is not None else None
        seed_everything(self.seed)
        self._fire(Event.FIT_START)  # methods may transform the model here (before any checkpoint loads)
        first_epoch = 1
        if payload is not None:
            try:
                first_epoch = self._restore(payload) + 1
            except ConfigError:
                raise
            except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as err:
                first_line = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
                raise ConfigError(f"the checkpoint in {resume_from} does not fit this run: {first_line}") from None
        if self.world_size > 1:
            self._ddp = nn.parallel.DistributedDataParallel(
                state.model, device_ids=[state.device.index] if state.device.type == "cuda" else None)

        stopped_by = "epochs"
        evaluated_at_step = -1
        restore_sigterm = on_sigterm(self._stop_on_sigterm)
        try:
            with self._progress_bar() as bar:
                for epoch in range(first_epoch, epochs + 1):
                    state.epoch = epoch
                    state.train_loader = self._epoch_batches(epoch)
                    state.clock.start()
                    self._fire(Event.EPOCH_START)
                    train_loss = self._train_epoch(bar)
                    self._fire(Event.EPOCH_END)
                    state.clock.pause("methods")
                    line = {"epoch": epoch, "step": state.step, "train_loss": train_loss,
                            "train_s": state.clock.train_s}
                    line.update(self._evaluate())
                    evaluated_at_step = state.step
                    for method in self.methods:
                        line.update(method.epoch_metrics())
                    self._end_epoch(line)
                    if state.stop_reason is not None:
                        stopped_by = state.stop_reason
                        break
        except KeyboardInterrupt as stop:
            stopped_by = "terminated" if isinstance(stop, Terminated) else "interrupt"
        except Exception as err:
            restore_sigterm()
            state.clock.pause("methods")
            self._finish("error", evaluated_at_step, error=f"{type(err).__name__}: {err}")
            raise
        finally:
            restore_sigterm()
            self._ddp = None  # release DDP's reducer (and its communication threads) with the run
        return self._finish(stopped_by, evaluated_at_step)

    # -- the loop ------------------------------------------------------------------------------
    def _train_epoch(self, bar) -> float | None:
        state, clock = self.state, self.state.clock
        model = self._ddp or state.model
        model.train()
        fire = self._fire
        loss_sum, batches = 0.0, 0
        budget_check = self._budget_check()
        for batch in state.train_loader:
            state.batch = self._to_device(batch)
            clock.lap("data")
            fire(Event.BATCH_START)
            x, y, *weights = state.batch
            state.outputs = model(x)
            state.loss = self._loss(state.outputs, y, weights[0] if weights else None)
            clock.lap("forward")
            fire(Event.AFTER_FORWARD)
            loss_value = state.loss.item()
            if not math.isfinite(loss_value):
                state.request_stop("nonfinite_loss")  # before backward: the weights stay finite
            else:
                state.loss.backward()
                clock.lap("backward")
                fire(Event.AFTER_BACKWARD)
                (state.step_fn or state.optimizer.step)()
                (state.zero_grad_fn or state.optimizer.zero_grad)()
                clock.lap("optimizer")
                state.step += 1
                state.samples_seen += len(y)
                loss_sum += loss_value
                batches += 1
                fire(Event.AFTER_STEP)
                if budget_check is not None:
                    budget_check()
                fire(Event.BATCH_END)
                if bar is not None:
                    bar.advance(loss_value)
            if self.world_size > 1:
                state.stop_reason = distributed.agree_stop(state.stop_reason, state.device)
            if state.stop_reason is not None:
                break
            state.batch_index += 1
        state.batch_index = 0
        state.batch = state.outputs = state.loss = None
        return loss_sum / batches if batches else None

    def _fire(self, event: Event) -> None:
        handlers = self._method_handlers[event]
        if handlers:
            for fn in handlers:
                fn(self.state)
            if self.state.clock.running:
                self.state.clock.lap("methods")
        for fn in self._meter_handlers[event]:
            fn(self.state)

    def _loss(self, outputs, y, weights):
        if weights is None:
            return self.state.loss_fn(outputs, y)
        try:
            per_sample = self.state.loss_fn(outputs, y, reduction="none")
        except TypeError:
            raise ConfigError("weighted batches (x, y, w) need a loss_fn that accepts reduction='none'") from None
        return (per_sample * weights).sum() / weights.sum()

    def _to_device(self, batch) -> tuple:
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise ConfigError(f"a batch must be (x, y) or (x, y, sample_weights); got {type(batch).__name__}"
                              + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
        device = self.state.device
        return tuple(_move(t, device) for t in batch)

    def _budget_check(self) -> Callable[[], None] | None:
        """A closure that stops the run when a limit is exhausted (None without a budget)."""
        budget, state = self.budget, self.state
        if budget.is_empty():
            return None
        meters = state.meters
        energy = meters["energy"].joules if budget.energy_j is not None else (lambda: 0.0)
        memory = meters["memory"].current_peak_mb if budget.peak_mem_mb is not None else (lambda: None)

        def check() -> None:
            flops = meters["flops"].total if budget.flops is not None else 0.0
            kind = budget.exhausted(train_s=state.clock.train_s, energy_j=energy(), steps=state.step,
                                    flops=flops, peak_mem_mb=memory())
            if kind is not None:
                state.request_stop(f"budget:{kind}")

        return check

    # -- data ----------------------------------------------------------------------------------
    def _epoch_batches(self, epoch: int) -> Iterable:
        data = self.state.train_data
        if isinstance(data, TensorData):
            return Loader(data, self.batch_size, seed=self.seed, rank=self.rank,
                          world_size=self.world_size).set_epoch(epoch)
        if isinstance(data, Dataset) and hasattr(data, "__len__"):
            if self.world_size > 1:
                sampler = DistributedSampler(data, num_replicas=self.world_size, rank=self.rank, seed=self.seed,
                                             drop_last=True)
                sampler.set_epoch(epoch)
            else:
                sampler = RandomSampler(data, generator=epoch_generator(self.seed, epoch))
            return DataLoader(data, batch_size=self.batch_size, sampler=sampler)
        return data  # a re-iterable of batches, used as given

    # -- evaluation, epoch end, finish ---------------------------------------------------------
    def _evaluate(self) -> dict:
        state = self.state
        self._fire(Event.BEFORE_EVAL)
        if self.eval_data is None:
            return {}
        start = time.perf_counter()
        if self.eval_fn is not None:
            metrics = dict(self.eval_fn(state.model, self.eval_data, state.device))
        else:
            metrics = evaluate(state.model, self.eval_data, state.loss_fn, state.device)
        if state.clock.sync:
            torch.cuda.synchronize()
        state.clock.eval_s += time.perf_counter() - start
        state.eval_metrics = metrics
        self._fire(Event.AFTER_EVAL)
        return metrics

    def _end_epoch(self, line: dict) -> None:
        self.history.append(line)
        if self.rank != 0 or self.out_dir is None:
            return
        # Never through a symlink (haet.core.files): the folder may have been prepared by someone else.
        files.append_text(self.out_dir / "metrics.jsonl",
                          json.dumps(RunRecord(history=[line]).to_dict()["history"][0]) + "\n")
        if self.checkpoint:
            if self.eval_data is None:
                self._fire(Event.BEFORE_EVAL)
            checkpoint.save(self.out_dir / checkpoint.FILENAME, self._checkpoint_payload())

    def _finish(self, stopped_by: str, evaluated_at_step: int, error: str | None = None) -> RunRecord:
        state = self.state
        metrics = dict(state.eval_metrics)
        if stopped_by in ("interrupt", "terminated", "error"):
            self._fire(Event.BEFORE_EVAL)  # pending updates are applied; no evaluation
        elif evaluated_at_step != state.step:
            with contextlib.suppress(KeyboardInterrupt):
                metrics = self._evaluate()
        self._fire(Event.FIT_END)
        cost: dict = {}
        for meter in self.meters:
            cost.update(meter.report(state))
        method_metrics: dict = {}
        for method in self.methods:
            method_metrics.update(method.metrics())
        self.record = RunRecord(
            task=self.task, model=self.model_name,
            methods=[{"name": m.name, "params": m.params()} for m in self.methods], label=self.label,
            seed=self.seed, device=state.device.type, hardware=hardware_info(state.device),
            epochs=state.epoch, steps=state.step, stopped_by=stopped_by, metrics=metrics,
            history=self.history, cost=cost, method_metrics=method_metrics, budget=self.budget.to_dict(),
            error=error, haet_version=__version__)
        if self.world_size > 1:
            # The record (with this rank's costs) is saved before the collective step that can fail
            # when another rank died; then again with the costs of all ranks.
            self._save_record()
            self.record.cost = distributed.aggregate_cost(cost, state.device)
        self._save_record()
        return self.record

    def _stop_on_sigterm(self) -> bool:
        """SIGTERM: stop after the current batch and keep the record; a second one stops at once."""
        if self.state.stop_reason == "terminated":
            return False
        self.state.request_stop("terminated")
        return True

    def _save_record(self) -> None:
        if self.rank == 0 and self.out_dir is not None:
            self.record_path = self.record.save(self.out_dir)

    # -- checkpoints ---------------------------------------------------------------------------
    def _checkpoint_payload(self) -> dict:
        state = self.state
        return {"epoch": state.epoch, "step": state.step, "samples_seen": state.samples_seen,
                "model_version": state.model_version, "compute_dtype": state.compute_dtype,
                "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                "methods": [m.state_dict() for m in self.methods],
                "meters": {m.name: m.state_dict() for m in self.meters},
                "clock": state.clock.state_dict(), "rng": checkpoint.rng_state(), "history": self.history}

    def _restore(self, payload: dict) -> int:
        state = self.state
        if len(payload["methods"]) != len(self.methods):
            raise ConfigError(f"the checkpoint was made with {len(payload['methods'])} methods, "
                              f"this run has {len(self.methods)}")
        for method, sd in zip(self.methods, payload["methods"]):
            method.load_state_dict(sd)  # first: a method may restore the model's structure
        state.model.load_state_dict(payload["model"])
        state.optimizer.load_state_dict(payload["optimizer"])
        for meter in self.meters:
            if meter.name in payload["meters"]:
                meter.load_state_dict(payload["meters"][meter.name])
        state.clock.load_state_dict(payload["clock"])
        checkpoint.set_rng_state(payload["rng"])
        state.step, state.samples_seen = payload["step"], payload["samples_seen"]
        state.model_version, state.compute_dtype = payload["model_version"], payload["compute_dtype"]
        self.history = list(payload["history"])
        state.epoch = payload["epoch"]
        if self.history:
            state.eval_metrics = {k: v for k, v in self.history[-1].items()
                                  if k not in ("epoch", "step", "train_loss", "train_s")}
        return payload["epoch"]

    # -- progress ------------------------------------------------------------------------------
    def _progress_bar(self):
        if not self.progress:
            return contextlib.nullcontext(None)
        from .progress import TrainProgress

        return TrainProgress(self.state, self.budget)


def evaluate(model: nn.Module, data: Any, loss_fn: Callable, device: torch.device, batch_size: int = 256) -> dict:
    """Classification metrics: accuracy (argmax of the last dimension) and mean loss."""
    was_training = model.training
    model.eval()
    if isinstance(data, TensorData):
        batches: Iterable = Loader(data, batch_size, shuffle=False)
    elif isinstance(data, Dataset):
        batches = DataLoader(data, batch_size=batch_size)
    else:
        batches = data
    correct, total, loss_sum = 0, 0, 0.0
    with torch.no_grad():
        for x, y, *_ in batches:
            x, y = _move(x, device), _move(y, device)
            out = model(x)
            loss_sum += float(loss_fn(out, y)) * len(y)
            correct += int((out.argmax(-1) == y).sum())
            total += len(y)
    model.train(was_training)
    if total == 0:
        return {}
    return {"accuracy": correct / total, "loss": loss_sum / total}


def _move(x, device):
    if isinstance(x, torch.Tensor):
        return x if x.device == device else x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_move(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _move(v, device) for k, v in x.items()}
    return x


def _check_methods(methods: list) -> None:
    names = set()
    for m in methods:
        if not isinstance(m, Method):
            raise ConfigError(f"methods must be haet.Method instances, got {type(m).__name__}")
        if m.name in names:
            raise ConfigError(f"method {m.name!r} is given twice")
        names.add(m.name)
    for m in methods:
        m.check_compatible([o for o in methods if o is not m])


def _check_train_data(data: Any) -> None:
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return
    if not isinstance(data, Iterable):
        raise ConfigError(f"train_data must be a Dataset or an iterable of (x, y) batches, got {type(data).__name__}")
    if iter(data) is data:
        raise ConfigError("train_data is a one-shot iterator; pass something that can be iterated once per "
                          "epoch (a list of batches, a DataLoader, a Dataset)")
