"""Layers of input and kernel downsampling.

`LowResConv1d`/`LowResConv2d` are ``nn.Conv1d``/``nn.Conv2d`` that hold the very same parameters
and, while their shared `LowRes` switch is on, convolve with kernels pooled by the switch's factor.
`LowResFlatten` is an ``nn.Flatten`` that, while the switch is on, scales its input back up to the
size it has at full resolution, so a flatten→linear head accepts a downsampled trunk. With the
switch off, each calls its parent class's own ``forward``: regular batches run exactly the
original computation.

Kernel pooling ("avg") is area weighting: a k-tap kernel becomes ``ceil(k/f)`` taps, pooled tap
``a`` covering the interval ``[a·k/k', (a+1)·k/k')`` of the original taps; ``w' = P w Pᵀ`` with each
column of P summing to 1, so the pooled kernel keeps the sum of the weights (its response to a flat
input). It is computed with elementwise products, which the FLOPs meter does not count (like all
elementwise work); its cost is ``C_out·C_in·k²·k'²`` multiply-adds per step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LowRes:
    """The switch shared by one model's low-resolution layers: factor 0 means regular.

    While it is on, the model's BatchNorm layers normalize with the batch's own statistics but do
    not update their running statistics: those stay the full-resolution ones evaluation uses.
    """

    def __init__(self, kernel: str = "avg", norms=()) -> None:
        self.factor = 0
        self.kernel = kernel
        self._norms = [(m, m.track_running_stats) for m in norms]

    def set(self, factor: int) -> None:
        self.factor = factor
        for m, tracked in self._norms:
            m.track_running_stats = tracked and not factor


def pooling_matrix(k: int, k_low: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """(k_low, k) area weights: entry (a, i) is the overlap of tap i = [i, i+1) with the pooled
    tap a = [a·k/k_low, (a+1)·k/k_low); every column sums to 1."""
    edges = torch.arange(k_low + 1, dtype=torch.float64) * (k / k_low)
    taps = torch.arange(k, dtype=torch.float64)
    lo = torch.maximum(edges[:-1, None], taps[None, :])
    hi = torch.minimum(edges[1:, None], taps[None, :] + 1)
    return (hi - lo).clamp(min=0).to(dtype=dtype, device=device)


def pool_kernel(weight: torch.Tensor, factor: int, kernel: str = "avg") -> torch.Tensor:
    """The kernel for inputs downsampled by `factor`: each spatial size k becomes ceil(k/factor)
    ("avg", sum-preserving area pooling), or the kernel unchanged ("none"). Differentiable."""
    if kernel == "none":
        return weight
    spatial = weight.shape[2:]
    if all(math.ceil(k / factor) == k for k in spatial):
        return weight
    if len(spatial) == 1:
        (k,) = spatial
        P = pooling_matrix(k, math.ceil(k / factor), weight.dtype, weight.device)
        return (weight[:, :, None, :] * P).sum(-1)
    kh, kw = spatial
    Ph = pooling_matrix(kh, math.ceil(kh / factor), weight.dtype, weight.device)
    Pw = pooling_matrix(kw, math.ceil(kw / factor), weight.dtype, weight.device)
    PP = Ph[:, None, :, None] * Pw[None, :, None, :]  # (kh', kw', kh, kw)
    return (weight[:, :, None, None] * PP).sum((-2, -1))


def downsample_input(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool the spatial dimensions of (N, C, L) or (N, C, H, W) inputs by `factor`
    (a partial window at an edge averages what it covers)."""
    if x.dim() == 3:
        return F.avg_pool1d(x, factor, ceil_mode=True)
    if x.dim() == 4:
        return F.avg_pool2d(x, factor, ceil_mode=True)
    raise ValueError(f"downsampling needs (N, C, L) or (N, C, H, W) inputs, got shape {tuple(x.shape)}")


class _LowResConv:
    """Mixin for a convolution that runs at low resolution while its switch is on."""

    lowres: LowRes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = self.lowres.factor
        if not factor:
            return super().forward(x)
        weight = pool_kernel(self.weight, factor, self.lowres.kernel)
        pads, crop = [], []
        for i in reversed(range(weight.dim() - 2)):  # F.pad lists the last dimension first
            total, target = _low_res_padding(x.shape[2 + i], factor, weight.shape[2 + i], self.kernel_size[i],
                                             self.stride[i], self.padding, i)
            pads += [total // 2, total - total // 2]
            crop.insert(0, target)
        x = F.pad(x, pads) if any(pads) else x
        conv = F.conv1d if weight.dim() == 3 else F.conv2d
        out = conv(x, weight, self.bias, self.stride, 0, 1, self.groups)
        for i, target in enumerate(crop):
            out = out.narrow(2 + i, 0, min(target, out.shape[2 + i]))
        return out


class LowResConv1d(_LowResConv, nn.Conv1d):
    pass


class LowResConv2d(_LowResConv, nn.Conv2d):
    pass


class LowResFlatten(nn.Flatten):
    """nn.Flatten that scales a downsampled (N, C, *spatial) input back to its full-resolution
    size: nearest upsampling by the factor, then edge replication or cropping to that size."""

    lowres: LowRes
    full_size: tuple[int, ...] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.lowres.factor:
            if x.dim() in (3, 4):
                self.full_size = tuple(x.shape[2:])
            return super().forward(x)
        if x.dim() in (3, 4) and self.full_size is not None and tuple(x.shape[2:]) != self.full_size:
            x = _resize_back(x, self.lowres.factor, self.full_size)
        return super().forward(x)


LOW_RES_CLASSES = {nn.Conv1d: LowResConv1d, nn.Conv2d: LowResConv2d, nn.Flatten: LowResFlatten}


def adopt(module: nn.Module, cls: type, lowres: LowRes) -> nn.Module:
    """A `cls` instance that shares `module`'s parameters, buffers and settings (same tensors)."""
    new = cls.__new__(cls)
    object.__setattr__(new, "__dict__", dict(module.__dict__))
    new.lowres = lowres
    return new


def restore(module: nn.Module) -> nn.Module:
    """The plain layer (nn.Conv2d, ...) sharing the parameters of a low-resolution one."""
    base = next(b for b, c in LOW_RES_CLASSES.items() if isinstance(module, c))
    new = base.__new__(base)
    state = dict(module.__dict__)
    state.pop("lowres", None)
    state.pop("full_size", None)
    object.__setattr__(new, "__dict__", state)
    return new


# -- private helpers -------------------------------------------------------------------------
def _low_res_padding(n_low: int, factor: int, k_low: int, k: int, stride: int, padding, dim: int) -> tuple[int, int]:
    """Zero padding (total) and output size so that a conv on an input downsampled by `factor`
    gives ceil(full output / factor) samples, the full-resolution input taken as n_low·factor."""
    n_full = n_low * factor
    if padding == "same":
        out_full = n_full
    else:
        p = 0 if padding == "valid" else padding[dim]
        out_full = (n_full + 2 * p - k) // stride + 1
    target = max(1, math.ceil(out_full / factor))
    return max(0, (target - 1) * stride + k_low - n_low), target


def _resize_back(x: torch.Tensor, factor: int, size: tuple[int, ...]) -> torch.Tensor:
    for i, n in enumerate(size):
        x = x.repeat_interleave(factor, dim=2 + i)
    spatial = x.shape[2:]
    pads: list[int] = []
    for have, want in reversed(list(zip(spatial, size))):
        pads += [0, max(0, want - have)]
    if any(pads):
        x = F.pad(x, pads, mode="replicate")
    for i, n in enumerate(size):
        x = x.narrow(2 + i, 0, n)
    return x
