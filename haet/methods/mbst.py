"""Memory-bounded sparse training (MBST): train under a hard bound on the whole training footprint.

Paper: X. Ma, Z. Li, G. Yuan, W. Niu, B. Ren, Y. Wang, X. Lin, "Memory-Bounded Sparse Training on
the Edge", HAET workshop at ICLR 2021 (no public code found; follow-up: G. Yuan et al., "MEST:
Accurate and Fast Memory-Economic Sparse Training Framework on the Edge", NeurIPS 2021).
Prune-and-regrow as in RigL (U. Evci et al., "Rigging the Lottery: Making All Tickets Winners",
ICML 2020).

The footprint of a step is the training state (parameters and buffers, gradients, optimizer
state, sparse indices, the regrowth plan), the tensors autograd saves for backward, and the
workspace inside one layer's call (see `haet.methods._mbst_budget`). ``memory_mb`` (or
``memory_fraction`` of the dense footprint, the default) bounds their sum at every step. Two knobs
meet it: the sparsity of every Linear and ungrouped Conv (each layer's density min(1, eps * rho_l),
rho from ``allocation``: equal, Erdos-Renyi or Erdos-Renyi-Kernel) and the micro-batch: the batch
runs as micro-batches whose gradients add up to the batch's (the loss must be a mean over samples,
as cross-entropy's default; it is checked every step). The weights get up to ``weight_share`` of
the bound, the micro-batch is the largest whose measured activations fit in the rest; the plan is
measured on a sparsified copy before training. Sparse layers keep no dense copy of their weight
across forward and backward. Every ``update_every`` steps the weakest ``drop_fraction`` of each
layer's kept units (cosine-decayed to 0 at ``update_end`` of the run) move to the inactive units
with the largest gradient magnitude, with zero value and state; the count stays fixed. The
footprint is measured at every step (state from the live tensors, saved tensors with
`haet.meters.memory.SavedTensorPeak`) into ``mbst/footprint_bytes``; the workspace is reserved,
not measured (``mbst/workspace_bytes``). With ``lr_compensation`` a sparse layer's learning rate
is divided by its density (see `compensate_learning_rate_`). Schemes: see
`haet.methods._sparse_ops` (unstructured, block, channel).
"""

from __future__ import annotations

import math
import types
import weakref
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import check_choice, check_range
from ..core.errors import ConfigError
from ..core.method import Method
from ..meters.memory import SavedTensorPeak, tensor_bytes
from ._mbst_budget import TrainingPlan, example_batch, fixed_state_bytes, micro_step, plan_training
from ._mbst_plan import (MIB, LayerPlanner, bound_for_sparsity, compensate_learning_rate_, footprint_bytes,
                         plan_sparsity, sparsify_, training_state_bytes)
from ._sparse_ops import SCHEMES, BlockSparse, UnstructuredSparse

__all__ = ["MIB", "MBSTConfig", "BoundedSparseTraining", "LayerPlanner", "MemoryBoundedSparse", "apply_mbst",
           "bound_for_sparsity", "compensate_learning_rate_", "footprint_bytes", "plan_sparsity", "sparsify_",
           "training_state_bytes"]


@dataclass(frozen=True)
class MBSTConfig:
    memory_mb: float | None = None  # MiB for the whole training footprint; None: memory_fraction of dense
    memory_fraction: float = 0.25  # the bound as a share of dense training's footprint (when memory_mb is None)
    weight_share: float = 0.5      # the most of the bound the weights' state takes while activations could use it
    scheme: Literal["unstructured", "block", "channel"] = "unstructured"  # what a kept unit is
    update_every: int = 25         # steps between prune-and-regrow updates (RigL's Delta T)
    drop_fraction: float = 0.3     # share of kept units replaced at the first update (RigL's alpha)
    update_end: float = 0.75       # fraction of the run after which the pattern is frozen
    allocation: Literal["uniform", "er", "erk"] = "er"  # how densities spread over layers
    block: tuple[int, int] = (8, 1)  # block: output rows x input channels per block (at most); 8/1 ran fastest
    lr_compensation: bool = True   # sparse layers' lr x 1/density, so their outputs move at a dense layer's pace

    def __post_init__(self) -> None:
        if self.memory_mb is not None:
            check_range("memory_mb", self.memory_mb, 0, None, lo_open=True)
        check_range("memory_fraction", self.memory_fraction, 0, 1, lo_open=True, hi_open=True)
        check_range("weight_share", self.weight_share, 0, 1, lo_open=True)
        check_choice("scheme", self.scheme, SCHEMES)
        check_range("update_every", self.update_every, 1, None, integer=True)
        check_range("drop_fraction", self.drop_fraction, 0, 1, hi_open=True)
        check_range("update_end", self.update_end, 0, 1)
        check_choice("allocation", self.allocation, ("uniform", "er", "erk"))
        if not (isinstance(self.block, tuple) and len(self.block) == 2):
            raise ConfigError(f"block must be two positive integers (rows/cols, e.g. 8/2), got {self.block!r}")
        for b in self.block:
            check_range("block", b, 1, None, integer=True)


class BoundedSparseTraining:
    """What `apply_mbst` returns: the plan, the layers under it, and training steps that keep it.

    ``step(x, y)`` runs the forward and backward of a batch in the plan's micro-batches (the
    gradients accumulate to the batch's); call ``optimizer.step()`` after it as usual, then
    ``apply_regrowth(optimizer)`` when ``set_regrowth(fraction)`` asked for one before the step."""

    def __init__(self, model: nn.Module, plan: TrainingPlan, layers: list[nn.Module]) -> None:
        self.model, self.plan, self.layers = model, plan, layers

    @property
    def micro_batch(self) -> int:
        return self.plan.micro_batch

    def sparse_layers(self) -> list[nn.Module]:
        return [m for m in self.layers if isinstance(m, (UnstructuredSparse, BlockSparse))]

    def step(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None, *,
             loss_fn: Callable = F.cross_entropy, forward: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(outputs, loss) of the batch, detached; the parameters' gradients are its gradients."""
        return micro_step(forward or self.model, x, y, w, loss_fn, self.plan.micro_batch)

    def set_regrowth(self, fraction: float) -> int:
        """Ask each sparse layer to plan replacing `fraction` of its kept units at the next backward."""
        for m in self.sparse_layers():
            m.changes = round(fraction * (m.values.shape[0] if isinstance(m, UnstructuredSparse)
                                          else m.shape.rows * m.kept))
        return sum(m.changes for m in self.sparse_layers())

    def apply_regrowth(self, optimizer: torch.optim.Optimizer | None) -> int:
        """Move the planned units (values, gradients and optimizer state zeroed); the count changed."""
        moved = 0
        for m in self.sparse_layers():
            moved += m.apply_pending(optimizer)
            m.changes = 0
        return moved


def apply_mbst(model: nn.Module, config: MBSTConfig, *, optimizer: torch.optim.Optimizer | None = None,
               filter_fn: Callable[[str, nn.Module], bool] | None = None,
               batch: tuple[torch.Tensor, torch.Tensor] | None = None,
               loss_fn: Callable = F.cross_entropy) -> BoundedSparseTraining:
    """Plan the footprint for training batches like `batch` (x, y: one batch of the batch size) and
    rebuild `model`'s layers in sparse storage (keeping `optimizer` in step). ConfigError when the
    bound is not below the dense footprint or cannot hold the sparsest model at the smallest
    micro-batch (the message names the smallest bound that works)."""
    if batch is None:
        raise ConfigError("mbst: apply_mbst needs batch=(x, y), one training batch, to measure the activations")
    c = config
    planner = LayerPlanner(model, c.scheme, optimizer=optimizer, allocation=c.allocation, block=c.block,
                           drop_fraction=c.drop_fraction, layer_filter=filter_fn)
    fixed = fixed_state_bytes(model, planner.names, planner.per_elem, planner.per_tensor)
    plan = plan_training(model, batch[0], batch[1], loss_fn, memory_mb=c.memory_mb, memory_fraction=c.memory_fraction,
                         weight_share=c.weight_share, plan_layers=planner.plan,
                         sparsify=lambda m, layers: sparsify_(m, layers, warn=False), fixed=fixed,
                         smallest_layers=planner.smallest, dense_layers=planner.dense)
    layers = sparsify_(model, plan.layers, optimizer=optimizer, warn=False)
    if c.lr_compensation and optimizer is not None:
        compensate_learning_rate_(optimizer, layers)
    return BoundedSparseTraining(model, plan, layers)


#: model -> its micro-batching forward while an mbst run trains it
_MICRO: "weakref.WeakKeyDictionary[nn.Module, Callable]" = weakref.WeakKeyDictionary()


def _forward(module: nn.Module, *args, **kwargs):
    original = type(module).forward.__get__(module)
    micro = _MICRO.get(module)
    return original(*args, **kwargs) if micro is None else micro(original, *args, **kwargs)


class MemoryBoundedSparse(Method):
    name = "mbst"
    summary = ("sparse training whose whole footprint (weights, grads, optimizer state, activations) stays under "
               "a bound: sparsity and micro-batches")
    paper = ("Ma, Li, Yuan, Niu, Ren, Wang, Lin: Memory-Bounded Sparse Training on the Edge (HAET @ ICLR 2021); "
             "regrowth as in Evci et al., Rigging the Lottery (ICML 2020)")
    config_class = MBSTConfig
    # micro-batches run forward and backward inside the model's call (the Trainer's backward is skipped)
    owns = frozenset({"weight_sparsity", "layer_types", "backward"})

    def __init__(self, config: MBSTConfig | None = None, /, **params) -> None:
        super().__init__(config, **params)
        self.run: BoundedSparseTraining | None = None
        self.peak_bytes = 0
        self.epoch_peak = 0
        self.updates = 0
        self.changed_units = 0
        self.sparse_hw_flops_saved = 0.0
        self.update_end_step: int | None = None
        self._updating = False
        self._window: SavedTensorPeak | None = None
        self._grad_bytes = 0
        self._state_bytes = 0
        self._step_saved = 0
        self._armed = False
        self._micro_loss: torch.Tensor | None = None

    @property
    def layers(self) -> list[nn.Module]:
        return self.run.layers if self.run is not None else []

    @property
    def plan(self) -> list[dict]:
        return self.run.plan.layers if self.run is not None else []

    def check_compatible(self, others: list[Method]) -> None:
        for other in others:
            if "optimizer_step" in other.owns and getattr(other.config, "mode", None) == "backward":
                raise ConfigError(f"mbst runs a batch as micro-batches, each with its backward; {other.name}:"
                                  "mode=backward would update the weights after each micro-batch; use "
                                  f"{other.name}:mode=forward with mbst")
        if self.config.lr_compensation:
            for other in others:
                if "optimizer_step" in other.owns and not other.reads_group_hyperparameters:
                    raise ConfigError(f"mbst:lr_compensation=true sets per-layer learning rates in the optimizer's "
                                      f"groups, which {other.name}'s own update does not read; "
                                      "use mbst:lr_compensation=false with it")

    # -- events ------------------------------------------------------------------------------
    def fit_start(self, state) -> None:
        if state.world_size > 1:
            raise ConfigError("mbst bounds one process's footprint; run it without torchrun")
        model = state.unwrapped_model
        self.run = apply_mbst(model, self.config, optimizer=state.optimizer, batch=example_batch(state),
                              loss_fn=state.loss_fn)
        state.model_version += 1
        self._install(state)

    def _install(self, state) -> None:
        """Run the Trainer's forward of a batch larger than the micro-batch as micro-batches, each
        with its backward; the Trainer's backward then only checks the loss (`_backward`)."""
        model, run = state.unwrapped_model, self.run

        def micro(original, *args, **kwargs):
            x = args[0] if len(args) == 1 and not kwargs else None
            if self._armed and isinstance(x, torch.Tensor) and len(x) > run.micro_batch and model.training \
                    and torch.is_grad_enabled():
                self._armed = False
                y, *w = state.batch[1:]
                outputs, self._micro_loss = run.step(x, y, w[0] if w else None, loss_fn=state.loss_fn,
                                                     forward=original)
                return outputs
            return original(*args, **kwargs)

        _MICRO[model] = micro
        model.forward = types.MethodType(_forward, model)   # a copy of the model gets its own, plain forward
        state.backward_fn = lambda: self._backward(state)

    def fit_end(self, state) -> None:
        model = state.unwrapped_model
        _MICRO.pop(model, None)
        model.__dict__.pop("forward", None)
        state.backward_fn = None

    def _backward(self, state) -> None:
        if self._micro_loss is None:
            state.loss.backward()
            return
        loss, self._micro_loss = self._micro_loss, None
        if not torch.allclose(state.loss.detach(), loss, rtol=1e-4, atol=1e-6):
            raise ConfigError(f"mbst: the batch loss ({float(state.loss):.6g}) is not the sum of its micro-batches' "
                              f"({float(loss):.6g}): the loss is not a mean over samples, or another method changed it "
                              "after the forward; micro-batched gradients cannot follow")

    def epoch_start(self, state) -> None:
        if self.update_end_step is None and hasattr(state.train_loader, "__len__"):
            self.update_end_step = int(self.config.update_end * state.epochs * len(state.train_loader))
        self.epoch_peak = 0

    def batch_start(self, state) -> None:
        c, t = self.config, state.step + 1
        end = self.update_end_step
        fraction = c.drop_fraction if end is None else \
            c.drop_fraction / 2 * (1 + math.cos(math.pi * min(t, end) / max(end, 1)))
        self._updating = t % c.update_every == 0 and (end is None or t <= end) and fraction > 0 \
            and bool(self.run.sparse_layers())
        if self._updating:
            self.run.set_regrowth(fraction)
            if c.scheme != "unstructured":
                state.model_version += 1     # this step computes dense gradients: meters measure it apart
        self._armed = True
        self._close_window()
        model = state.unwrapped_model
        self._window = SavedTensorPeak(exclude=[*model.parameters(), *model.buffers()]).__enter__()

    def after_forward(self, state) -> None:
        self._armed = False           # only the Trainer's forward of this batch runs as micro-batches

    def after_backward(self, state) -> None:
        saved = self._close_window()
        self._grad_bytes = tensor_bytes(p.grad for p in state.unwrapped_model.parameters())
        with_grads = training_state_bytes(state.unwrapped_model, state.optimizer)   # the plan is still held here
        self._step_saved = saved
        self._state_bytes = with_grads
        if self._updating:
            self.changed_units += self.run.apply_regrowth(state.optimizer)
            self.updates += 1
            if self.config.scheme != "unstructured":
                state.model_version += 1

    def after_step(self, state) -> None:
        # gradients (freed by zero_grad by now) coexisted with the updated optimizer state
        after = training_state_bytes(state.unwrapped_model, state.optimizer, grads=False) + self._grad_bytes
        self._record(max(self._state_bytes, after) + self._step_saved)
        if self.config.scheme == "unstructured":
            batch = len(state.batch[1])
            self.sparse_hw_flops_saved += sum(6.0 * batch * m.positions * (m.shape.numel - m.values.numel())
                                              for m in self.run.sparse_layers())

    def before_eval(self, state) -> None:
        self._close_window()          # a step stopped before backward (non-finite loss) leaves it open

    def _close_window(self) -> int:
        if self._window is None:
            return 0
        self._window.__exit__(None, None, None)
        peak, self._window = self._window.peak, None
        return peak

    # -- results -----------------------------------------------------------------------------
    def epoch_metrics(self) -> dict:
        return {"mbst/footprint_bytes": self.epoch_peak}

    def metrics(self) -> dict:
        plan = self.run.plan
        weights = sum(p["shape"].numel for p in plan.layers)
        kept = sum(min(p["kept"], p["shape"].units) * p["shape"].rows * p["shape"].unit_numel for p in plan.layers)
        out = {"mbst/footprint_bytes": self.peak_bytes, "mbst/peak_footprint_bytes": self.peak_bytes,
               "mbst/workspace_bytes": plan.workspace, "mbst/bound_bytes": plan.bound,
               "mbst/dense_footprint_bytes": plan.dense_footprint, "mbst/micro_batch": plan.micro_batch,
               "mbst/sparsity": 1 - kept / weights if weights else None, "mbst/updates": self.updates,
               "mbst/regrown_units": self.changed_units, "mbst/layers": len(self.run.sparse_layers())}
        if self.config.scheme == "unstructured":   # an estimate for zero-skipping hardware, not realized here
            out["mbst/sparse_hw_flops_saved_estimate"] = self.sparse_hw_flops_saved
        for p in plan.layers:
            out[f"mbst/{p['name']}/density"] = p["density"]
        return out

    def state_dict(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "updates": self.updates, "changed_units": self.changed_units,
                "sparse_hw_flops_saved": self.sparse_hw_flops_saved}

    def load_state_dict(self, state_dict: dict) -> None:
        self.peak_bytes, self.updates = state_dict["peak_bytes"], state_dict["updates"]
        self.changed_units = state_dict["changed_units"]
        self.sparse_hw_flops_saved = state_dict["sparse_hw_flops_saved"]

    def _sparse(self):
        return self.run.sparse_layers() if self.run is not None else []

    def _record(self, nbytes: int) -> None:
        self.peak_bytes = max(self.peak_bytes, nbytes)
        self.epoch_peak = max(self.epoch_peak, nbytes)
        if nbytes + self.run.plan.workspace > self.run.plan.bound:   # the plan was measured to fit; say so if not
            raise RuntimeError(f"mbst: measured footprint {nbytes} bytes + workspace {self.run.plan.workspace} "
                               f"exceeds the bound of {self.run.plan.bound} bytes")
