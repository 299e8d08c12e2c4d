"""Sparse layers, sparse-storage accounting and prune-and-regrow kernels for `haet.methods.mbst`.

Storage. A sparse layer keeps *units* of its weight, the same number in each *row group*:
- unstructured: a unit is one weight; one row group (the whole layer). Stored as the kept values
  plus their flat positions (int32). Computed by `_UnstructuredFn`: the dense kernel is rebuilt
  inside the forward and again inside the backward, and only the input, the values and the index
  are saved for backward, so no dense copy of the weight lives between the two (it is workspace
  of one layer's call). No work is skipped on a CPU; the FLOPs a zero-skipping accelerator would
  save are reported separately.
- block: a unit is a block of ``bo`` output rows/channels x ``bi`` input features/channels (with
  the whole kernel); the ``bo`` rows form a row group and every group keeps the same count K.
  Stored as the kept blocks, shaped as a grouped convolution's weight, plus their block columns.
  Computed by gathering each group's input channels and one grouped convolution (a batched
  matmul for Linear): the work is density x the dense work.
- channel: a unit is one input channel (Conv) or input feature (Linear) across all outputs; one
  row group. Computed as a smaller dense convolution/matmul on the kept input channels.

Every unit kept has the same storage for its value, its gradient and its optimizer state; the
index (int32) is shared by the three. Biases stay dense.

Regrowth scores. On a step with ``changes > 0`` the layer plans its prune-and-regrow from the
dense weight gradient, computed in the backward from the saved input and the output gradient
(`dense_weight_grad`) and dropped once the plan (two int32 per change) is made. When the step
runs in micro-batches, the first micro-batch's gradient scores the regrowth.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError

SCHEMES = ("unstructured", "block", "channel")
INDEX_DTYPE = torch.int32
INDEX_BYTES = 4
PLAN_BYTES_PER_CHANGE = 2 * INDEX_BYTES   # a pending change: the slot and the unit that will fill it


@dataclass(frozen=True)
class LayerShape:
    """How a layer splits into units for a scheme."""
    name: str
    out_features: int
    in_features: int            # input channels (Conv) or features (Linear)
    kernel: tuple[int, ...]     # () for Linear
    bo: int                     # rows per group (1 for unstructured)
    bi: int                     # input features per unit (1 for unstructured and channel)
    rows: int                   # R: row groups
    units: int                  # U: units per row group
    unit_numel: int             # weights per unit
    min_kept: int               # the fewest units per group the layer may keep
    has_bias: bool

    @property
    def numel(self) -> int:
        return self.rows * self.units * self.unit_numel

    def erk(self, with_kernel: bool) -> float:
        """Erdos-Renyi(-Kernel) relative density: (fan_in + fan_out [+ kernel]) / weights."""
        k = math.prod(self.kernel) if with_kernel else 1
        extra = sum(self.kernel) if with_kernel else 0
        return (self.in_features + self.out_features + extra) / (self.in_features * self.out_features * k)


def eligible(module: nn.Module) -> bool:
    """Layers MBST can sparsify: Linear and ungrouped, zero-padded Conv1d/2d/3d."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups == 1 \
        and module.padding_mode == "zeros" and not isinstance(module.padding, str)


def layer_shape(name: str, module: nn.Module, scheme: str, block: tuple[int, int]) -> LayerShape:
    w = module.weight
    out_f, in_f, kernel = w.shape[0], w.shape[1], tuple(w.shape[2:])
    k = math.prod(kernel)
    if scheme == "unstructured":
        bo, bi, rows, units, unit_numel = 1, 1, 1, w.numel(), 1
        min_kept = min(units, out_f)          # about one weight per output
    elif scheme == "block":
        bo, bi = _largest_divisor(out_f, block[0]), _largest_divisor(in_f, block[1])
        rows, units, unit_numel, min_kept = out_f // bo, in_f // bi, bo * bi * k, 1
    else:
        bo, bi, rows, units, unit_numel, min_kept = out_f, 1, 1, in_f, out_f * k, 1
    if w.numel() >= 2**31:
        raise ConfigError(f"layer {name} has {w.numel()} weights; int32 indices address fewer than 2**31")
    return LayerShape(name, out_f, in_f, kernel, bo, bi, rows, units, unit_numel, min_kept, module.bias is not None)


def layer_bytes(s: LayerShape, kept: int, value_bytes: int, state_per_elem: int, state_per_tensor: int,
                changes: int) -> int:
    """Training-state bytes of one layer keeping `kept` units per group (dense when kept == units):
    values + gradients + optimizer state, the int32 index, the dense bias with its gradient and
    state, and the pending prune-and-regrow plan (`changes` entries)."""
    dense = kept >= s.units
    n = s.numel if dense else s.rows * kept * s.unit_numel
    total = n * (2 * value_bytes + state_per_elem) + state_per_tensor
    if not dense:
        total += s.rows * kept * INDEX_BYTES + changes * PLAN_BYTES_PER_CHANGE
    if s.has_bias:
        total += s.out_features * (2 * value_bytes + state_per_elem) + state_per_tensor
    return total


def max_changes(s: LayerShape, kept: int, drop_fraction: float) -> int:
    """The most units one prune-and-regrow step replaces in a layer."""
    if kept >= s.units:
        return 0
    return min(math.ceil(drop_fraction * s.rows * kept), s.rows * (s.units - kept))


def optimizer_state_cost(optimizer: torch.optim.Optimizer | None, dtype: torch.dtype,
                         device: torch.device | str = "cpu") -> tuple[int, int]:
    """Bytes of optimizer state per element and per parameter tensor, found by stepping a copy of
    the optimizer (same class and settings as its first group) on a 1- and a 2-element tensor."""
    if optimizer is None:
        return 0, 0
    accepted = inspect.signature(type(optimizer).__init__).parameters
    settings = {k: v for k, v in optimizer.param_groups[0].items() if k != "params" and k in accepted}

    def state_bytes(n: int) -> int:
        p = torch.zeros(n, dtype=dtype, device=device, requires_grad=True)
        p.grad = torch.ones(n, dtype=dtype, device=device)
        try:
            probe = type(optimizer)([p], **settings)
            probe.step()
        except Exception as err:  # an optimizer that cannot be rebuilt from its settings
            raise ConfigError(f"mbst cannot measure the state of {type(optimizer).__name__} ({err}); "
                              "use an optimizer such as Adam, AdamW or SGD") from None
        return sum(t.numel() * t.element_size() for t in probe.state[p].values() if isinstance(t, torch.Tensor))

    one, two = state_bytes(1), state_bytes(2)
    return two - one, 2 * one - two


# -- layers ------------------------------------------------------------------------------------
class _SparseLayer(nn.Module):
    """Shared parts: the layer's call (linear or conv), the dense-gradient capture, the plan."""

    def __init__(self, dense: nn.Module, shape: LayerShape) -> None:
        super().__init__()
        self.shape = shape
        self.bias = dense.bias                       # the same Parameter: its optimizer state is kept
        self.conv = None if isinstance(dense, nn.Linear) else {
            "dim": dense.weight.dim() - 2, "stride": dense.stride, "padding": dense.padding,
            "dilation": dense.dilation}
        self.changes = 0                              # > 0: this step plans a regrowth of that many units
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.positions = 1                            # output positions per sample (for the FLOPs estimate)

    # The linear-layer protocol (haet.core.surgery.is_linear_like): a sparse Linear still reads as one.
    @property
    def in_features(self) -> int:
        if self.conv is not None:
            raise AttributeError("a sparse convolution has no in_features")
        return self.shape.in_features

    @property
    def out_features(self) -> int:
        if self.conv is not None:
            raise AttributeError("a sparse convolution has no out_features")
        return self.shape.out_features

    def _call(self, x: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
        if self.conv is None:
            return F.linear(x, weight, self.bias)
        c = self.conv
        fn = (F.conv1d, F.conv2d, F.conv3d)[c["dim"] - 1]
        return fn(x, weight, self.bias, c["stride"], c["padding"], c["dilation"], groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fast_forward(x)
        if self.changes > 0 and torch.is_grad_enabled() and not isinstance(self, UnstructuredSparse):
            y = _ScoreFn.apply(y, x, self)            # saves the input to score the regrowth in backward
        self.positions = y[0].numel() // self.shape.out_features if y.dim() > 1 else 1
        return y

    def _plan_from_gradient(self, grad: torch.Tensor) -> None:
        if self.pending is None:                      # micro-batches: the first one scores
            self.pending = plan_changes(self.slot_magnitudes().detach(), self.unit_scores(grad.detach()),
                                        self.kept_units(), self.changes)

    def dense_shape(self) -> tuple[int, ...]:
        s = self.shape
        return (s.out_features, s.in_features, *s.kernel)

    def apply_pending(self, optimizer: torch.optim.Optimizer | None) -> int:
        """Move the planned slots to their new units, zeroing their values, gradients and state."""
        if self.pending is None:
            return 0
        slots, units = self.pending
        self.pending = None
        with torch.no_grad():
            self.set_units(slots, units)
            targets = [self.values.data]
            if self.values.grad is not None:
                targets.append(self.values.grad)
            if optimizer is not None:
                targets += [t for t in optimizer.state.get(self.values, {}).values()
                            if isinstance(t, torch.Tensor) and t.shape == self.values.shape]
            for t in targets:
                self.zero_slots(t, slots)
        return len(slots)


class UnstructuredSparse(_SparseLayer):
    """Kept weights as values (float) and flat positions (int32); the kernel is rebuilt each call."""

    def __init__(self, dense: nn.Module, shape: LayerShape, kept: int) -> None:
        super().__init__(dense, shape)
        self.weight_shape = tuple(dense.weight.shape)
        w = dense.weight.detach().reshape(-1)
        order = w.abs().topk(kept).indices.sort().values       # the largest weights survive
        self.values = nn.Parameter(w[order].clone())
        self.register_buffer("index", order.to(INDEX_DTYPE))

    def dense_weight(self) -> torch.Tensor:
        """The dense kernel (differentiable in the values); the layer's own call does not keep it."""
        flat = self.values.new_zeros(self.shape.numel).index_put((self.index.long(),), self.values)
        return flat.view(self.weight_shape)

    def fast_forward(self, x):
        return _UnstructuredFn.apply(x, self.values, self.index, self.bias, self)

    def kept_units(self) -> torch.Tensor:
        return self.index.view(1, -1)

    def slot_magnitudes(self) -> torch.Tensor:
        return self.values.abs().view(1, -1)

    def unit_scores(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.abs().reshape(1, -1)

    def set_units(self, slots, units) -> None:
        self.index[slots.long()] = units

    def zero_slots(self, t: torch.Tensor, slots) -> None:
        t[slots.long()] = 0


class BlockSparse(_SparseLayer):
    """Kept blocks stored as a grouped convolution's weight (R*bo, K*bi, *kernel) plus the block
    column of each slot (R, K) int32. ``channel`` is the case R = 1, bi = 1."""

    def __init__(self, dense: nn.Module, shape: LayerShape, kept: int) -> None:
        super().__init__(dense, shape)
        s = shape
        w = dense.weight.detach().reshape(s.rows, s.bo, s.units, s.bi, -1)
        score = w.abs().sum(dim=(1, 3, 4))                               # (R, U) block magnitudes
        cols = score.topk(kept, dim=1).indices.sort(dim=1).values        # (R, K)
        picked = w[torch.arange(s.rows)[:, None], :, cols]               # (R, K, bo, bi, k)
        values = picked.permute(0, 2, 1, 3, 4).reshape(s.rows * s.bo, kept * s.bi, *s.kernel)
        self.kept = kept
        self.values = nn.Parameter(values.clone())
        self.register_buffer("blocks", cols.to(INDEX_DTYPE))

    def _channels(self) -> torch.Tensor:
        s = self.shape
        return (self.blocks.long()[..., None] * s.bi + torch.arange(s.bi, device=self.blocks.device)).reshape(-1)

    def fast_forward(self, x):
        s = self.shape
        if self.conv is not None:
            return self._call(x.index_select(1, self._channels()), self.values, groups=s.rows)
        xg = x.index_select(-1, self._channels())
        if s.rows == 1:
            return F.linear(xg, self.values, self.bias)
        lead = xg.shape[:-1]
        y = torch.einsum("nrj,roj->nro", xg.reshape(-1, s.rows, self.kept * s.bi),
                         self.values.view(s.rows, s.bo, self.kept * s.bi)).reshape(*lead, s.out_features)
        return y + self.bias if self.bias is not None else y

    def dense_weight(self) -> torch.Tensor:
        s = self.shape
        vals = self.values.view(s.rows, s.bo, self.kept, s.bi, -1).transpose(1, 2)      # (R, K, bo, bi, k)
        rows = torch.arange(s.rows, device=self.blocks.device)[:, None].expand(s.rows, self.kept)
        full = vals.new_zeros(s.rows, s.units, s.bo, s.bi, vals.shape[-1]).index_put((rows, self.blocks), vals)
        return full.transpose(1, 2).reshape(s.out_features, s.in_features, *s.kernel)

    def kept_units(self) -> torch.Tensor:
        return self.blocks

    def slot_magnitudes(self) -> torch.Tensor:
        s = self.shape
        return self.values.abs().view(s.rows, s.bo, self.kept, s.bi, -1).sum(dim=(1, 3, 4))

    def unit_scores(self, grad: torch.Tensor) -> torch.Tensor:
        s = self.shape
        return grad.abs().reshape(s.rows, s.bo, s.units, s.bi, -1).sum(dim=(1, 3, 4))

    def set_units(self, slots, units) -> None:
        self.blocks.view(-1)[slots.long()] = units

    def zero_slots(self, t: torch.Tensor, slots) -> None:
        s = self.shape
        slots = slots.long()
        t.view(s.rows, s.bo, self.kept, s.bi, -1)[slots // self.kept, :, slots % self.kept] = 0


# -- autograd: what is saved for backward ---------------------------------------------------
class _UnstructuredFn(torch.autograd.Function):
    """y = layer(x) with the kernel rebuilt from (values, index); saves x, values and index only."""

    @staticmethod
    def forward(ctx, x, values, index, bias, layer):
        ctx.layer = layer
        ctx.save_for_backward(x, values, index)
        return layer._call(x, _scatter(values, index, layer.weight_shape))

    @staticmethod
    def backward(ctx, gy):
        x, values, index = ctx.saved_tensors
        layer = ctx.layer
        gx = gvalues = gbias = None
        if ctx.needs_input_grad[0]:
            gx = dense_input_grad(layer, x.shape, _scatter(values, index, layer.weight_shape), gy)
        if ctx.needs_input_grad[1] or layer.changes > 0:
            gw = dense_weight_grad(layer, x, gy)          # workspace: dropped once gathered
            if layer.changes > 0:
                layer._plan_from_gradient(gw)
            gvalues = gw.reshape(-1)[index.long()]
        if ctx.needs_input_grad[3]:
            gbias = _bias_grad(layer, gy)
        return gx, gvalues, None, gbias, None


class _ScoreFn(torch.autograd.Function):
    """Identity on y; its backward plans the layer's regrowth from the dense weight gradient
    computed from the saved input x (block and channel layers on an update step)."""

    @staticmethod
    def forward(ctx, y, x, layer):
        ctx.layer = layer
        ctx.save_for_backward(x)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        ctx.layer._plan_from_gradient(dense_weight_grad(ctx.layer, x, gy))
        return gy, None, None


def _scatter(values: torch.Tensor, index: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return values.new_zeros(math.prod(shape)).index_put_((index.long(),), values).view(shape)


def dense_weight_grad(layer: "_SparseLayer", x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """The gradient of the dense kernel, from the layer's input and output gradient."""
    shape = layer.dense_shape()
    if layer.conv is None:
        return gy.reshape(-1, shape[0]).t() @ x.reshape(-1, shape[1])
    c = layer.conv
    fn = (torch.nn.grad.conv1d_weight, torch.nn.grad.conv2d_weight, torch.nn.grad.conv3d_weight)[c["dim"] - 1]
    return fn(x, shape, gy, c["stride"], c["padding"], c["dilation"])


def dense_input_grad(layer: "_SparseLayer", x_shape, weight: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    if layer.conv is None:
        return gy @ weight
    c = layer.conv
    fn = (torch.nn.grad.conv1d_input, torch.nn.grad.conv2d_input, torch.nn.grad.conv3d_input)[c["dim"] - 1]
    return fn(x_shape, weight, gy, c["stride"], c["padding"], c["dilation"])


def _bias_grad(layer: "_SparseLayer", gy: torch.Tensor) -> torch.Tensor:
    if layer.conv is None:
        return gy.reshape(-1, gy.shape[-1]).sum(0)
    return gy.sum(dim=[d for d in range(gy.dim()) if d != 1])


def plan_changes(magnitudes: torch.Tensor, scores: torch.Tensor, kept_units: torch.Tensor,
                 changes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune by magnitude, regrow by gradient: the `changes` weakest slots (magnitudes (R, K)) and,
    for each, the inactive unit of the same row group with the largest score (scores (R, U)).

    Returns (slots, units) as int32: flat slot r*K + k and the unit that replaces it. Units active
    before the change are never chosen, so the count per group stays fixed.
    """
    rows, kept = magnitudes.shape
    units = scores.shape[1]
    free = units - kept
    # at most `free` drops per group (there are only that many units to regrow into)
    rank_in_row = magnitudes.argsort(dim=1).argsort(dim=1)
    candidates = torch.where(rank_in_row < free, magnitudes, torch.full_like(magnitudes, math.inf)).reshape(-1)
    changes = min(changes, rows * free)
    slots = candidates.topk(changes, largest=False).indices.sort().values          # grouped by row
    per_row = torch.bincount(slots // kept, minlength=rows)
    scores = scores.clone()
    scores.scatter_(1, kept_units.long(), -math.inf)                              # active units are taken
    if rows == 1:
        grown = scores[0].topk(changes).indices
    else:
        order = scores.argsort(dim=1, descending=True)
        grown = order[torch.arange(units, device=order.device)[None, :] < per_row[:, None]]
    return slots.to(INDEX_DTYPE), grown.to(INDEX_DTYPE)


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)
