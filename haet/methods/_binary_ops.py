"""Kernels and layers of `haet.methods.binary`: the exact penalty's proximal map, the projection
onto {±scale}, and the straight-through binarized Linear/Conv layers of BinaryConnect."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@torch.no_grad()
def prox_binary_penalty_(w: torch.Tensor, scale: float, t: float) -> torch.Tensor:
    """In place: ``w ← prox_{t·P}(w)`` for the exact penalty ``P(w) = Σ_i | |w_i| − scale |``.

    Each entry moves toward the nearer of ±scale by `t` and lands exactly on it when it is
    closer than `t` (the minimizer of ``t·| |u| − scale | + ½(u − w)²``; sign(0) = +1). This is
    why the penalty is exact: a weight within `t` of ±scale becomes exactly ±scale.
    """
    magnitude = w.abs()
    gap = magnitude - scale
    magnitude = scale + gap.sign() * (gap.abs() - t).clamp_min(0)
    return w.copy_(torch.where(w >= 0, magnitude, -magnitude))


@torch.no_grad()
def binarize_(w: torch.Tensor, scale: float) -> torch.Tensor:
    """In place: ``w ← scale · sign(w)`` (sign(0) = +1), the projection onto {−scale, +scale}."""
    return w.copy_(torch.where(w >= 0, scale, -scale).to(w.dtype))


def count_binary(w: torch.Tensor, scale: float) -> int:
    """How many entries of `w` are exactly ±scale."""
    return int((w.abs() == scale).sum())


def binary_weight(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale · sign(w)`` in the forward; the identity in the backward (straight-through)."""
    return w + (torch.where(w >= 0, scale, -scale) - w).detach()


class _BinaryConnectMixin:
    scale: torch.Tensor

    def binary(self) -> torch.Tensor:
        return binary_weight(self.weight, self.scale)


class BinaryConnectLinear(_BinaryConnectMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.binary(), self.bias)


class _BinaryConnectConv(_BinaryConnectMixin):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.binary(), self.bias)


class BinaryConnectConv1d(_BinaryConnectConv, nn.Conv1d):
    pass


class BinaryConnectConv2d(_BinaryConnectConv, nn.Conv2d):
    pass


class BinaryConnectConv3d(_BinaryConnectConv, nn.Conv3d):
    pass


BINARY_CONNECT = {nn.Linear: BinaryConnectLinear, nn.Conv1d: BinaryConnectConv1d, nn.Conv2d: BinaryConnectConv2d,
                  nn.Conv3d: BinaryConnectConv3d}


def to_binary_connect(module: nn.Module, scale: float) -> nn.Module:
    """A BinaryConnect layer sharing `module`'s parameters (same objects, same names)."""
    cls = BINARY_CONNECT[type(module)]
    new = cls.__new__(cls)
    for key, value in module.__dict__.items():
        new.__dict__[key] = value.copy() if isinstance(value, (dict, set)) else value
    new.register_buffer("scale", torch.tensor(scale, dtype=module.weight.dtype, device=module.weight.device))
    return new
