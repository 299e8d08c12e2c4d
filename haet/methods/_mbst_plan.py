"""Planning and accounting of the sparsifiable layers' training state for `haet.methods.mbst`:
densities for a byte budget (`plan_sparsity`, `LayerPlanner`), the rebuild in sparse storage
(`sparsify_`), per-layer learning rates (`compensate_learning_rate_`) and live byte counts."""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import nn

from ..core.config import check_choice, check_range
from ..core.errors import ConfigError
from ..core.surgery import replace_modules
from ..meters.memory import tensor_bytes
from ._sparse_ops import (SCHEMES, BlockSparse, UnstructuredSparse, eligible, layer_bytes, layer_shape, max_changes,
                          optimizer_state_cost)

MIB = 2**20


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
