"""Optimizers and learning-rate schedules by name, validated like method parameters.

    --optimizer sgd:lr=0.1,momentum=0.9,nesterov=true     --schedule onecycle:max_lr=0.1
    --optimizer adam:lr=3e-4                              --schedule cosine:warmup_steps=100
    --optimizer adamw:lr=1e-3,weight_decay=0.05           --schedule step:step_size=2,gamma=0.5

In Python: ``Trainer(optimizer=make_optimizer("sgd:lr=0.1"), scheduler=make_schedule("cosine"))``,
or any torch optimizer factory and `Schedule(factory, interval="epoch")`. A schedule is built at
the start of `fit`, when the number of optimizer steps is known, and stepped per optimizer step
(``interval="step"``) or per epoch (``interval="epoch"``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from .config import check_range, parse_kv, parse_params
from .errors import ConfigError


# -- optimizers --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SGDConfig:
    lr: float = 0.1               # learning rate
    momentum: float = 0.0         # heavy-ball momentum, in [0, 1)
    nesterov: bool = False        # Nesterov momentum (needs momentum > 0)
    weight_decay: float = 0.0     # L2 penalty added to the gradient

    def __post_init__(self) -> None:
        check_range("lr", self.lr, 0, lo_open=True)
        check_range("momentum", self.momentum, 0, 1, hi_open=True)
        check_range("weight_decay", self.weight_decay, 0)
        if self.nesterov and self.momentum == 0:
            raise ConfigError("nesterov=true needs momentum > 0 (e.g. sgd:lr=0.1,momentum=0.9,nesterov=true)")


@dataclass(frozen=True)
class AdamConfig:
    lr: float = 1e-3              # learning rate
    beta1: float = 0.9            # decay of the gradient's moving average, in [0, 1)
    beta2: float = 0.999          # decay of the squared gradient's moving average, in [0, 1)
    eps: float = 1e-8             # added to the denominator for stability
    weight_decay: float = 0.0     # L2 penalty (adam) or decoupled weight decay (adamw)

    def __post_init__(self) -> None:
        check_range("lr", self.lr, 0, lo_open=True)
        check_range("beta1", self.beta1, 0, 1, hi_open=True)
        check_range("beta2", self.beta2, 0, 1, hi_open=True)
        check_range("eps", self.eps, 0, lo_open=True)
        check_range("weight_decay", self.weight_decay, 0)


@dataclass(frozen=True)
class AdamWConfig(AdamConfig):
    weight_decay: float = 0.01    # decoupled weight decay


def _sgd(params, c: SGDConfig):
    return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay)


def _adam(cls):
    return lambda params, c: cls(params, lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps, weight_decay=c.weight_decay)


#: name -> (config class, builder(params, config)).
OPTIMIZERS: dict[str, tuple[type, Callable]] = {
    "sgd": (SGDConfig, _sgd),
    "adam": (AdamConfig, _adam(torch.optim.Adam)),
    "adamw": (AdamWConfig, _adam(torch.optim.AdamW)),
}


def make_optimizer(spec: str) -> Callable[[Any], torch.optim.Optimizer]:
    """``"sgd:lr=0.1,momentum=0.9"`` -> a factory ``params -> optimizer`` (validated now)."""
    name, raw = split_spec(spec, "optimizer", OPTIMIZERS)
    config_class, build = OPTIMIZERS[name]
    config = parse_params(config_class, raw, owner=f"optimizer {name}")

    def factory(params):
        return build(params, config)

    factory.spec = {"name": name, "params": asdict(config)}  # for the record
    return factory


# -- schedules ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule: `build` is an ``LRScheduler`` or ``(optimizer, total_steps) ->
    LRScheduler`` (total_steps: optimizer steps of the run, or epochs with ``interval="epoch"``)."""
    build: Any
    interval: str = "step"            # "step": stepped after every optimizer step; "epoch": after each epoch
    spec: dict | None = None          # what the command line asked for (for the record)

    def __post_init__(self) -> None:
        if self.interval not in ("step", "epoch"):
            raise ConfigError(f"schedule interval must be 'step' or 'epoch', got {self.interval!r}")
        if not (isinstance(self.build, torch.optim.lr_scheduler.LRScheduler) or callable(self.build)):
            raise ConfigError(f"a schedule is a torch LRScheduler or a callable (optimizer, total_steps) -> "
                              f"LRScheduler, got {type(self.build).__name__}")

    def create(self, optimizer: torch.optim.Optimizer, total: int | None):
        if isinstance(self.build, torch.optim.lr_scheduler.LRScheduler):
            return self.build
        return self.build(optimizer, total)

    def start(self, optimizer: torch.optim.Optimizer, *, epochs: int, batches_per_epoch: int | None,
              accumulate: int = 1, max_steps: int | None = None, done_steps: int = 0,
              done_epochs: int = 0) -> "RunningSchedule":
        """Build the scheduler for a run (total: optimizer steps, or epochs for ``interval="epoch"``)
        and advance it past what a resumed run has already done."""
        if self.interval == "epoch":
            total, done = epochs, done_epochs
        else:
            total = epochs * -(-batches_per_epoch // accumulate) if batches_per_epoch else None
            if total is not None and max_steps is not None:
                total = min(total, int(max_steps))
            done = done_steps
        running = RunningSchedule(self.create(optimizer, total),
                                  # the lr of step k is value k: after the last step there is no next one
                                  total - 1 if total and self.interval == "step" else None)
        for _ in range(done):
            running.step()
        return running


class RunningSchedule:
    """A built scheduler that is never stepped past its end (OneCycleLR raises there; a method that
    changed an epoch's length, or a loader of unknown length, keeps the last value instead)."""

    def __init__(self, scheduler, last: int | None) -> None:
        self.scheduler, self.last = scheduler, last

    def step(self) -> None:
        if self.last is not None and getattr(self.scheduler, "last_epoch", 0) >= self.last:
            return
        with warnings.catch_warnings():
            # GradScaler skips the optimizer step on overflow; torch then warns about the order of calls.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
            self.scheduler.step()


def as_schedule(value) -> Schedule | None:
    if value is None or isinstance(value, Schedule):
        return value
    if isinstance(value, str):
        return make_schedule(value)
    return Schedule(value)


@dataclass(frozen=True)
class OneCycleConfig:
    max_lr: float = 0.01          # peak learning rate
    pct_start: float = 0.3        # fraction of the steps spent warming up, in (0, 1)
    div_factor: float = 25.0      # initial lr = max_lr / div_factor

    def __post_init__(self) -> None:
        check_range("max_lr", self.max_lr, 0, lo_open=True)
        check_range("pct_start", self.pct_start, 0, 1, lo_open=True, hi_open=True)
        check_range("div_factor", self.div_factor, 1)


@dataclass(frozen=True)
class CosineConfig:
    min_lr: float = 0.0           # learning rate at the last step
    warmup_steps: int = 0         # linear warm-up from 0 over this many optimizer steps

    def __post_init__(self) -> None:
        check_range("min_lr", self.min_lr, 0)
        check_range("warmup_steps", self.warmup_steps, 0, integer=True)


@dataclass(frozen=True)
class StepConfig:
    step_size: int = 1            # epochs between decays
    gamma: float = 0.1            # factor applied at each decay, in (0, 1]

    def __post_init__(self) -> None:
        check_range("step_size", self.step_size, 1, integer=True)
        check_range("gamma", self.gamma, 0, 1, lo_open=True)


def _onecycle(c: OneCycleConfig):
    def build(optimizer, total):
        if not total:
            raise ConfigError("schedule onecycle needs the number of steps: give data whose length is known")
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=c.max_lr, total_steps=total,
                                                   pct_start=c.pct_start, div_factor=c.div_factor)
    return build, "step"


def _cosine(c: CosineConfig):
    def build(optimizer, total):
        if not total:
            raise ConfigError("schedule cosine needs the number of steps: give data whose length is known")
        base = [g["lr"] for g in optimizer.param_groups]

        def factor(i, base_lr):
            if i < c.warmup_steps:
                return (i + 1) / c.warmup_steps
            t = min(1.0, (i - c.warmup_steps) / max(1, total - 1 - c.warmup_steps))  # the last step at min_lr
            floor = c.min_lr / base_lr if base_lr else 0.0
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda i, b=b: factor(i, b) for b in base])
    return build, "step"


def _step(c: StepConfig):
    return (lambda optimizer, total: torch.optim.lr_scheduler.StepLR(optimizer, c.step_size, c.gamma)), "epoch"


#: name -> (config class, config -> (build, interval)).
SCHEDULES: dict[str, tuple[type, Callable]] = {
    "onecycle": (OneCycleConfig, _onecycle),
    "cosine": (CosineConfig, _cosine),
    "step": (StepConfig, _step),
}


def make_schedule(spec: str) -> Schedule:
    """``"onecycle:max_lr=0.1"`` -> a `Schedule` (validated now, built at fit start)."""
    name, raw = split_spec(spec, "schedule", SCHEDULES)
    config_class, make = SCHEDULES[name]
    config = parse_params(config_class, raw, owner=f"schedule {name}")
    build, interval = make(config)
    return Schedule(build, interval, {"name": name, "params": asdict(config), "interval": interval})


def split_spec(spec: str, what: str, known: dict) -> tuple[str, dict[str, str]]:
    """``name:k=v,k=v`` -> (name, {k: v}); errors name the allowed names."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"{what} is empty; choose one of: {', '.join(known)}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in known:
        raise ConfigError(f"unknown {what} {name!r}; choose one of: {', '.join(known)}")
    return name, parse_kv(rest, f"{what} {name}")
