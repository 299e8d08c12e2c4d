"""The whole training footprint for `haet.methods.mbst`: what a micro-batch saves for backward,
the workspace reserved around it, and training steps run in micro-batches.

The footprint of a step is the training state (parameters, buffers, gradients, optimizer state,
indices, the regrowth plan) plus the tensors autograd saves for backward, plus workspace: the
tensors that live only inside one layer's call. The saved tensors are *measured* (forward and
backward of one micro-batch on a copy of the model, with `haet.meters.memory.SavedTensorPeak`);
the workspace is reserved from sizes seen in that run: twice the largest activation (the output
gradient and the input gradient of the layer in backward), the dense kernels a sparse layer
rebuilds (unstructured: kernel and its gradient; block/channel on an update step: the gradient)
and the step's outputs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..core.errors import ConfigError
from ..meters.memory import SavedTensorPeak
from ._sparse_ops import BlockSparse, UnstructuredSparse


@dataclass(frozen=True)
class Probe:
    """One micro-batch's forward and backward, measured."""
    saved: int        # peak bytes saved for backward (parameters and buffers left out)
    largest: int      # bytes of the largest tensor a leaf module took or produced
    outputs: int      # bytes of the model's output for the whole batch


def min_micro_batch(model: nn.Module) -> int:
    """Batch norm needs two samples per micro-batch to compute a variance."""
    return 2 if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) else 1


def probe(model: nn.Module, x_full: torch.Tensor, y_full: torch.Tensor, micro_batch: int, loss_fn: Callable, *,
          update: bool = False) -> Probe:
    """Run forward and backward of the first `micro_batch` samples of the batch on `model` (pass a copy: its gradients and batch-norm statistics change) and
    measure. `update`: the sparse layers plan a regrowth on this step."""
    for m in model.modules():
        if isinstance(m, (UnstructuredSparse, BlockSparse)):
            m.changes = 1 if update else 0
    largest = [0]

    def seen(module, inputs, output):
        for t in (*inputs, output):
            if isinstance(t, torch.Tensor):
                largest[0] = max(largest[0], t.numel() * t.element_size())

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(seen) for m in leaves]
    model.train()
    try:
        with SavedTensorPeak(exclude=[*model.parameters(), *model.buffers()]) as peak:
            out = model(x_full[:micro_batch].clone())   # a copy, as `micro_step` passes
            if not isinstance(out, torch.Tensor):
                raise ConfigError(f"mbst runs micro-batches of models that return a tensor; this one returns "
                                  f"{type(out).__name__}")
            loss_fn(out, y_full[:micro_batch]).backward()
    finally:
        for h in handles:
            h.remove()
        for m in model.modules():
            if isinstance(m, (UnstructuredSparse, BlockSparse)):
                m.changes, m.pending = 0, None
    per_sample = out[0].numel() * out.element_size()
    return Probe(peak.peak, largest[0], per_sample * len(x_full))


def kernel_workspace(model: nn.Module) -> int:
    """Bytes of the dense kernels a sparse layer builds inside its call (the largest layer's)."""
    most = 0
    for m in model.modules():
        if isinstance(m, UnstructuredSparse):        # the kernel and its gradient, in the backward
            most = max(most, 2 * m.shape.numel * m.values.element_size())
        elif isinstance(m, BlockSparse):             # the dense gradient that scores a regrowth
            most = max(most, m.shape.numel * m.values.element_size())
    return most


def activation_bytes(model: nn.Module, x_full: torch.Tensor, y_full: torch.Tensor, micro_batch: int,
                     loss_fn: Callable) -> tuple[int, int]:
    """(saved, workspace) bytes of a micro-batch of `model`, measured on a copy; the larger of a
    plain step and an update step."""
    saved, largest, outputs = 0, 0, 0
    for update in (False, True):
        p = probe(copy.deepcopy(model), x_full, y_full, micro_batch, loss_fn, update=update)
        saved, largest, outputs = max(saved, p.saved), max(largest, p.largest), p.outputs
    return saved, 2 * largest + kernel_workspace(model) + outputs


def chunk_loss(loss_fn: Callable, out: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, n_total: int,
               w_total: torch.Tensor | None) -> torch.Tensor:
    """A micro-batch's share of the batch loss: the batch's mean loss (or weighted mean, as the
    Trainer computes it) is the sum of these shares, so the gradients add up to the batch's."""
    if w is None:
        return loss_fn(out, y) * (len(y) / n_total)
    return (loss_fn(out, y, reduction="none") * w).sum() / w_total


def micro_step(forward: Callable, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, loss_fn: Callable,
               micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of the batch in micro-batches of at most `micro_batch` samples; the
    gradients accumulate to the whole batch's. Returns (outputs, loss), both detached."""
    n = len(y)
    w_total = w.sum() if w is not None else None
    outputs, total = [], torch.zeros((), device=y.device)
    for start in range(0, n, micro_batch):
        part = slice(start, start + micro_batch)
        out = forward(x[part].clone())     # its own storage: what the first layer saves is this micro-batch
        loss = chunk_loss(loss_fn, out, y[part], None if w is None else w[part], n, w_total)
        loss.backward()
        outputs.append(out.detach())
        total = total + loss.detach()
        del out, loss
    return torch.cat(outputs), total


def example_batch(state) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch of the run's batch size, read before the first step (for the probes)."""
    data = state.train_data
    if hasattr(data, "x") and hasattr(data, "y"):           # TensorData
        n = min(state.batch_size, len(data.x))
        x, y = data.x[:n], data.y[:n]
    elif isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        items = [data[i] for i in range(min(state.batch_size, len(data)))]
        x = torch.stack([torch.as_tensor(it[0]) for it in items])
        y = torch.stack([torch.as_tensor(it[1]) for it in items])
    else:
        x, y, *_ = next(iter(data))
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ConfigError("mbst needs tensor batches (x, y) to split into micro-batches")
    return x.to(state.device).clone(), y.to(state.device).clone()


# -- the plan ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingPlan:
    """What mbst runs with, and the bytes of each part of the footprint it expects."""
    layers: list          # per sparsifiable layer: name, shape, kept, density, bytes (`plan_sparsity`)
    micro_batch: int      # samples per forward/backward; the batch is their sum
    batch_size: int
    bound: int            # bytes
    state: int            # parameters, buffers, gradients, optimizer state, indices, plan (arithmetic)
    saved: int            # measured: peak bytes saved for backward by one micro-batch
    workspace: int        # reserved: see the module docstring
    dense_footprint: int  # dense training at the whole batch: state + saved + workspace

    @property
    def total(self) -> int:
        return self.state + self.saved + self.workspace


def fixed_state_bytes(model: nn.Module, planned: set[str], per_elem: int, per_tensor: int) -> int:
    """Training state of what mbst does not sparsify: other parameters (value, gradient, optimizer
    state) and every buffer."""
    own = {id(p) for n, m in model.named_modules() if n in planned for p in m.parameters(recurse=False)}
    total = sum(b.numel() * b.element_size() for b in model.buffers())
    for p in model.parameters():
        if id(p) not in own:
            total += p.numel() * (2 * p.element_size() + (per_elem if p.requires_grad else 0)) + per_tensor
    return total


def plan_training(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, *, memory_mb: float | None,
                  memory_fraction: float, weight_share: float, plan_layers: Callable[[float], list],
                  sparsify: Callable[[nn.Module, list], None], fixed: int, smallest_layers: int,
                  dense_layers: int) -> TrainingPlan:
    """Choose the sparsity and the micro-batch so that state + saved + workspace <= the bound.

    `plan_layers(bytes)` plans the sparsifiable layers' state within `bytes` (ConfigError if it
    cannot); `sparsify(copy, plan)` applies a plan to a copy. The weights get up to
    `weight_share` of the bound (all of it that the whole batch's activations leave, if more),
    never more than dense; the micro-batch is the largest whose measured bytes fit in the rest.
    Every candidate is measured on a sparsified copy before it is accepted."""
    n = len(y)
    b_min = min(min_micro_batch(model), n)
    saved_n, ws_n = activation_bytes(model, x, y, n, loss_fn)
    dense = fixed + dense_layers + saved_n + ws_n
    if memory_mb is not None:
        bound = int(memory_mb * 2**20)
        if bound >= dense:
            raise ConfigError(f"mbst: memory_mb={memory_mb:g} ({bound} bytes) is at least the dense training "
                              f"footprint ({dense} bytes at batch {n}): nothing to bound; give a smaller memory_mb, "
                              f"or memory_fraction (0 to 1, of the dense footprint)")
    else:
        bound = int(memory_fraction * dense)
    saved_0, ws_0 = activation_bytes(model, x, y, b_min, loss_fn) if n > b_min else (saved_n, ws_n)

    def estimate(b: int) -> float:      # dense activations, linear in the micro-batch
        a0, a1 = saved_0 + ws_0, saved_n + ws_n
        return a0 + (a1 - a0) * (b - b_min) / max(n - b_min, 1)

    budget = min(dense_layers, max(weight_share * bound - fixed, bound - fixed - estimate(n)))
    for _ in range(40):
        if budget < smallest_layers:
            break
        layers = plan_layers(budget)
        state = fixed + sum(p["bytes"] for p in layers)
        fits = [b for b in range(n, b_min - 1, -1) if state + estimate(b) <= bound]
        b = fits[0] if fits else b_min
        trial = copy.deepcopy(model)
        sparsify(trial, layers)
        while True:
            saved, ws = activation_bytes(trial, x, y, b, loss_fn)
            if state + saved + ws <= bound:
                return TrainingPlan(layers, b, n, bound, state, saved, ws, dense)
            if b == b_min:
                break
            b = max(b_min, min(b - 1, int(b * (bound - state) / (saved + ws))))
        budget = min(budget - (state + saved + ws - bound), budget * 0.98)
    trial = copy.deepcopy(model)
    sparsify(trial, plan_layers(smallest_layers))
    saved, ws = activation_bytes(trial, x, y, b_min, loss_fn)
    need = fixed + smallest_layers + saved + ws
    raise ConfigError(f"mbst: {bound} bytes cannot hold this model's training at micro-batch {b_min}; the smallest "
                      f"bound that works is memory_mb={need / 2**20 + 5e-5:.4f} ({need} bytes: sparsest state "
                      f"{fixed + smallest_layers}, saved for backward {saved}, workspace {ws})")
