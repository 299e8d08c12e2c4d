"""What the Trainer shares with methods and meters while it runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .clock import PhaseClock
from .ledger import CostLedger


@dataclass(eq=False)
class State:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable
    device: torch.device
    seed: int
    clock: PhaseClock
    train_data: Any = None                # what the user passed (a Dataset or an iterable of batches)
    train_loader: Iterable | None = None  # this epoch's batches; a method may replace it at EPOCH_START
    batch_size: int = 64
    meters: dict = field(default_factory=dict)  # name -> Meter ("time", "memory", "flops", "energy")
    epochs: int = 0                       # the epoch to stop after
    epoch: int = 0                        # the current epoch, from 1
    step: int = 0                         # optimizer steps taken
    batch_index: int = 0                  # index of the batch within the epoch
    samples_seen: int = 0
    batch: tuple | None = None            # (x, y) or (x, y, sample_weights), on the device
    outputs: Any = None
    loss: torch.Tensor | None = None
    eval_metrics: dict = field(default_factory=dict)
    #: Incremented by every change to the model's structure; meters re-measure on change.
    model_version: int = 0
    #: Label of the arithmetic the model runs in (for FLOPs and energy): "float32", "int8", ...
    compute_dtype: str = "float32"
    #: Computes the gradients from ``loss``; a method that replaces backpropagation sets it
    #: (called with no argument; the default is ``state.loss.backward()``).
    backward_fn: Callable[[], Any] | None = None
    #: Performs the optimizer update; a method may replace it (fusion, custom updaters).
    step_fn: Callable[[], Any] | None = None
    #: Zeroes the gradients after the update; a method may replace it.
    zero_grad_fn: Callable[[], Any] | None = None
    stop_reason: str | None = None
    rank: int = 0
    world_size: int = 1
    #: Work done outside the measured step, charged by methods, read by meters (`charge`).
    ledger: CostLedger = field(default_factory=CostLedger)

    def charge(self, *, flops: float = 0.0, dtype: str = "float32", bytes_moved: float = 0.0,
               what: str = "", phase: str = "methods") -> None:
        """Charge work a method did outside the measured step (a selection pass, an SVD) to the
        run's cost; meters read it. `what` names it (``"gradmatch/selection"``)."""
        self.ledger.charge(flops=flops, dtype=dtype, bytes_moved=bytes_moved, what=what, phase=phase)

    def request_stop(self, reason: str) -> None:
        """Ask the Trainer to stop after the current batch; `reason` goes to ``stopped_by``."""
        if self.stop_reason is None:
            self.stop_reason = reason

    @property
    def unwrapped_model(self) -> nn.Module:
        """The model without a DistributedDataParallel wrapper."""
        return getattr(self.model, "module", self.model)
