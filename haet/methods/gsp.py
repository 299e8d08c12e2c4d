"""Grouped sparse projection (GSP): hold a group of vectors at a target *average* Hoyer sparsity.

Paper: R. Ohib, N. Gillis, N. Dalmasso, S. Shah, V. K. Potluru, S. Plis, "Explicit Group Sparse
Projection with Applications to Deep Learning and NMF", HAET workshop at ICLR 2021; TMLR 2022
(code: riohib/gsp-for-deeplearning).

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

During training (`GroupedSparseProjection`) the filters of each layer (``group="layer"``) or of
all layers together (``group="model"``) are projected every ``every`` steps and before each
evaluation; ``mode="oneshot"`` projects once (at the start of ``start_epoch``) and then
fine-tunes with the zeros frozen.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import nn

from ..core.config import check_choice, check_range
from ..core.errors import ConfigError
from ..core.method import Method

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class GSPConfig:
    target: float = 0.8       # average Hoyer sparsity of each group, in (0, 1); 0.8 keeps ~10% of a 1568-wide row
    every: int = 1            # optimizer steps between projections; 1 = a proximal step after every update
    group: Literal["layer", "model"] = "layer"  # which vectors share one dual variable (one target)
    mode: Literal["train", "oneshot"] = "train"  # project during training, or once then fine-tune
    start_epoch: int = 1      # first epoch that projects (earlier epochs train dense)

    def __post_init__(self) -> None:
        check_range("target", self.target, 0, 1, lo_open=True, hi_open=True)
        check_range("every", self.every, 1, None, integer=True)
        check_choice("group", self.group, ("layer", "model"))
        check_choice("mode", self.mode, ("train", "oneshot"))
        check_range("start_epoch", self.start_epoch, 1, None, integer=True)


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
        (out,), info = _project_groups([[vectors]], target, tol, max_iter)
        result = out[0]
    else:
        vectors = list(vectors)
        (out,), info = _project_groups([[v.reshape(1, -1) for v in vectors]], target, tol, max_iter)
        result = [o.reshape(v.shape) for o, v in zip(out, vectors)]
    info = {"mu": float(info["mu"][0]), "iterations": info["iterations"], "evaluations": info["evaluations"],
            "converged": info["converged"]}
    return (result, info) if return_info else result


def sparse_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers GSP projects: Linear and Conv layers whose filters have at least 2 weights."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, LAYER_TYPES) and m.weight.dim() >= 2 and m.weight[0].numel() >= 2]


@torch.no_grad()
def project_model_(model: nn.Module, target: float, group: str = "layer", *, tol: float = 1e-6) -> dict:
    """Project the filters (weight rows) of `model`'s layers in place; returns the solver's info."""
    check_choice("group", group, ("layer", "model"))
    layers = sparse_layers(model)
    if not layers:
        warnings.warn("gsp: the model has no Linear or Conv layer to project; nothing was changed", stacklevel=2)
        return {"iterations": 0, "evaluations": 0, "converged": True}
    mats = [m.weight.reshape(m.weight.shape[0], -1) for _, m in layers]
    groups = [[w] for w in mats] if group == "layer" else [mats]
    out, info = _project_groups(groups, target, tol, 100)
    for w, p in zip(mats, (p for g in out for p in g)):
        w.copy_(p)
    return info


def layer_report(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per projected layer: mean Hoyer sparsity of its filters and the fraction of exact zeros."""
    return {name: {"hoyer": float(hoyer_sparsity(m.weight.reshape(m.weight.shape[0], -1)).mean()),
                   "zero_fraction": float((m.weight == 0).float().mean())} for name, m in sparse_layers(model)}


class GroupedSparseProjection(Method):
    name = "gsp"
    summary = "project filters to a target average Hoyer sparsity (one shared dual variable, linear time)"
    paper = ("Ohib, Gillis, Dalmasso, Shah, Potluru, Plis: Explicit Group Sparse Projection with "
             "Applications to Deep Learning and NMF (HAET @ ICLR 2021; TMLR 2022)")
    config_class = GSPConfig

    def __init__(self, config: GSPConfig | None = None, /, **params) -> None:
        super().__init__(config, **params)
        self.projections = 0
        self.masks: list[torch.Tensor] = []   # oneshot: the frozen nonzero pattern of each layer
        self._report: dict[str, dict[str, float]] = {}
        self._overall: dict[str, float | None] = {}

    def check_compatible(self, others: list[Method]) -> None:
        if any(o.name == "mbst" for o in others):
            raise ConfigError("gsp cannot run with mbst: both decide which weights are zero")

    def fit_start(self, state) -> None:
        if not sparse_layers(state.unwrapped_model):
            warnings.warn("gsp: the model has no Linear or Conv layer to project", stacklevel=2)

    def epoch_start(self, state) -> None:
        c = self.config
        if c.mode == "oneshot" and state.epoch == c.start_epoch and not self.masks:
            self._project(state)
            self.masks = [m.weight != 0 for _, m in sparse_layers(state.unwrapped_model)]

    def after_backward(self, state) -> None:
        for (_, m), mask in zip(sparse_layers(state.unwrapped_model), self.masks):
            if m.weight.grad is not None:
                m.weight.grad.mul_(mask)   # frozen zeros get no gradient, so no optimizer state either

    def after_step(self, state) -> None:
        c = self.config
        if self.masks:
            with torch.no_grad():
                for (_, m), mask in zip(sparse_layers(state.unwrapped_model), self.masks):
                    m.weight.mul_(mask)    # weight decay or momentum must not revive a pruned weight
        elif c.mode == "train" and state.epoch >= c.start_epoch and state.step % c.every == 0:
            self._project(state)

    def before_eval(self, state) -> None:
        if self.config.mode == "train" and state.epoch >= self.config.start_epoch:
            self._project(state)           # evaluate (and checkpoint) the projected model
        model = state.unwrapped_model
        self._report = layer_report(model)
        weights = torch.cat([m.weight.detach().reshape(-1) for _, m in sparse_layers(model)])
        filters = [m.weight.reshape(m.weight.shape[0], -1) for _, m in sparse_layers(model)]
        self._overall = {"gsp/hoyer": float(torch.cat([hoyer_sparsity(f) for f in filters]).mean()) if filters else None,
                         "gsp/zero_fraction": float((weights == 0).double().mean()) if len(weights) else None}

    def epoch_metrics(self) -> dict:
        return dict(self._overall)

    def metrics(self) -> dict:
        out = {"gsp/projections": self.projections, **self._overall}
        for layer, values in self._report.items():
            out.update({f"gsp/{layer}/{k}": v for k, v in values.items()})
        return out

    def state_dict(self) -> dict:
        return {"projections": self.projections, "masks": list(self.masks)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.projections = state_dict["projections"]
        self.masks = list(state_dict["masks"])

    def _project(self, state) -> None:
        c = self.config
        info = project_model_(state.unwrapped_model, c.target, c.group)
        self.projections += 1
        layers = sparse_layers(state.unwrapped_model)
        if "flops" in state.meters and layers:   # the solve runs in the weights' dtype (at least float32)
            n = sum(m.weight.numel() for _, m in layers)
            dtype = torch.promote_types(layers[0][1].weight.dtype, torch.float32)
            flops = (_FLOPS_PER_EVALUATION * info["evaluations"] + _FLOPS_TO_APPLY) * n
            state.meters["flops"].add(flops, str(dtype).removeprefix("torch."))


_FLOPS_PER_EVALUATION = 8   # per weight and evaluation of g: subtract, clamp, square, compare, 3 sums
_FLOPS_TO_APPLY = 10        # per weight: threshold, square, sum, normalize, inner product, scale, sign


def _segment_sum(values: torch.Tensor, segments: torch.Tensor, size: int) -> torch.Tensor:
    return values.new_zeros(size).index_add_(0, segments, values)


def _project_groups(groups: list[list[torch.Tensor]], target: float, tol: float, max_iter: int):
    """Project each group (a list of 2-D tensors whose rows are vectors) to average sparsity `target`.

    All groups are solved together: one vectorized safeguarded Newton iteration updates every
    group's dual variable, so the cost is a few passes over all entries whatever the group count.
    """
    mats = [m for g in groups for m in g]
    for m in mats:
        if m.shape[1] < 2:
            raise ConfigError(f"GSP needs vectors of at least 2 entries, got shape {tuple(m.shape)}")
    device = mats[0].device
    dtype = torch.promote_types(mats[0].dtype, torch.float32)   # float32 weights solve in float32
    c = torch.cat([m.detach().reshape(-1) for m in mats]).to(dtype)
    a = c.abs()
    rows = torch.tensor([m.shape[0] for m in mats], device=device)
    lengths = torch.tensor([m.shape[1] for m in mats], device=device)
    n = torch.repeat_interleave(lengths, rows).to(dtype)                          # length of each vector
    n_vec, n_groups = len(n), len(groups)
    elem_vec = torch.repeat_interleave(torch.arange(n_vec, device=device), n.long())
    vec_group = torch.repeat_interleave(torch.arange(n_groups, device=device),
                                        torch.tensor([sum(m.shape[0] for m in g) for g in groups], device=device))
    tiny = torch.finfo(dtype).tiny
    beta = 1.0 / (n.sqrt() - 1.0)
    r = _segment_sum(torch.ones_like(n), vec_group, n_groups)
    k = _segment_sum(beta * n.sqrt(), vec_group, n_groups) - r * target          # g(mu*) = k <=> mean sp = target
    vec_max = torch.zeros(n_vec, dtype=a.dtype, device=device).scatter_reduce(0, elem_vec, a, "amax")
    up = torch.zeros(n_groups, dtype=a.dtype, device=device).scatter_reduce(0, vec_group, vec_max / beta, "amax")

    def g_and_slope(mu: torch.Tensor):
        xp = (a - (mu[vec_group] * beta)[elem_vec]).clamp_min(0)
        s1, s2 = _segment_sum(xp, elem_vec, n_vec), _segment_sum(xp * xp, elem_vec, n_vec)
        m = _segment_sum((xp > 0).to(xp.dtype), elem_vec, n_vec)
        pos, root = s2 > 0, s2.sqrt().clamp_min(tiny)
        l1 = torch.where(pos, s1 / root, torch.ones_like(s1))                      # |z_i|_1 (1 when 1-sparse)
        dl1 = torch.where(pos, beta * (s1 * s1 / (root * root * root) - m / root), torch.zeros_like(s1))
        return _segment_sum(beta * l1, vec_group, n_groups), _segment_sum(beta * dl1, vec_group, n_groups)

    mu = torch.zeros(n_groups, dtype=a.dtype, device=device)
    lo = torch.zeros_like(mu)
    g, slope = g_and_slope(mu)
    evaluations, iterations = 1, 0
    unchanged = g <= k                                       # already at least as sparse as the target
    width_before = (up - lo).clone()
    while iterations < max_iter:
        todo = ~unchanged & ((g - k).abs() > tol * r)
        if not bool(todo.any()):
            break
        iterations += 1
        newton = mu + (k - g) / torch.where(slope < 0, slope, torch.full_like(slope, -tiny))
        bisect = (lo + up) / 2
        # Newton from the left of a decreasing function; bisect when it leaves the bracket, and every
        # other step when the bracket has not halved in two steps (linear convergence at worst).
        use_bisect = ~torch.isfinite(newton) | (newton <= lo) | (newton >= up)
        if iterations % 2 == 0:
            use_bisect |= (up - lo) > width_before / 2
            width_before = (up - lo).clone()
        mu = torch.where(todo, torch.where(use_bisect, bisect, newton), mu)
        g, slope = g_and_slope(mu)
        evaluations += 1
        too_dense = g > k
        lo = torch.where(todo & too_dense, mu, lo)
        up = torch.where(todo & ~too_dense, mu, up)
    converged = not bool((~unchanged & ((g - k).abs() > tol * r)).any())
    if not converged:       # keep the side whose average sparsity is at least the target
        mu = torch.where(unchanged | ((g - k).abs() <= tol * r), mu, up)
        warnings.warn("gsp: the projection did not reach the tolerance (g is discontinuous at ties); "
                      "returning the nearest sparser point", stacklevel=3)
    mu = torch.where(unchanged, torch.zeros_like(mu), mu)
    projected = _apply(c, a, mu[vec_group] * beta, elem_vec, n_vec)
    projected = torch.where(unchanged[vec_group][elem_vec], c, projected)
    out, start = [], 0
    for grp in groups:
        out.append([])
        for m in grp:
            out[-1].append(projected[start:start + m.numel()].reshape(m.shape).to(m.dtype))
            start += m.numel()
    return out, {"mu": mu.tolist(), "iterations": iterations, "evaluations": evaluations, "converged": converged}


def _apply(c, a, threshold, elem_vec, n_vec):
    """sign(c) * <a, z> * z with z = (a - threshold)_+ normalized (the largest entry when empty)."""
    xp = (a - threshold[elem_vec]).clamp_min(0)
    s2 = _segment_sum(xp * xp, elem_vec, n_vec)
    empty = s2 <= 0
    if bool(empty.any()):   # keep the first largest entry of each vector thresholded to nothing
        vec_max = torch.zeros(n_vec, dtype=a.dtype, device=a.device).scatter_reduce(0, elem_vec, a, "amax")
        idx = torch.arange(len(a), device=a.device)
        first = torch.full((n_vec,), len(a), device=a.device).scatter_reduce(
            0, elem_vec, torch.where(a == vec_max[elem_vec], idx, len(a)), "amin")
        onehot = (idx == first[elem_vec]).to(a.dtype)
        xp = torch.where(empty[elem_vec], onehot, xp)
        s2 = torch.where(empty, torch.ones_like(s2), s2)
    z = xp / s2.sqrt()[elem_vec]
    alpha = _segment_sum(a * z, elem_vec, n_vec)
    return torch.sign(c) * alpha[elem_vec] * z
