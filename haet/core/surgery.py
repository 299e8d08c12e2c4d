"""Model surgery that keeps the optimizer in step.

Replacing a module replaces its parameters; an optimizer built before the change would go on
updating tensors that are no longer in the model. `replace_modules` swaps modules and rewrites
the optimizer's parameter groups: a new parameter takes the place (and group) of the old one with
the same name, parameters with no predecessor join the group of their module's old parameters,
and optimizer state of parameters that were kept is kept.

Layers that stand in for a Linear (a method's sparse, factorized or quantized version) follow one
protocol so that other methods still find them: they expose integer ``in_features`` and
``out_features`` and compute ``x Wᵀ + b`` for a dense-equivalent W (`is_linear_like`); a layer that
wraps another exposes it as ``inner`` (`innermost`).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn


def replace_modules(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    make: Callable[[str, nn.Module], nn.Module | None], *, what: str = "replacement",
                    state=None) -> list[str]:
    """Replace each submodule for which ``make(name, module)`` returns a new module.

    Returns the names replaced, warns when none matched. When `state` (the Trainer's state) is
    given, ``state.model_version`` is incremented so meters re-measure.
    """
    targets = []
    for name, module in model.named_modules():
        if not name:
            continue
        new = make(name, module)
        if new is not None and new is not module:
            targets.append((name, module, new))
    if not targets:
        warnings.warn(f"{what}: no module of the model matched; nothing was changed", stacklevel=2)
        return []
    old_params = {id(p): n for n, p in model.named_parameters()}
    for name, _, new in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    if optimizer is not None:
        sync_optimizer(model, optimizer, old_params)
    if state is not None:
        state.model_version += 1
    return [name for name, _, _ in targets]


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, or a layer that stands in for one (see the module docstring)."""
    if isinstance(module, nn.Linear):
        return True
    return all(isinstance(getattr(module, a, None), int) and not isinstance(getattr(module, a), bool)
               for a in ("in_features", "out_features")) and not hasattr(module, "in_channels")


def innermost(module: nn.Module) -> nn.Module:
    """The layer a chain of wrappers (each exposing ``inner``) stands for."""
    seen = set()
    while isinstance(getattr(module, "inner", None), nn.Module) and id(module) not in seen:
        seen.add(id(module))
        module = module.inner
    return module


def sync_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, old_params: dict[int, str]) -> None:
    """Make `optimizer` hold exactly the trainable parameters of `model`.

    `old_params` maps ``id(param) -> name`` as it was before surgery. A parameter still in the
    model keeps its group and state; a new one goes to the group that held the old parameter of
    the same name, else the group of its module's old parameters, else the first group.
    """
    new_named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    group_of_name: dict[str, int] = {}
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) in old_params:
                group_of_name[old_params[id(p)]] = gi
    live = {id(p) for p in new_named.values()}
    placed = set()
    for group in optimizer.param_groups:
        kept = [p for p in group["params"] if id(p) in live]
        placed.update(id(p) for p in kept)
        group["params"] = kept
    for name, p in new_named.items():
        if id(p) in placed:
            continue
        optimizer.param_groups[_group_for(name, group_of_name)]["params"].append(p)
        placed.add(id(p))
    for key in [k for k in optimizer.state if id(k) not in live]:
        del optimizer.state[key]


def _group_for(name: str, group_of_name: dict[str, int]) -> int:
    """The group of the old parameter named `name`, else of the nearest enclosing module's."""
    if name in group_of_name:
        return group_of_name[name]
    prefix = name
    while prefix:
        prefix = prefix.rpartition(".")[0]
        for old_name, gi in group_of_name.items():
            if not prefix or old_name.startswith(prefix + "."):
                return gi
    return 0
