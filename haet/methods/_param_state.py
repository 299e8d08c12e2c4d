"""Changing a parameter's shape while keeping the optimizer in step (used by gradmax, tensor_train).

`replace_modules` (haet.core.surgery) swaps modules and keeps the optimizer's groups right, but a
parameter that is *resized* (grown by new neurons) must also carry its optimizer state across:
momentum and second moments of the old entries, zeros for the new ones. `swap_parameters` puts each new parameter at the exact position of the old one in its
group (so an optimizer ``state_dict`` saved after the change loads into a model rebuilt the same
way) and maps each per-element state tensor (one with the parameter's shape, e.g. Adam's
``exp_avg``) with `transfer`; scalar state (Adam's ``step``) is copied.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

Transfer = Callable[[torch.Tensor, torch.Size], torch.Tensor]


def grow_into(old: torch.Tensor, new_shape: Sequence[int]) -> torch.Tensor:
    """A zero tensor of `new_shape` holding `old` in its leading block (entries appended at the end)."""
    out = old.new_zeros(tuple(new_shape))
    out[tuple(slice(0, n) for n in old.shape)] = old
    return out


def swap_parameters(optimizer: torch.optim.Optimizer | None,
                    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    transfer: Callable[[int, torch.Tensor], torch.Tensor] | None) -> None:
    """Replace each old parameter of `pairs` by its new one in `optimizer`, in place.

    ``transfer(i, tensor)`` maps a per-element state tensor of pair `i` to the new shape; with
    ``transfer=None`` the new parameters start with no state (fresh parameters).
    """
    if optimizer is None:
        return
    for i, (old, new) in enumerate(pairs):
        found = False
        for group in optimizer.param_groups:
            for j, p in enumerate(group["params"]):
                if p is old:
                    group["params"][j] = new
                    found = True
        if not found:  # the old parameter was not being optimized: neither is the new one
            continue
        state = optimizer.state.pop(old, None)
        if state and transfer is not None:
            optimizer.state[new] = {k: (transfer(i, v) if isinstance(v, torch.Tensor) and v.shape == old.shape
                                        else (v.clone() if isinstance(v, torch.Tensor) else v))
                                    for k, v in state.items()}
