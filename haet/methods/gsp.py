"""Grouped sparse projection (GSP): hold a group of vectors at a target *average* Hoyer sparsity.

Paper: R. Ohib, N. Gillis, S. Shah, V. K. Potluru, S. Plis, "Grouped Sparse Projection for Deep
Learning", HAET workshop at ICLR 2021; extended as "Explicit Group Sparse Projection with
Applications to Deep Learning and NMF" (with N. Dalmasso), TMLR 2022 (code:
riohib/gsp-for-deeplearning).

The Hoyer sparsity of x in R^n is sp(x) = (sqrt(n) - |x|_1 / |x|_2) / (sqrt(n) - 1): 0 for a
vector with equal entries, 1 for a vector with one nonzero. Given vectors c_1..c_r, the projection
finds unit directions z_i maximizing sum_i <|c_i|, z_i> subject to mean_i sp(z_i) >= s; each
z_i = (|c_i| - mu * beta_i)_+ / norm, with beta_i = 1 / (sqrt(n_i) - 1) and ONE dual variable mu
shared by the whole group, found by a safeguarded Newton method on the decreasing function
g(mu) = sum_i beta_i |z_i(mu)|_1. Every evaluation of g is one pass over the entries, and the
iteration count does not grow with the size, so the projection is linear in the total size.
Each output is sign(c_i) * <|c_i|, z_i> * z_i: its least-squares scale along z_i. For a single
vector this is exactly the Euclidean projection onto {x : sp(x) = s}; for a group it is the
paper's problem, in which each vector's sparsity is set automatically (large vectors keep more).
A group that is already at least as sparse as the target is returned unchanged.

During training (`GroupedSparseProjection`, ``mode="train"``) the paper's schedule runs: the
filters of each layer (``group="layer"``) or of all layers together (``group="model"``) are
projected every ``every`` optimizer steps from ``start_epoch`` on; then, for the last
``finetune`` share of the epochs, a final projection fixes the sparsity pattern and the model is
fine-tuned with its zeros frozen (masked gradients and weights). ``mode="oneshot"`` projects once
(at the start of ``start_epoch``) and then fine-tunes with the zeros frozen.

Functional form (no Trainer): ``apply_gsp(model, GSPConfig(target=0.9), filter_fn=None)``
projects in place and returns the solver's info.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from torch import nn

from ..core.config import check_choice, check_range
from ..core.errors import ConfigError
from ..core.method import Method
from ._gsp_ops import project_groups

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class GSPConfig:
    target: float = 0.8       # average Hoyer sparsity of each group, in (0, 1); the paper's main setting
    every: int = 1            # optimizer steps between projections; 1 (a proximal step) beat 5 and 50 on mnist5k-cnn
    group: Literal["layer", "model"] = "layer"  # which vectors share one dual variable (one target)
    mode: Literal["train", "oneshot"] = "train"  # project during training, or once then fine-tune
    start_epoch: int = 1      # first epoch that projects (earlier epochs train dense)
    finetune: float = 0.25    # mode=train: share of the epochs (rounded), at the end, fine-tuned with the zeros fixed

    def __post_init__(self) -> None:
        check_range("target", self.target, 0, 1, lo_open=True, hi_open=True)
        check_range("every", self.every, 1, None, integer=True)
        check_choice("group", self.group, ("layer", "model"))
        check_choice("mode", self.mode, ("train", "oneshot"))
        check_range("start_epoch", self.start_epoch, 1, None, integer=True)
        check_range("finetune", self.finetune, 0, 1, hi_open=True)


def hoyer_sparsity(vectors: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Hoyer sparsity of each row of a 2-D tensor (or of each tensor of a sequence, flattened).

    A zero vector counts as 1 (fully sparse). Vectors need at least 2 entries.
    """
    rows = [vectors] if isinstance(vectors, torch.Tensor) else [v.reshape(1, -1) for v in vectors]
    out = []
    for m in rows:
        if m.dim() != 2 or m.shape[1] < 2:
            raise ConfigError(f"Hoyer sparsity needs vectors of at least 2 entries, got shape {tuple(m.shape)}")
        m = m.detach().double()
        l1, l2, root = m.abs().sum(1), m.norm(dim=1), math.sqrt(m.shape[1])
        ratio = torch.where(l2 > 0, l1 / l2.clamp_min(1e-300), torch.ones_like(l1))
        out.append((root - ratio) / (root - 1))
    return torch.cat(out)


def grouped_sparse_projection(vectors: torch.Tensor | Sequence[torch.Tensor], target: float, *,
                              tol: float = 1e-6, max_iter: int = 100, return_info: bool = False):
    """Project a group of vectors so that their average Hoyer sparsity is `target`.

    `vectors`: a 2-D tensor (each row a vector) or a sequence of tensors (each one vector, any
    lengths >= 2). Returns the same structure (and, with ``return_info``, a dict with the shared
    dual variable ``mu``, ``iterations``, ``evaluations`` of g and ``converged``). `tol` bounds
    the error of the average sparsity.
    """
    check_range("target", target, 0, 1)
    if isinstance(vectors, torch.Tensor):
        if vectors.dim() != 2:
            raise ConfigError(f"vectors must be a 2-D tensor (one vector per row), got shape {tuple(vectors.shape)}")
        (out,), info = project_groups([[vectors]], target, tol, max_iter)
        result = out[0]
    else:
        vectors = list(vectors)
        (out,), info = project_groups([[v.reshape(1, -1) for v in vectors]], target, tol, max_iter)
        result = [o.reshape(v.shape) for o, v in zip(out, vectors)]
    info = {"mu": float(info["mu"][0]), "iterations": info["iterations"], "evaluations": info["evaluations"],
            "converged": info["converged"]}
    return (result, info) if return_info else result


def sparse_layers(model: nn.Module, filter_fn: Callable[[str, nn.Module], bool] | None = None
                  ) -> list[tuple[str, nn.Module]]:
    """The layers GSP projects: Linear and Conv layers whose filters have at least 2 weights (and
    that `filter_fn(name, module)` accepts)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, LAYER_TYPES) and m.weight.dim() >= 2 and m.weight[0].numel() >= 2
            and (filter_fn is None or filter_fn(n, m))]


def project_model_(model: nn.Module, target: float, group: str = "layer", *, tol: float = 1e-6,
                   mu0: list[float] | None = None) -> dict:
    """Project the filters (weight rows) of `model`'s layers in place; returns the solver's info
    (``mu``: the dual variable of each group, a good `mu0` for the next projection). Warns and
    changes nothing when no layer is eligible (`apply_gsp` refuses instead)."""
    check_choice("group", group, ("layer", "model"))
    layers = sparse_layers(model)
    if not layers:
        warnings.warn("gsp: the model has no Linear or Conv layer to project; nothing was changed", stacklevel=2)
        return {"mu": [], "iterations": 0, "evaluations": 0, "converged": True}
    return _project(layers, target, group, tol=tol, mu0=mu0)


def apply_gsp(model: nn.Module, config: GSPConfig | None = None, *, optimizer: torch.optim.Optimizer | None = None,
              filter_fn: Callable[[str, nn.Module], bool] | None = None, mu0: list[float] | None = None) -> dict:
    """Project `model`'s eligible layers in place to ``config.target`` (grouped by ``config.group``).

    `filter_fn(name, module)` may exclude layers. The projection edits weight values only (the
    parameters keep their identity), so `optimizer` needs no change; it is accepted so that every
    functional form has the same signature. `mu0`: the previous solution's ``mu``, a warm start.
    Raises ConfigError when no layer is eligible. Returns the solver's info (``mu``, ``iterations``,
    ``evaluations``, ``converged``) and ``weights``, the number of weights projected.
    """
    config = config or GSPConfig()
    layers = sparse_layers(model, filter_fn)
    if not layers:
        raise ConfigError(f"gsp: {type(model).__name__} has no layer to project (Linear or Conv1d/2d/3d with filters "
                          "of at least 2 weights" + (", accepted by filter_fn)" if filter_fn else ")"))
    info = _project(layers, config.target, config.group, mu0=mu0)
    return {**info, "weights": sum(m.weight.numel() for _, m in layers)}


def layer_report(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per projected layer: mean Hoyer sparsity of its filters and the fraction of exact zeros."""
    return {name: {"hoyer": float(hoyer_sparsity(m.weight.reshape(m.weight.shape[0], -1)).mean()),
                   "zero_fraction": float((m.weight == 0).float().mean())} for name, m in sparse_layers(model)}


class GroupedSparseProjection(Method):
    name = "gsp"
    summary = "project filters to a target average Hoyer sparsity every k steps, then fine-tune with the zeros fixed"
    paper = ("Ohib, Gillis, Shah, Potluru, Plis: Grouped Sparse Projection for Deep Learning (HAET @ ICLR 2021; "
             "extended in TMLR 2022)")
    config_class = GSPConfig
    owns = frozenset({"weight_sparsity"})

    def __init__(self, config: GSPConfig | None = None, /, **params) -> None:
        super().__init__(config, **params)
        self.projections = 0
        self.mu: list[float] = []           # last dual variable of each group
        self.masks: list[torch.Tensor] = []   # once fine-tuning: the frozen nonzero pattern of each layer
        self.freeze_epoch: int | None = None  # first epoch of the fine-tuning phase (None: none)
        self._report: dict[str, dict[str, float]] = {}
        self._overall: dict[str, float | None] = {}

    def fit_start(self, state) -> None:
        c, model = self.config, state.unwrapped_model
        if not sparse_layers(model):
            raise ConfigError(f"gsp: {type(model).__name__} has no layer to project (Linear or Conv1d/2d/3d with "
                              "filters of at least 2 weights); gsp would change nothing")
        if c.start_epoch > state.epochs:
            raise ConfigError(f"gsp: start_epoch={c.start_epoch} is after the last epoch ({state.epochs}); gsp would "
                              f"change nothing. Allowed: 1..{state.epochs}")
        if c.mode == "oneshot":
            self.freeze_epoch = c.start_epoch
        else:
            tune = round(c.finetune * state.epochs)
            self.freeze_epoch = max(c.start_epoch, state.epochs - tune + 1) if tune else None

    def epoch_start(self, state) -> None:
        if state.epoch == self.freeze_epoch and not self.masks:
            self._project(state)           # the final projection: its zeros are the pattern kept from now on
            self.masks = [m.weight != 0 for _, m in sparse_layers(state.unwrapped_model)]

    def after_backward(self, state) -> None:
        for (_, m), mask in zip(sparse_layers(state.unwrapped_model), self.masks):
            if m.weight.grad is not None:
                m.weight.grad.mul_(mask)   # frozen zeros get no gradient, so no new optimizer state either

    def after_step(self, state) -> None:
        c = self.config
        if self.masks:
            with torch.no_grad():
                for (_, m), mask in zip(sparse_layers(state.unwrapped_model), self.masks):
                    m.weight.mul_(mask)    # weight decay or momentum must not revive a pruned weight
        elif c.mode == "train" and state.epoch >= c.start_epoch and state.step % c.every == 0:
            self._project(state)

    def before_eval(self, state) -> None:
        if self.config.mode == "train" and state.epoch >= self.config.start_epoch and not self.masks:
            self._project(state)           # evaluate (and checkpoint) the projected model
        layers = sparse_layers(state.unwrapped_model)
        self._report = layer_report(state.unwrapped_model)
        hoyer = torch.cat([hoyer_sparsity(m.weight.reshape(m.weight.shape[0], -1)) for _, m in layers])
        zeros = sum(int((m.weight == 0).sum()) for _, m in layers) / sum(m.weight.numel() for _, m in layers)
        self._overall = {"gsp/hoyer": float(hoyer.mean()), "gsp/zero_fraction": zeros}

    def epoch_metrics(self) -> dict:
        return dict(self._overall)

    def metrics(self) -> dict:
        out = {"gsp/projections": self.projections, **self._overall}
        for layer, values in self._report.items():
            out.update({f"gsp/{layer}/{k}": v for k, v in values.items()})
        return out

    def state_dict(self) -> dict:
        return {"projections": self.projections, "mu": list(self.mu), "masks": list(self.masks)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.projections = state_dict["projections"]
        self.mu = list(state_dict["mu"])
        self.masks = list(state_dict["masks"])

    def _project(self, state) -> None:
        info = apply_gsp(state.unwrapped_model, self.config, mu0=self.mu or None)
        self.mu = info["mu"]      # the weights move little between steps: warm-start the next solve
        self.projections += 1
        # The solve runs in the weights' dtype (at least float32).
        dtype = torch.promote_types(sparse_layers(state.unwrapped_model)[0][1].weight.dtype, torch.float32)
        flops = (_FLOPS_PER_EVALUATION * info["evaluations"] + _FLOPS_TO_APPLY) * info["weights"]
        state.charge(flops=flops, dtype=str(dtype).removeprefix("torch."), what="gsp/projection")


# -- private helpers -------------------------------------------------------------------------
_FLOPS_PER_EVALUATION = 8   # per weight and evaluation of g: subtract, clamp, square, compare, 3 sums
_FLOPS_TO_APPLY = 10        # per weight: threshold, square, sum, normalize, inner product, scale, sign


@torch.no_grad()
def _project(layers: list[tuple[str, nn.Module]], target: float, group: str, *, tol: float = 1e-6,
             mu0: list[float] | None = None) -> dict:
    """Project the filters (weight rows) of `layers` in place; returns the solver's info."""
    mats = [m.weight.reshape(m.weight.shape[0], -1) for _, m in layers]
    groups = [[w] for w in mats] if group == "layer" else [mats]
    start = mu0 if mu0 is not None and len(mu0) == len(groups) else None
    out, info = project_groups(groups, target, tol, 100, start)
    for (_, m), p in zip(layers, (p for g in out for p in g)):
        m.weight.copy_(p.reshape(m.weight.shape))   # also right for a non-contiguous weight
    return info
