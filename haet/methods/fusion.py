"""Optimizer fusion: apply each parameter's update inside backward or just before its next forward.

Paper: Zixuan Jiang, Jiaqi Gu, Mingjie Liu, Keren Zhu, David Z. Pan, "Optimizer Fusion: Efficient
Training with Better Locality and Parallelism", HAET workshop at ICLR 2021 (up to 20% less
training time; the optimizer maths is unchanged).

A training step normally runs forward, backward, then the optimizer over every parameter, so
each gradient is written in backward and read back much later. Fusion moves the update:

- ``mode="backward"``: a parameter is updated as soon as its gradient is accumulated
  (``register_post_accumulate_grad_hook``) and the gradient is freed at once, so at most a few
  gradients are alive at any time instead of all of them;
- ``mode="forward"``: the update is deferred to just before the parameter's module runs its next
  forward (forward pre-hooks), where the parameter is read anyway; pending updates are applied
  before evaluation and checkpoints (`FusedOptimizer.flush`).

The update itself is torch.optim's (SGD with momentum/Nesterov/weight decay, Adam, AdamW), with
the optimizer's own state and parameter groups, so learning-rate schedulers, checkpoints, frozen
and shared parameters behave as without fusion. What fusion cannot do exactly is refused up
front: global-norm clipping and gradient accumulation in backward mode, closures, other
optimizers, data parallel in backward mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..core.config import check_choice, check_range
from ..core.errors import ConfigError
from ..core.method import Method
from ._fusion_ops import check_optimizer, ensure_state, hyperparams, update_param


@dataclass(frozen=True)
class FusionConfig:
    mode: Literal["backward", "forward"] = "backward"  # where updates run; backward also frees gradients early
    kernel: Literal["fused", "optimizer"] = "fused"    # fused: torch's fused kernels (fastest, within float32
    #                                                    ulps); optimizer: bit for bit the optimizer's own step
    max_grad_norm: float = 0.0  # global-norm gradient clipping before the update (0 = off); forward mode only

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, ("backward", "forward"))
        check_choice("kernel", self.kernel, ("fused", "optimizer"))
        check_range("max_grad_norm", self.max_grad_norm, 0, None)
        if self.mode == "backward" and self.max_grad_norm > 0:
            raise ConfigError("max_grad_norm needs every gradient before any update, which backward mode cannot "
                              "give: use mode=forward with max_grad_norm, or max_grad_norm=0")


def fuse_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, mode: str = "backward", *,
                   kernel: str = "fused", max_grad_norm: float = 0.0,
                   accumulate_grad_batches: int = 1) -> "FusedOptimizer":
    """Fuse `optimizer`'s updates of `model`'s parameters into backward or forward.

    Use the returned handle in place of the optimizer::

        fused = fuse_optimizer(model, torch.optim.Adam(model.parameters()), "backward")
        for x, y in batches:
            loss_fn(model(x), y).backward()   # backward mode: the parameters are updated here
            fused.step()                      # forward mode: commits the updates (applied at next forward)
        fused.flush()                         # forward mode: apply what is pending before reading weights
        fused.remove()                        # back to a plain model and optimizer

    `accumulate_grad_batches` > 1 (several backwards per step) works only in forward mode.
    """
    config = FusionConfig(mode=mode, kernel=kernel, max_grad_norm=max_grad_norm)
    check_range("accumulate_grad_batches", accumulate_grad_batches, 1, None, integer=True)
    if mode == "backward" and accumulate_grad_batches > 1:
        raise ConfigError("gradient accumulation cannot be fused into backward (each backward would apply its own "
                          "update): use mode='forward'")
    check_optimizer(optimizer)
    return FusedOptimizer(model, optimizer, config)


class FusedOptimizer:
    """The handle `fuse_optimizer` returns: hooks on the model, updates through the optimizer's state."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: FusionConfig) -> None:
        self.model, self.optimizer, self.config = model, optimizer, config
        self._hooks: list = []
        self._group_of: dict = {}     # parameter -> its optimizer group (a live dict: schedulers write into it)
        self._owners: dict = {}       # parameter -> ids of the modules that hold it
        self._params_of: dict = {}    # module id -> fused parameters it holds
        self._pending: dict = {}      # forward mode: parameter -> (gradient, hyperparameters at step())
        self._orphans: list = []      # pending parameters whose modules did not run: applied at the next forward
        self._ran: set = set()        # ids of modules that ran forward since the last step()
        self._updated: set = set()    # backward mode: parameters updated since the last step()
        self.refresh()

    @property
    def fused_params(self) -> list[torch.Tensor]:
        """The parameters whose updates are fused (the others are left to ``optimizer.step()``)."""
        return list(self._group_of)

    def refresh(self) -> None:
        """Re-attach the hooks after the model or the optimizer's groups changed (model surgery)."""
        self.flush()
        for h in self._hooks:
            h.remove()
        self._hooks, self._owners, self._params_of = [], {}, {}
        in_model = {p for p in self.model.parameters() if p.requires_grad}
        self._group_of = {p: g for g in self.optimizer.param_groups for p in g["params"] if p in in_model}
        for module in self.model.modules():
            own = [p for p in module.parameters(recurse=False) if p in self._group_of]
            for p in own:
                self._owners.setdefault(p, []).append(id(module))
            if self.config.mode == "forward" and (own or module is self.model):
                self._params_of[id(module)] = own
                self._hooks.append(module.register_forward_pre_hook(self._before_forward))
        if self.config.mode == "backward":
            self._hooks += [p.register_post_accumulate_grad_hook(self._after_accumulate) for p in self._group_of]

    def step(self, closure=None) -> None:
        """Where ``optimizer.step()`` would be called: backward mode checks and closes the step; forward mode
        clips (``max_grad_norm``) and takes the gradients, to be applied just before the next forward."""
        if closure is not None:
            raise ConfigError("fusion cannot run a closure: the loss it re-evaluates would need the updates "
                              "applied all at once")
        if self.config.mode == "backward":
            self._updated.clear()
        else:
            self._commit()
        self.optimizer.step()  # updates only parameters the hooks do not cover; keeps schedulers' bookkeeping

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The optimizer's ``zero_grad``: pending gradients are held outside ``.grad``, so nothing is lost."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def flush(self) -> None:
        """Apply every pending update now (forward mode); before evaluation, checkpoints, weight reads."""
        for p in list(self._pending):
            self._apply(p)
        self._orphans = []

    def remove(self) -> None:
        """Apply what is pending and detach all hooks: the model and optimizer are plain again."""
        self.flush()
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- hooks -------------------------------------------------------------------------------
    def _after_accumulate(self, p: torch.Tensor) -> None:
        if p in self._updated:
            raise RuntimeError("fusion (mode=backward): a second backward before step() would apply a second "
                               "update; gradient accumulation needs mode='forward'")
        update_param(self.optimizer, p, p.grad, self._group_of[p], self.config.kernel)
        p.grad = None
        self._updated.add(p)

    def _before_forward(self, module: nn.Module, args) -> None:
        self._ran.add(id(module))
        if self._orphans:
            for p in self._orphans:
                if p in self._pending:
                    self._apply(p)
            self._orphans = []
        for p in self._params_of[id(module)]:
            if p in self._pending:
                self._apply(p)

    # -- forward mode ------------------------------------------------------------------------
    def _commit(self) -> None:
        grads = [p for p in self._group_of if p.grad is not None]
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(grads, self.config.max_grad_norm)
        snapshots: dict = {}
        for p in grads:
            if p in self._pending:  # its module never ran since the last step: apply the old update first
                self._apply(p)
            group = self._group_of[p]
            hp = snapshots.get(id(group))
            if hp is None:
                hp = snapshots[id(group)] = hyperparams(group)  # the learning rate of *this* step
            ensure_state(self.optimizer, p, hp, self.config.kernel)
            self._pending[p] = (p.grad, hp)
            p.grad = None
        self._orphans = [p for p in grads if not any(m in self._ran for m in self._owners[p])]
        self._ran.clear()

    def _apply(self, p: torch.Tensor) -> None:
        grad, hp = self._pending.pop(p)
        update_param(self.optimizer, p, grad, hp, self.config.kernel)


class OptimizerFusion(Method):
    name = "fusion"
    summary = "optimizer fusion: each parameter's update inside backward (or just before its next forward)"
    paper = ("Jiang, Gu, Liu, Zhu, Pan: Optimizer Fusion: Efficient Training with Better Locality and "
             "Parallelism (HAET workshop, ICLR 2021)")
    config_class = FusionConfig
    owns = frozenset({"optimizer_step"})

    def __init__(self, config: FusionConfig | None = None, /, **params) -> None:
        super().__init__(config, **params)
        self.fused: FusedOptimizer | None = None
        self._version = 0
        self._fused_count, self._fused_bytes = 0, 0

    def check_compatible(self, others: list[Method]) -> None:
        mode = self.config.mode
        for other in others:
            if "backward" in other.owns:
                raise ConfigError(f"fusion applies the updates from autograd's backward, which {other.name} "
                                  "replaces; use one of them")
            if mode == "backward" and _handles(other, "after_backward"):
                raise ConfigError(f"fusion:mode=backward updates each parameter inside backward, so gradients are "
                                  f"gone when {other.name} works on them at after_backward; use fusion:mode=forward")
            if mode == "forward" and any(_handles(other, e) for e in ("after_step", "batch_end", "epoch_end")):
                raise ConfigError(f"fusion:mode=forward defers updates to the next forward, but {other.name} reads "
                                  f"or changes the model between steps; use fusion:mode=backward")

    def fit_start(self, state) -> None:
        if state.step_fn is not None:
            raise ConfigError("fusion: another method already replaced the optimizer step")
        if self.config.mode == "backward" and state.world_size > 1:
            raise ConfigError("fusion:mode=backward would update before data parallel averages the gradients; "
                              "use fusion:mode=forward with torchrun")
        check_optimizer(state.optimizer)
        self.fused = FusedOptimizer(state.unwrapped_model, state.optimizer, self.config)
        self._version = state.model_version
        self._count()
        state.step_fn = self.fused.step

    def batch_start(self, state) -> None:
        if state.model_version != self._version or state.optimizer is not self.fused.optimizer:
            if state.optimizer is not self.fused.optimizer:
                check_optimizer(state.optimizer)
                self.fused.flush()
                self.fused.optimizer = state.optimizer
            self.fused.refresh()
            self._version = state.model_version
            self._count()

    def before_eval(self, state) -> None:
        self.fused.flush()

    def fit_end(self, state) -> None:
        self.fused.remove()
        if state.step_fn == self.fused.step:
            state.step_fn = None

    def metrics(self) -> dict:
        return {"fusion/fused_params": self._fused_count, "fusion/fused_param_bytes": self._fused_bytes}

    def _count(self) -> None:
        params = self.fused.fused_params
        self._fused_count = len(params)
        self._fused_bytes = sum(p.numel() * p.element_size() for p in params)


def _handles(method: Method, event: str) -> bool:
    """Whether `method` defines its own handler for `event`."""
    return getattr(type(method), event, None) is not getattr(Method, event, None)
