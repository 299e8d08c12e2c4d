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
import warnings
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import check_choice, check_range
from ..core.errors import ConfigError
from ..core.method import Method
from ..core.surgery import replace_modules
from ..meters.memory import SavedTensorPeak, tensor_bytes
from ._mbst_budget import TrainingPlan, example_batch, fixed_state_bytes, micro_step, plan_training
from ._sparse_ops import (SCHEMES, BlockSparse, UnstructuredSparse, eligible, layer_bytes, layer_shape, max_changes,
                          optimizer_state_cost)

MIB = 2**20


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


def plan_sparsity(model: nn.Module, memory_mb: float, scheme: str = "unstructured", *,
                  optimizer: torch.optim.Optimizer | None = None, allocation: str = "er",
                  block: tuple[int, int] = (8, 1), drop_fraction: float = 0.3,
                  layer_filter: Callable[[str, nn.Module], bool] | None = None) -> list[dict]:
    """Per sparsifiable layer: name, kept units per row group, density and the bytes of its
    training state (values, gradients, optimizer state, index, plan, bias) within `memory_mb` for
    these layers' state alone (`plan_training` adds the rest of the footprint).

    Raises ConfigError naming the smallest bound that could work when even the sparsest model
    does not fit. `optimizer` sets the state bytes per weight (None: no optimizer state)."""
    return LayerPlanner(model, scheme, optimizer=optimizer, allocation=allocation, block=block,
                        drop_fraction=drop_fraction, layer_filter=layer_filter).plan(memory_mb * MIB)


class LayerPlanner:
    """Densities of the sparsifiable layers for a byte budget of their training state."""

    def __init__(self, model: nn.Module, scheme: str = "unstructured", *,
                 optimizer: torch.optim.Optimizer | None = None, allocation: str = "er",
                 block: tuple[int, int] = (8, 1), drop_fraction: float = 0.3,
                 layer_filter: Callable[[str, nn.Module], bool] | None = None) -> None:
        check_choice("scheme", scheme, SCHEMES)
        check_choice("allocation", allocation, ("uniform", "er", "erk"))
        layers = [(n, m) for n, m in model.named_modules()
                  if n and eligible(m) and (layer_filter is None or layer_filter(n, m))]
        if not layers:
            raise ConfigError("mbst: the model has no Linear or ungrouped Conv layer to sparsify")
        dtype, device = layers[0][1].weight.dtype, layers[0][1].weight.device
        self.per_elem, self.per_tensor = optimizer_state_cost(optimizer, dtype, device)
        self.names = {n for n, _ in layers}
        self.scheme, self.drop_fraction = scheme, drop_fraction
        self.shapes = [layer_shape(n, m, scheme, block) for n, m in layers]
        self.rho = [1.0 if allocation == "uniform" else s.erk(allocation == "erk") for s in self.shapes]
        self.vb = torch.empty((), dtype=dtype).element_size()
        self.smallest = self.total(self.kept_at(0.0))
        self.dense = self.total([s.units for s in self.shapes])

    def cost(self, s, k: int) -> int:
        return layer_bytes(s, k, self.vb, self.per_elem, self.per_tensor, max_changes(s, k, self.drop_fraction))

    def total(self, kept: list[int]) -> int:
        return sum(self.cost(s, k) for s, k in zip(self.shapes, kept))

    def kept_at(self, eps: float) -> list[int]:
        kept = [max(s.min_kept, min(s.units, math.floor(min(1.0, eps * r) * s.units + 1e-9)))
                for s, r in zip(self.shapes, self.rho)]
        # nearly dense layers are cheaper dense than with an index
        return [s.units if self.cost(s, s.units) <= self.cost(s, k) else k for s, k in zip(self.shapes, kept)]

    def plan(self, bound: float) -> list[dict]:
        """The largest eps whose state fits in `bound` bytes."""
        if self.smallest > bound:
            raise ConfigError(f"mbst: memory_mb={bound / MIB:g} cannot hold this model's {self.scheme} training "
                              f"state; the smallest bound that works is "
                              f"memory_mb={math.ceil(self.smallest / MIB * 1e4) / 1e4:g} ({self.smallest} bytes, "
                              f"the sparsest plan)")
        lo, hi = 0.0, max(1.0 / r for r in self.rho)
        if self.total(self.kept_at(hi)) > bound:
            for _ in range(100):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if self.total(self.kept_at(mid)) <= bound else (lo, mid)
        else:
            lo = hi
        kept = self.kept_at(lo)
        return [{"name": s.name, "shape": s, "kept": k, "density": k / s.units, "bytes": self.cost(s, k)}
                for s, k in zip(self.shapes, kept)]


def sparsify_(model: nn.Module, plan: list[dict], *, optimizer: torch.optim.Optimizer | None = None,
              state=None, warn: bool = True) -> list[nn.Module]:
    """Rebuild the planned layers in sparse storage (largest weights/blocks kept); layers whose plan
    keeps every unit stay dense. Returns the modules under the bound (sparse and dense-kept)."""
    by_name = {p["name"]: p for p in plan if p["kept"] < p["shape"].units}

    def make(name: str, module: nn.Module):
        p = by_name.get(name)
        if p is None:
            return None
        cls = UnstructuredSparse if p["shape"].rows == 1 and p["shape"].unit_numel == 1 else BlockSparse
        return cls(module, p["shape"], p["kept"])

    if by_name:
        replace_modules(model, optimizer, make, what="mbst", state=state)
    elif warn:
        warnings.warn("mbst: the bound holds the dense model; no layer was sparsified", stacklevel=2)
    return [model.get_submodule(p["name"]) for p in plan]


def compensate_learning_rate_(optimizer: torch.optim.Optimizer, modules: list[nn.Module]) -> None:
    """Give each sparse layer's kept weights their own parameter group with lr / density.

    A layer that keeps a fraction d of its connections sums d times as many terms, so an update of
    the usual size moves its outputs d times as far as in the dense layer (with Adam, whose step
    per weight does not depend on the gradient's scale, and with SGD alike); lr / d restores the
    dense pace. Measured on mnist5k-cnn at 90% sparsity, 3 epochs: 0.83 accuracy without, 0.91 with
    (dense 0.92)."""
    for m in modules:
        if not isinstance(m, (UnstructuredSparse, BlockSparse)):
            continue
        density = m.values.numel() / m.shape.numel
        for group in optimizer.param_groups:
            if any(p is m.values for p in group["params"]):
                group["params"] = [p for p in group["params"] if p is not m.values]
                new = {k: v for k, v in group.items() if k != "params"}
                for key in ("lr", "initial_lr"):
                    if key in new:
                        new[key] = new[key] / density
                optimizer.add_param_group({**new, "params": [m.values]})
                break


def footprint_bytes(modules: list[nn.Module], optimizer: torch.optim.Optimizer | None, *,
                    grads: bool = True) -> int:
    """Bytes of the live training state of `modules`: parameters, index buffers, gradients (when
    `grads`), optimizer state and any pending regrowth plan."""
    total = 0
    for m in modules:
        params = [p for p in m.parameters(recurse=False)]
        tensors = params + list(m.buffers(recurse=False))
        if grads:
            tensors += [p.grad for p in params if p.grad is not None]
        if optimizer is not None:
            tensors += [t for p in params for t in optimizer.state.get(p, {}).values() if isinstance(t, torch.Tensor)]
        pending = getattr(m, "pending", None)
        if pending is not None:
            tensors += list(pending)
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def bound_for_sparsity(model: nn.Module, sparsity: float, scheme: str = "unstructured", **kwargs) -> float:
    """The smallest memory_mb whose plan keeps at most (1 - sparsity) of the sparsifiable weights."""
    check_range("sparsity", sparsity, 0, 1, hi_open=True)
    weights = sum(m.weight.numel() for n, m in model.named_modules() if n and eligible(m))
    dense_mb = 64.0 * weights / MIB + 1.0
    lo, hi = 1e-9, dense_mb
    for _ in range(60):
        mid = (lo + hi) / 2
        try:
            plan = plan_sparsity(model, mid, scheme, **kwargs)
        except ConfigError:
            lo = mid
            continue
        kept = sum(p["kept"] * p["shape"].rows * p["shape"].unit_numel for p in plan)
        lo, hi = (mid, hi) if kept <= (1 - sparsity) * weights else (lo, mid)
    return lo


def training_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None, *, grads: bool = True) -> int:
    """Live bytes of the whole model's training state: parameters, buffers (sparse indices
    included), gradients (when `grads`), optimizer state and pending regrowth plans."""
    params = list(model.parameters())
    tensors = params + list(model.buffers())
    if grads:
        tensors += [p.grad for p in params]
    if optimizer is not None:
        tensors += [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    tensors += [t for m in model.modules() if getattr(m, "pending", None) is not None for t in m.pending]
    return tensor_bytes(tensors)


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
        self._armed = False
        self._micro_loss: torch.Tensor | None = None

    @property
    def layers(self) -> list[nn.Module]:
        return self.run.layers if self.run is not None else []

    @property
    def plan(self) -> list[dict]:
        return self.run.plan.layers if self.run is not None else []

    def check_compatible(self, others: list[Method]) -> None:
        if self.config.lr_compensation:
            for other in others:
                if "optimizer_step" in other.owns:
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
        original = model.forward

        def forward(*args, **kwargs):
            x = args[0] if len(args) == 1 and not kwargs else None
            if self._armed and isinstance(x, torch.Tensor) and len(x) > run.micro_batch and model.training \
                    and torch.is_grad_enabled():
                self._armed = False
                y, *w = state.batch[1:]
                outputs, self._micro_loss = run.step(x, y, w[0] if w else None, loss_fn=state.loss_fn,
                                                     forward=original)
                return outputs
            return original(*args, **kwargs)

        model.forward = forward
        state.backward_fn = lambda: self._backward(state)

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
