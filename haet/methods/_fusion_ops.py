"""Per-parameter optimizer updates for `haet.methods.fusion`.

The maths of torch.optim's SGD, Adam and AdamW applied to one parameter at a time, keeping the
optimizer's own state layout (``momentum_buffer``; ``step``, ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``), so checkpoints, learning-rate schedulers and a later plain
``optimizer.step()`` see what torch.optim itself would have left.

Two kernels:
- ``fused``: torch's fused kernels (``_fused_sgd_``, ``_fused_adam_``, ``_fused_adamw_``, the ones
  behind ``fused=True``) called directly on the one parameter. Same maths; the order of the float
  operations differs from the per-parameter loop, so results agree to a few float32 ulps.
- ``optimizer``: torch.optim's functional form with the group's own ``foreach``/``fused`` flags:
  bit for bit what the optimizer's ``step()`` computes for that parameter.
"""

from __future__ import annotations

import torch
from torch.optim.adam import adam as _adam
from torch.optim.sgd import sgd as _sgd

from ..core.errors import ConfigError

SUPPORTED = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def check_optimizer(optimizer) -> None:
    """Raise ConfigError unless fusion can reproduce `optimizer`'s update exactly."""
    if type(optimizer) not in SUPPORTED:
        raise ConfigError(f"fusion supports torch.optim.SGD, Adam and AdamW (their update needs only the "
                          f"parameter's own gradient); got {type(optimizer).__name__}")
    if getattr(optimizer, "grad_scale", None) is not None or getattr(optimizer, "found_inf", None) is not None:
        raise ConfigError("fusion cannot be combined with a GradScaler: skipping a step on overflow needs "
                          "every gradient before any update")


def hyperparams(group: dict) -> dict:
    """A snapshot of a parameter group's hyperparameters (tensor values copied)."""
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in group.items() if k != "params"}


def ensure_state(optimizer, p: torch.Tensor, hp: dict, kernel: str) -> dict:
    """The optimizer state of `p`, created as torch.optim's lazy initialization does (Adam/AdamW)."""
    state = optimizer.state[p]
    if isinstance(optimizer, torch.optim.Adam):
        on_device = kernel == "fused" or hp["fused"] or hp["capturable"]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device) if on_device \
                else torch.tensor(0.0, dtype=torch.get_default_dtype())
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if hp["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif on_device and (state["step"].device != p.device or state["step"].dtype != torch.float32):
            state["step"] = state["step"].to(p.device, torch.float32)
    return state


def update_param(optimizer, p: torch.Tensor, grad: torch.Tensor, hp: dict, kernel: str) -> None:
    """Apply `optimizer`'s update to the single parameter `p` with gradient `grad`."""
    if kernel == "fused" and not _fusable(p, hp):
        kernel = "optimizer"
    with torch.no_grad():
        if isinstance(optimizer, torch.optim.Adam):
            _adam_update(optimizer, p, grad, hp, kernel)
        else:
            _sgd_update(optimizer, p, grad, hp, kernel)


def _fusable(p: torch.Tensor, hp: dict) -> bool:
    return (p.device.type in ("cpu", "cuda") and p.is_floating_point() and not hp.get("differentiable", False)
            and not any(isinstance(hp.get(k), torch.Tensor) for k in ("lr", "weight_decay")))


def _adam_update(optimizer, p, grad, hp, kernel) -> None:
    state = ensure_state(optimizer, p, hp, kernel)
    beta1, beta2 = hp["betas"]
    maxes = [state["max_exp_avg_sq"]] if hp["amsgrad"] else []
    decoupled = hp.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
    if kernel == "fused" and not isinstance(beta1, torch.Tensor) and not isinstance(beta2, torch.Tensor):
        state["step"].add_(1)
        op = torch._fused_adamw_ if decoupled else torch._fused_adam_
        op([p], [grad], [state["exp_avg"]], [state["exp_avg_sq"]], maxes, [state["step"]], lr=hp["lr"],
           beta1=beta1, beta2=beta2, weight_decay=hp["weight_decay"], eps=hp["eps"], amsgrad=hp["amsgrad"],
           maximize=hp["maximize"])
        return
    fused = kernel == "fused" or hp["fused"]
    _adam([p], [grad], [state["exp_avg"]], [state["exp_avg_sq"]], maxes, [state["step"]],
          foreach=False if fused else hp["foreach"], fused=fused or None, capturable=hp["capturable"],
          differentiable=hp["differentiable"], has_complex=torch.is_complex(p), decoupled_weight_decay=decoupled,
          amsgrad=hp["amsgrad"], beta1=beta1, beta2=beta2, lr=hp["lr"], weight_decay=hp["weight_decay"],
          eps=hp["eps"], maximize=hp["maximize"])


def _sgd_update(optimizer, p, grad, hp, kernel) -> None:
    state = optimizer.state[p]
    momentum = hp["momentum"]
    buf = state.get("momentum_buffer") if momentum != 0 else None
    if kernel == "fused":
        first = momentum != 0 and buf is None
        if first:
            buf = torch.empty_like(grad)
        torch._fused_sgd_([p], [grad], [buf] if momentum != 0 else [], weight_decay=hp["weight_decay"],
                          momentum=momentum, lr=hp["lr"], dampening=hp["dampening"], nesterov=hp["nesterov"],
                          maximize=hp["maximize"], is_first_step=first)
    else:
        bufs = [buf] if momentum != 0 else []
        _sgd([p], [grad], bufs, foreach=hp["foreach"], fused=hp["fused"], weight_decay=hp["weight_decay"],
             momentum=momentum, lr=hp["lr"], dampening=hp["dampening"], nesterov=hp["nesterov"],
             maximize=hp["maximize"], has_sparse_grad=grad.is_sparse)
        buf = bufs[0] if bufs else None
    if momentum != 0:
        state["momentum_buffer"] = buf
