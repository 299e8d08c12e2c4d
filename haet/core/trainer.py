"""The Trainer: one readable loop that fires events to methods and meters.

    trainer = Trainer(model, train_data, eval_data, methods=[...], budget=Budget(time_s=600))
    record = trainer.fit(epochs=20)

The loop knows nothing of any particular method. Methods change the batch, the loss, the model or
the optimizer step through the state they receive with each event (`haet.core.events`); meters
listen after the methods and report what the run cost. `fit` returns a `RunRecord`.
"""

from __future__ import annotations

import contextlib
import copy
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
from .evaluation import _move, evaluate, note_once
from .events import Event
from .loggers import Logger
from .method import CAPABILITIES, Method, capability_conflicts
from .optim import as_schedule
from .options import TrainOptions, as_precision, as_targets
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
        precision: "fp32", "bf16" (CPU and CUDA) or "fp16" (CUDA, with a gradient scaler): forward
            and loss under ``torch.autocast``; weights and optimizer state stay float32.
        scheduler: a learning-rate schedule: a torch ``LRScheduler`` (stepped per optimizer step),
            a callable ``(optimizer, total_steps) -> LRScheduler``, a `haet.Schedule` (which says
            per step or per epoch) or a name (``"onecycle:max_lr=0.1"``, see `haet.core.optim`).
        until: a target to stop at, ``{"accuracy": 0.95}`` (``>=``; ``<=`` for loss-like metrics)
            or ``"loss<=0.1"``: the run stops at the first evaluation that meets it
            (``stopped_by="target"``, ``cost.time_to_target_s``).
        options: `TrainOptions` (gradient accumulation, clipping, evaluation every N steps).
        loggers: `haet.Logger` instances (TensorBoard, MLflow, your own) that get each evaluation.
        save_model: write ``model.safetensors`` + ``model.json`` into `out_dir` at the end
            (`haet.load_model` reads them back).
    """

    def __init__(self, model: nn.Module, train_data: Any, eval_data: Any = None, *,
                 loss_fn: Callable | None = None,
                 optimizer: torch.optim.Optimizer | Callable[[Iterable], torch.optim.Optimizer] | None = None,
                 methods: Sequence[Method] = (), budget: Budget | None = None,
                 meters: Sequence[Meter] | None = None, device: str | torch.device = "auto", seed: int = 0,
                 progress: bool = True, batch_size: int = 64, eval_fn: Callable | None = None,
                 out_dir: str | Path | None = None, checkpoint: bool = False,
                 task: str | None = None, model_name: str | None = None, label: str | None = None,
                 precision: str = "fp32", scheduler: Any = None, until: Any = None,
                 options: TrainOptions | None = None, loggers: Sequence[Logger] = (),
                 save_model: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.methods = list(methods)
        _check_methods(self.methods)
        for m in self.methods:
            m.check_model(model)
        self.budget = budget or Budget()
        if not isinstance(self.budget, Budget):
            raise ConfigError(f"budget must be a haet.Budget, got {type(self.budget).__name__}")
        self.meters = list(default_meters() if meters is None else meters)
        provided = {"steps"}.union(*(m.provides for m in self.meters))
        missing = sorted(self.budget.needs() - provided)
        if missing:
            raise ConfigError(f"the budget reads {', '.join(missing)}, which no meter of this run provides "
                              f"(meters: {', '.join(m.name for m in self.meters) or 'none'})")

        self.options = options if options is not None else TrainOptions()
        if not isinstance(self.options, TrainOptions):
            raise ConfigError(f"options must be a haet.TrainOptions, got {type(self.options).__name__}")
        self.precision = as_precision(precision)
        self.schedule = as_schedule(scheduler)
        self.targets = as_targets(until)
        self.loggers = list(loggers)
        for logger in self.loggers:
            if not isinstance(logger, Logger):
                raise ConfigError(f"loggers must be haet.Logger instances, got {type(logger).__name__}")
        _check_step_options(self.methods, self.options, self.precision)
        device = resolve_device(device)
        self.precision.check_device(device)
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
        self.save_model = save_model
        if save_model and self.out_dir is None:
            raise ConfigError("save_model=True needs an out_dir to write model.safetensors into")
        self.task, self.model_name = task, model_name or type(model).__name__
        self.label = label or "+".join(m.name for m in self.methods) or "baseline"
        self.state = State(model=model, optimizer=optimizer, loss_fn=loss_fn or nn.functional.cross_entropy,
                           device=device, seed=seed, clock=PhaseClock(device), train_data=train_data,
                           batch_size=batch_size, rank=self.rank, world_size=self.world_size,
                           meters={m.name: m for m in self.meters})
        # FLOPs and modelled energy are labelled with the format matrix products run in under autocast.
        self.state.compute_dtype = self.precision.label
        if self.targets:
            from .target import TargetWatch

            self.meters.append(TargetWatch(self.targets))  # reports into cost like a meter
        self.history: list[dict] = []
        self._fitted = False
        self._scaler = self.precision.scaler(device)
        self._scheduler = None
        self.record: RunRecord | None = None
        self.record_path: Path | None = None  # set once record.json is written
        self._ddp: nn.Module | None = None
        self._method_handlers: dict[Event, list] = {}
        self._meter_handlers: dict[Event, list] = {}

    # ------------------------------------------------------------------------------------------
    def fit(self, epochs: int, *, resume_from: str | Path | None = None) -> RunRecord:
        """Train for `epochs` epochs in total (a resumed run continues to that count).

        A Trainer fits once: a second call is refused (the methods have already transformed the
        model); to train further, resume from a checkpoint or build a new Trainer."""
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"epochs must be a positive integer, got {epochs!r}")
        if self._fitted:
            raise ConfigError("fit() was already called on this Trainer; to train further, resume from its "
                              "checkpoint (Trainer(..., checkpoint=True) then fit(resume_from=DIR)) or build a "
                              "new Trainer")
        self._fitted = True
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
        self._start_schedule(epochs, first_epoch)
        self._log_params()

        stopped_by = "epochs"
        self._evaluated_at_step = -1
        restore_sigterm = on_sigterm(self._stop_on_sigterm)
        try:
            with self._progress_bar() as bar:
                self._bar = bar
                for epoch in range(first_epoch, epochs + 1):
                    state.epoch = epoch
                    state.train_loader = self._epoch_batches(epoch)
                    state.clock.start()
                    self._fire(Event.EPOCH_START)
                    train_loss = self._train_epoch(bar)
                    self._fire(Event.EPOCH_END)
                    state.clock.pause("methods")
                    if self.schedule is not None and self.schedule.interval == "epoch":
                        self._step_schedule()
                    line = {"epoch": epoch, "step": state.step, "train_loss": train_loss,
                            "train_s": state.clock.train_s}
                    if self._evaluated_at_step != state.step:
                        line.update(self._evaluate())
                    else:  # an evaluation every N steps has just read this model
                        line.update(state.eval_metrics)
                    self._evaluated_at_step = state.step
                    for method in self.methods:
                        line.update(method.epoch_metrics())
                    self._log(line)
                    self._end_epoch(line)
                    if state.stop_reason is not None:
                        stopped_by = state.stop_reason
                        break
        except KeyboardInterrupt as stop:
            stopped_by = "terminated" if isinstance(stop, Terminated) else "interrupt"
        except Exception as err:
            restore_sigterm()
            state.clock.pause("methods")
            self._close_loggers()
            self._finish("error", self._evaluated_at_step, error=f"{type(err).__name__}: {err}")
            raise
        finally:
            restore_sigterm()
            self._ddp = None  # release DDP's reducer (and its communication threads) with the run
            self._bar = None
        record = self._finish(stopped_by, self._evaluated_at_step)
        record.history = copy.deepcopy(record.history)  # the returned record never changes afterwards
        self._after_finish(record)
        return record

    # -- the loop ------------------------------------------------------------------------------
    def _train_epoch(self, bar) -> float | None:
        """One epoch. With ``accumulate = N``, N micro-batches (BATCH_START, AFTER_FORWARD,
        AFTER_BACKWARD each) make one optimizer step (AFTER_STEP, BATCH_END once); ``state.step``
        counts optimizer steps, so budgets, schedules and ``eval_every`` count them too."""
        state, clock = self.state, self.state.clock
        model = self._ddp or state.model
        model.train()
        fire = self._fire
        accumulate = self.options.accumulate
        loss_sum, batches = 0.0, 0
        budget_check = self._budget_check()
        try:
            total = len(state.train_loader)
        except TypeError:
            total = None
        micro, group = 0, accumulate
        for batch in state.train_loader:
            if micro == 0:  # the last group of an epoch may be shorter
                group = accumulate if total is None else max(1, min(accumulate, total - state.batch_index))
            state.batch = self._to_device(batch)
            clock.lap("data")
            fire(Event.BATCH_START)
            x, y, *weights = state.batch
            last_micro = micro + 1 >= group
            # Under DDP, gradients are averaged across ranks once per optimizer step, not per micro-batch.
            sync = self._ddp.no_sync() if (self._ddp is not None and not last_micro) else contextlib.nullcontext()
            with sync:
                with self.precision.autocast(state.device):
                    state.outputs = model(x)
                    state.loss = self._loss(state.outputs, y, weights[0] if weights else None)
                clock.lap("forward")
                fire(Event.AFTER_FORWARD)
                loss_value = state.loss.item()
                if not math.isfinite(loss_value):
                    state.request_stop("nonfinite_loss")  # before backward: the weights stay finite
                else:
                    self._backward(group)
                    clock.lap("backward")
                    fire(Event.AFTER_BACKWARD)
                    micro += 1
                    state.samples_seen += len(y)
                    loss_sum += loss_value
                    batches += 1
                    if last_micro:
                        micro = 0
                        self._optimizer_step()
                        clock.lap("optimizer")
                        state.step += 1
                        fire(Event.AFTER_STEP)
                        if budget_check is not None:
                            budget_check()
                        fire(Event.BATCH_END)
                    if bar is not None:
                        bar.advance(loss_value)
                    if last_micro and self._eval_due():
                        self._evaluate_between_steps(model)
            if self.world_size > 1:
                state.stop_reason = distributed.agree_stop(state.stop_reason, state.device)
            if state.stop_reason is not None:
                break
            state.batch_index += 1
        if micro and state.stop_reason is None:  # a loader of unknown length ended inside a group
            self._optimizer_step()
            clock.lap("optimizer")
            state.step += 1
            fire(Event.AFTER_STEP)
            fire(Event.BATCH_END)
        state.batch_index = 0
        state.batch = state.outputs = state.loss = None
        return loss_sum / batches if batches else None

    def _backward(self, group: int) -> None:
        state = self.state
        if group > 1:
            state.loss = state.loss / group  # the accumulated gradient is the mean over the micro-batches
        if self._scaler is not None:
            state.loss = self._scaler.scale(state.loss)
        (state.backward_fn or state.loss.backward)()

    def _optimizer_step(self) -> None:
        state, clip = self.state, self.options.clip_grad
        if clip is not None:
            if self._scaler is not None:
                self._scaler.unscale_(state.optimizer)
            params = [p for g in state.optimizer.param_groups for p in g["params"] if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
            self._grad_norm = float(norm)
        if self._scaler is not None:
            self._scaler.step(state.optimizer)  # skips the step when the scaled gradients overflowed
            self._scaler.update()
        else:
            (state.step_fn or state.optimizer.step)()
        (state.zero_grad_fn or state.optimizer.zero_grad)()
        if self.schedule is not None and self.schedule.interval == "step":
            self._step_schedule()

    # -- schedules, evaluation every N steps, loggers -----------------------------------------
    def _start_schedule(self, epochs: int, first_epoch: int) -> None:
        if self.schedule is None:
            return
        try:
            per_epoch = len(self._epoch_batches(1))
        except TypeError:
            per_epoch = None
        self._scheduler = self.schedule.start(self.state.optimizer, epochs=epochs, batches_per_epoch=per_epoch,
                                              accumulate=self.options.accumulate, max_steps=self.budget.steps,
                                              done_steps=self.state.step, done_epochs=first_epoch - 1)

    def _step_schedule(self) -> None:
        self._scheduler.step()

    def _eval_due(self) -> bool:
        every = self.options.eval_every
        return every is not None and self.state.step % every == 0 and self.state.stop_reason is None

    def _evaluate_between_steps(self, model: nn.Module) -> None:
        """An evaluation every ``eval_every`` steps: the clock is paused, the line goes to the
        history (marked ``mid_epoch``) and the loggers."""
        state = self.state
        state.clock.pause("methods")
        line = {"epoch": state.epoch, "step": state.step, "train_s": state.clock.train_s, "mid_epoch": True}
        line.update(self._evaluate())
        self._evaluated_at_step = state.step
        self.history.append(line)
        self._log(line)
        model.train()
        state.clock.start()

    def _log_params(self) -> None:
        params = {"task": self.task, "model": self.model_name, "label": self.label, "seed": self.seed,
                  "precision": self.precision.name, "accumulate": self.options.accumulate}
        for logger in self.loggers:
            logger.log_params(params)

    def _log(self, line: dict) -> None:
        for logger in self.loggers:
            logger.log_metrics(self.state.step, {k: v for k, v in line.items() if k not in ("epoch", "step")})

    def _close_loggers(self) -> None:
        for logger in self.loggers:
            with contextlib.suppress(Exception):
                logger.close()

    def _after_finish(self, record: RunRecord) -> None:
        """Final numbers to the loggers; the model to ``model.safetensors`` when asked."""
        final = {**{f"final/{k}": v for k, v in record.metrics.items()},
                 **{f"cost/{k}": v for k, v in record.cost.items() if isinstance(v, (int, float))}}
        for logger in self.loggers:
            logger.log_metrics(self.state.step, final)
        self._close_loggers()
        if self.save_model and self.rank == 0 and self.out_dir is not None:
            from .saving import save_model

            save_model(self.out_dir, self.state.unwrapped_model, self.methods, task=self.task,
                       model_name=self.model_name, input_shape=_sample_shape(self.state.train_data),
                       seed=self.seed, label=self.label, optimizer=self.state.optimizer,
                       batch_size=self.batch_size)

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
        needs = budget.needs()
        readers = [m for m in self.meters if needs.intersection(m.provides)]
        # The next step is expected to take as long as the last one (kept across epochs).
        last_train_s = self.__dict__.setdefault("_last_train_s", [None])

        def check() -> None:
            readings: dict = {"steps": state.step}
            for meter in readers:
                readings.update(meter.readings(state))
            now, before = readings.get("train_s"), last_train_s[0]
            last_train_s[0] = now
            step_s = now - before if (budget.no_overrun and now is not None and before is not None) else None
            kind = budget.exhausted(readings, step_s)
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
        if self.world_size > 1 and not isinstance(getattr(data, "sampler", None), DistributedSampler):
            note_once("unsharded", "train_data is an iterable of batches (your own DataLoader?) that haet cannot "
                      "shard: under torchrun every rank trains on all of it. Pass the Dataset itself (haet then "
                      "shards it with a DistributedSampler) or give your DataLoader a DistributedSampler")
        return data  # a re-iterable of batches, used as given

    # -- evaluation, epoch end, finish ---------------------------------------------------------
    def _evaluate(self) -> dict:
        state = self.state
        self._fire(Event.BEFORE_EVAL)
        if self.eval_data is None:
            return {}
        start = time.perf_counter()
        with self.precision.autocast(state.device):  # evaluated in the arithmetic it trained in
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
        # The model as it ended (methods may have grown, pruned or replaced layers): its parameter elements.
        cost["model_params"] = sum(p.numel() for p in state.model.parameters())
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


def _check_methods(methods: list) -> None:
    names = set()
    for m in methods:
        if not isinstance(m, Method):
            raise ConfigError(f"methods must be haet.Method instances, got {type(m).__name__}")
        if m.name in names:
            raise ConfigError(f"method {m.name!r} is given twice")
        names.add(m.name)
    for m in methods:
        unknown = set(m.owns) - set(CAPABILITIES)
        if unknown:
            raise ConfigError(f"method {m.name!r} owns unknown capabilities {sorted(unknown)}; "
                              f"known: {', '.join(CAPABILITIES)}")
    clash = capability_conflicts(methods)
    if clash:
        raise ConfigError(clash)
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


def _check_step_options(methods: list, options: TrainOptions, precision) -> None:
    """Accumulation, clipping and fp16's scaler need the Trainer to own backward and the update."""
    for m in methods:
        for cap, asked, why in (("optimizer_step", options.accumulate > 1, "accumulate"),
                                ("optimizer_step", options.clip_grad is not None, "clip_grad"),
                                ("optimizer_step", precision.name == "fp16", "precision fp16"),
                                ("backward", options.accumulate > 1, "accumulate")):
            if asked and cap in m.owns:
                raise ConfigError(f"{why} cannot run with {m.name}: {m.name} owns {cap!r} "
                                  f"({CAPABILITIES[cap]}), which {why} needs the Trainer to do")


def _sample_shape(data: Any) -> tuple | None:
    """The shape of one input sample, for rebuilding a saved model (None when unknown)."""
    if isinstance(data, TensorData):
        return tuple(data.x.shape[1:])
    with contextlib.suppress(Exception):
        if isinstance(data, Dataset):
            x = data[0][0]
            return tuple(x.shape) if isinstance(x, torch.Tensor) else None
        x = next(iter(data))[0]
        return tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else None
    return None
