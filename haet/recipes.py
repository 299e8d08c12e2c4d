"""Recipes: a whole training setup (model, optimizer, schedule, methods, batch, augmentation) by name.

``haet.recipes.fast(task)`` is haet's strong default for small data under a time budget, re-derived
from what won the HAET 2021 challenge and from the fastest public small-data trainers (airbench):
a conv net fitted to the task with BatchNorm, SGD with Nesterov momentum and a one-cycle schedule,
label smoothing, an average of the weights (`ema`), augmentation only where it pays for itself
(flips and crops for natural images, none for digits) and test-time flip averaging for natural
images. ``baseline(task)`` is DESIGN.md's plain default (Adam 1e-3, batch 64, the task's model).

A recipe fits a time budget: ``recipe.schedule(budget_s, clock)`` decays the learning rate over
the *time* left rather than over a guessed number of epochs, so the run ends at a small learning
rate whenever the budget stops it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from .core.errors import ConfigError, choices_error
from .core.method import Method
from .core.optim import Schedule, make_optimizer, make_schedule
from .data.tasks import Task, get_task
from .methods import parse_entry
from .models import build_model

__all__ = ["Recipe", "RECIPES", "get_recipe", "fast", "baseline", "FlipCrop", "flip_crop", "predict"]


@dataclass(frozen=True)
class Recipe:
    name: str
    task: str
    model_name: str                      # a name in haet.models.MODELS, or "fast-cnn"/"fast-resnet" built here
    optimizer: str                       # haet.core.optim.make_optimizer spec
    max_lr: float | None = None          # one-cycle peak (None: the optimizer's lr, constant)
    methods: str = "baseline"            # haet.methods.parse_entry spec
    batch_size: int = 64
    epochs: int = 10                     # the step-based schedule's length when no time budget is given
    precision: str = "fp32"
    augment: bool = False                # random crops (pad 2) and horizontal flips
    tta_flip: bool = False               # evaluate on the mean of the image and its mirror
    width: int = 16                      # channels of the first conv of haet's own nets
    channels_last: bool = False

    def build_model(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        if self.model_name == "fast-cnn":
            model = fast_cnn(input_shape, num_classes, self.width)
        elif self.model_name == "fast-resnet":
            model = fast_resnet(input_shape, num_classes, self.width)
        else:
            model = build_model(self.model_name, input_shape, num_classes)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def build_methods(self) -> list[Method]:
        methods = parse_entry(self.methods)
        if self.augment:
            methods.append(FlipCrop())
        return methods

    def schedule(self, budget_s: float | None = None, clock: Callable[[], float] | None = None) -> Schedule | None:
        """One cycle over the run: over `budget_s` seconds of `clock` (started when called) when
        given, else over the steps of ``epochs`` epochs."""
        if self.max_lr is None:
            return None
        if budget_s is None:
            return make_schedule(f"onecycle:max_lr={self.max_lr},pct_start=0.25")
        return time_onecycle(budget_s, clock or time.perf_counter)

    def params(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def time_onecycle(budget_s: float, clock: Callable[[], float], pct_start: float = 0.25) -> Schedule:
    """A one-cycle factor on the optimizer's lr that follows elapsed time: linear warm-up from 0.1
    over `pct_start` of `budget_s`, then linear decay to 0 at `budget_s`."""
    start = clock()

    def factor(_step: int) -> float:
        t = min(1.0, (clock() - start) / budget_s)
        if t < pct_start:
            return 0.1 + 0.9 * t / pct_start
        return max(0.0, (1 - t) / (1 - pct_start))

    def build(optimizer, total):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    return Schedule(build, "step", {"name": "time_onecycle", "params": {"budget_s": budget_s, "pct_start": pct_start}})


# -- models ----------------------------------------------------------------------------------
def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def fast_cnn(input_shape: tuple[int, ...], num_classes: int, width: int = 16) -> nn.Module:
    """For digits: average-pool 28×28 inputs to 14×14 first (digits stay legible, convs cost 4×
    less), then two conv-BN-ReLU-maxpool blocks and a linear head."""
    c, h, w = input_shape
    pool = 2 if min(h, w) >= 16 else 1
    h, w = h // pool // 4, w // pool // 4
    return nn.Sequential(nn.AvgPool2d(pool) if pool > 1 else nn.Identity(),
                         *_block(c, width), nn.MaxPool2d(2), *_block(width, 2 * width), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(2 * width * max(1, h) * max(1, w), num_classes))


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_block(channels, channels), *_block(channels, channels))

    def forward(self, x):
        return x + self.body(x)


def fast_resnet(input_shape: tuple[int, ...], num_classes: int, width: int = 16) -> nn.Module:
    """ResNet-9-like for natural images (the challenge winners' and airbench's shape, narrower for
    a CPU): prep conv, three stages of conv-BN-ReLU-maxpool with residual blocks on the first and
    last, global max pooling, a linear head scaled by 1/8."""
    c = input_shape[0]
    w1, w2, w3 = 2 * width, 4 * width, 8 * width
    head = nn.Linear(w3, num_classes, bias=False)
    return nn.Sequential(*_block(c, width),
                         *_block(width, w1), nn.MaxPool2d(2), _Residual(w1),
                         *_block(w1, w2), nn.MaxPool2d(2),
                         *_block(w2, w3), nn.MaxPool2d(2), _Residual(w3),
                         nn.AdaptiveMaxPool2d(1), nn.Flatten(), head, _Scale(0.125))


class _Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


# -- augmentation and prediction --------------------------------------------------------------
def flip_crop(x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 2) -> torch.Tensor:
    """Random horizontal flips and random crops (reflect-padded by `pad`) of a batch of images,
    one draw per sample."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(3), x)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx, dy = (torch.randint(0, 2 * pad + 1, (2,), generator=generator)).tolist()  # one shift per batch: cheap
    return padded[:, :, dy:dy + h, dx:dx + w]


class FlipCrop(Method):
    """The recipe's augmentation as a listener (not a registered method: it is data, not training)."""
    name = "flip_crop"
    summary = "random flips and crops of image batches"
    paper = "standard data augmentation"

    def __init__(self) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(0)

    def fit_start(self, state) -> None:
        self.generator.manual_seed(int(getattr(state, "seed", 0) or 0))

    def batch_start(self, state) -> None:
        x, *rest = state.batch
        if torch.is_tensor(x) and x.dim() == 4:
            state.batch = (flip_crop(x, self.generator), *rest)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, tta_flip: bool = False, batch_size: int = 1000) -> torch.Tensor:
    """Class predictions of `model` on `x` (eval mode), averaging the logits of each image and its
    mirror with `tta_flip`."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        logits = model(xb).float()
        if tta_flip:
            logits = logits + model(xb.flip(3)).float()
        out.append(logits.argmax(1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


# -- the recipes -------------------------------------------------------------------------------
def _task(task: str | Task) -> Task:
    return task if isinstance(task, Task) else get_task(task)


def baseline(task: str | Task) -> Recipe:
    """DESIGN.md's default: the task's default model, Adam 1e-3, batch 64, constant learning rate."""
    t = _task(task)
    return Recipe("baseline", t.name, t.default_model, "adam:lr=0.001", batch_size=64, epochs=10)


def fast(task: str | Task) -> Recipe:
    """haet's fast recipe for `task` (image classification tasks; see the module's docstring)."""
    t = _task(task)
    if len(t.input_shape) != 3 or t.loss_fn is not None:
        raise ConfigError(f"the fast recipe is for image classification tasks; {t.name!r} is not one "
                          f"(input shape {t.input_shape})")
    natural = t.input_shape[0] == 3
    if natural:  # CIFAR-like: ResNet-9 shape, augmentation and flip averaging pay for themselves
        return Recipe("fast", t.name, "fast-resnet", "sgd:lr=0.1,momentum=0.9,nesterov=true,weight_decay=0.0005",
                      max_lr=0.1, methods="label_smoothing:smoothing=0.2+ema:decay=0.99", batch_size=128,
                      epochs=10, augment=True, tta_flip=True, width=16, channels_last=True)
    return Recipe("fast", t.name, "fast-cnn", "sgd:lr=0.1,momentum=0.9,nesterov=true,weight_decay=0.0005",
                  max_lr=0.1, methods="label_smoothing:smoothing=0.1", batch_size=64, epochs=6, width=16)


RECIPES: dict[str, Callable[[str | Task], Recipe]] = {"baseline": baseline, "fast": fast}


def get_recipe(name: str, task: str | Task, **overrides) -> Recipe:
    """The recipe `name` for `task`, with fields replaced by `overrides` (a search's candidate)."""
    if name not in RECIPES:
        raise choices_error("recipe", name, RECIPES)
    recipe = RECIPES[name](task)
    unknown = sorted(set(overrides) - set(recipe.__dict__))
    if unknown:
        raise ConfigError(f"unknown recipe field {unknown[0]!r}; fields are: {', '.join(recipe.__dict__)}")
    return replace(recipe, **overrides)
