"""The default evaluation: mean loss, and accuracy when the shapes say it is a classification.

Accuracy is computed only for outputs (N, C) against integer targets (N,), or (N, T, C) against
(N, T) per token (targets equal to the loss's ``ignore_index``, and negative targets, are left out). Anything else (a regression's (N, 1) against (N, 1), say) gets the loss only,
with a one-time note saying why: an argmax over a regression output is not an accuracy.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.loader import Loader, TensorData

_noted: set[str] = set()


def is_classification(outputs: Any, targets: Any) -> bool:
    """(N, C) vs integer (N,), or (N, T, C) vs integer (N, T)."""
    if not (isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor)):
        return False
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        return False
    return outputs.dim() in (2, 3) and outputs.dim() == targets.dim() + 1 and outputs.shape[:-1] == targets.shape


def ignore_index(loss_fn: Callable) -> int | None:
    """The class index the loss ignores: a loss module's ``ignore_index``, -100 for cross-entropy."""
    if isinstance(loss_fn, functools.partial):
        if "ignore_index" in loss_fn.keywords:
            return loss_fn.keywords["ignore_index"]
        loss_fn = loss_fn.func
    if hasattr(loss_fn, "ignore_index"):
        return loss_fn.ignore_index
    if loss_fn in (nn.functional.cross_entropy, nn.functional.nll_loss):
        return -100
    return None


def note_once(key: str, message: str) -> None:
    if key not in _noted:
        _noted.add(key)
        warnings.warn(message, stacklevel=3)


def evaluate(model: nn.Module, data: Any, loss_fn: Callable, device: torch.device, batch_size: int = 256,
             autocast: Any = None) -> dict:
    """Mean loss over `data`, and accuracy when outputs and targets have classification shapes."""
    was_training = model.training
    model.eval()
    if isinstance(data, TensorData):
        batches: Iterable = Loader(data, batch_size, shuffle=False)
    elif isinstance(data, Dataset):
        batches = DataLoader(data, batch_size=batch_size)
    else:
        batches = data
    skip = ignore_index(loss_fn)
    correct, counted, total, loss_sum = 0, 0, 0, 0.0
    classification = None
    with torch.no_grad():
        for x, y, *_ in batches:
            x, y = _move(x, device), _move(y, device)
            with autocast if autocast is not None else contextlib.nullcontext():
                out = model(x)
                loss = float(loss_fn(out, y))
            loss_sum += loss * len(y)
            total += len(y)
            if classification is None:
                classification = is_classification(out, y)
                if not classification:
                    shapes = (f"outputs {tuple(getattr(out, 'shape', ()))} and targets "
                              f"{tuple(getattr(y, 'shape', ()))} ({getattr(y, 'dtype', type(y).__name__)})")
                    note_once(shapes, f"evaluation: {shapes} are not a classification ((N, C) vs integer (N,), or "
                              "(N, T, C) vs (N, T)); reporting the loss only, no accuracy")
            if classification:
                keep = y >= 0  # a negative class index is an "ignore" marker, never a class
                if skip is not None:
                    keep &= y != skip
                correct += int(((out.argmax(-1) == y) & keep).sum())
                counted += int(keep.sum())
    model.train(was_training)
    if total == 0:
        return {}
    metrics = {"loss": loss_sum / total}
    if classification and counted:
        metrics = {"accuracy": correct / counted, **metrics}
    return metrics


def _move(x, device):
    if isinstance(x, torch.Tensor):
        return x if x.device == device else x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_move(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _move(v, device) for k, v in x.items()}
    return x
