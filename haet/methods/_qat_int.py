"""Integer-arithmetic inference layers, built by `haet.methods.qat.convert` from fake-quantized ones.

Stored: weights as int8 tensors (narrower widths are held in int8 and counted packed by
`export_bytes`), biases as int32, every scale as a power-of-two exponent (int8 per weight channel,
int16 [exponent, lowest level, highest level] per activation quantizer). A layer rounds its input
to integers at its input exponent (for the output of a previous integer layer this is a rounding
right shift), multiplies integers, accumulates in int32 and rescales the accumulator by a power of
two. The kernels run on float64 tensors holding integers: exact, because every product and partial
sum is an integer far below 2^53; each accumulator is checked to fit in int32.

Operations that are not matrix products (softmax, the normalizations, ReLU, pooling, residual
adds) run in float32 on the exactly dequantized values, as in the paper; the next layer's input
quantizer brings their results back to integers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._qat_ops import (ActQuant, QBatchNorm1d, QBatchNorm2d, QConv1d, QConv2d, QConv3d, QEmbedding,
                       QLayerNorm, QLinear, QMatMul, weight_scale)

INT32_MAX = 2**31 - 1


def exponent(scale: float) -> int:
    e = math.log2(scale)
    if not float(e).is_integer():
        raise ValueError(f"scale {scale} is not a power of two")
    return int(e)


def act_params(q: ActQuant) -> torch.Tensor:
    scale, zero, qmin, qmax = q.qparams()
    if not bool(q.observed):
        raise ValueError("an activation quantizer was never calibrated: run training (or forward passes in "
                         "training mode) before convert")
    return torch.tensor([exponent(scale), qmin, qmax], dtype=torch.int16)


def to_int(x: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Integers (held in float64) of `x` at the quantizer's exponent, clamped to its levels."""
    e, lo, hi = act.tolist()
    return torch.clamp(torch.round(x.double() * 2.0 ** -e), lo, hi)


def checked(acc: torch.Tensor) -> torch.Tensor:
    if acc.numel() and float(acc.abs().max()) > INT32_MAX:
        raise OverflowError("an int32 accumulator overflowed")
    return acc


class IntWeightLayer(nn.Module):
    """Linear or convolution: int8 weight levels, int32 bias, power-of-two exponents."""

    def __init__(self, q: nn.Module) -> None:
        super().__init__()
        self.bits = q.bits_w
        scale = weight_scale(q.weight, q.bits_w, q.scheme, q.per_channel)
        qmax = 2 ** (q.bits_w - 1) - 1
        shape = (-1,) + (1,) * (q.weight.dim() - 1)
        levels = torch.clamp(torch.round(q.weight.detach() / scale.reshape(shape)), -qmax, qmax)
        self.register_buffer("weight", levels.to(torch.int8))
        self.register_buffer("w_exp", torch.log2(scale).to(torch.int8))
        self.register_buffer("act", act_params(q.input_q))
        bias = None
        if q.bias is not None:
            bias = torch.round(q.bias.detach() / (scale * 2.0 ** int(self.act[0]))).to(torch.int32)
        self.register_buffer("bias", bias)
        self.conv = None
        if isinstance(q, (QConv1d, QConv2d, QConv3d)):
            self.conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[q.weight.dim() - 2]
            self.conv_args = (q.stride, q.padding, q.dilation, q.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xi = to_int(x, self.act)
        w = self.weight.double()
        b = self.bias.double() if self.bias is not None else None
        if self.conv is None:
            acc, channel_dim = F.linear(xi, w, b), -1
        else:
            acc, channel_dim = self.conv(xi, w, b, *self.conv_args), 1
        rescale = 2.0 ** (self.w_exp.double() + int(self.act[0]))
        if channel_dim == 1:
            rescale = rescale.reshape((-1,) + (1,) * (acc.dim() - 2))
        return (checked(acc) * rescale).float()


class IntEmbedding(nn.Module):
    def __init__(self, q: QEmbedding) -> None:
        super().__init__()
        self.bits = q.bits_w
        scale = weight_scale(q.weight, q.bits_w, q.scheme, q.per_channel)
        qmax = 2 ** (q.bits_w - 1) - 1
        levels = torch.clamp(torch.round(q.weight.detach() / scale.reshape(-1, 1)), -qmax, qmax)
        self.register_buffer("weight", levels.to(torch.int8))
        self.register_buffer("w_exp", torch.log2(scale).to(torch.int8))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(idx, self.weight.double())
        exp = self.w_exp.double()
        scale = 2.0 ** (exp[idx].unsqueeze(-1) if len(exp) > 1 else exp)
        return (rows * scale).float()


class IntMatMul(nn.Module):
    def __init__(self, q: QMatMul) -> None:
        super().__init__()
        self.register_buffer("act", act_params(q.input_q))
        self.register_buffer("other", act_params(q.other_q))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        acc = checked(torch.matmul(to_int(a, self.act), to_int(b, self.other)))
        return (acc * 2.0 ** (int(self.act[0]) + int(self.other[0]))).float()


class IntInputNorm(nn.Module):
    """A normalization (evaluation mode) whose input is quantized; float32 parameters."""

    def __init__(self, q: nn.Module) -> None:
        super().__init__()
        self.register_buffer("act", act_params(q.input_q))
        self.layer = isinstance(q, QLayerNorm)
        self.eps = q.eps
        for name in ("weight", "bias") + (() if self.layer else ("running_mean", "running_var")):
            t = getattr(q, name)
            self.register_buffer(name, t.detach().clone() if t is not None else None)
        self.shape = tuple(q.normalized_shape) if self.layer else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (to_int(x, self.act) * 2.0 ** int(self.act[0])).float()
        if self.layer:
            return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def to_integer(module: nn.Module) -> nn.Module | None:
    """The integer counterpart of a fake-quantized module (None for any other module)."""
    if isinstance(module, (QLinear, QConv1d, QConv2d, QConv3d)):
        return IntWeightLayer(module)
    if isinstance(module, QEmbedding):
        return IntEmbedding(module)
    if isinstance(module, QMatMul):
        return IntMatMul(module)
    if isinstance(module, (QLayerNorm, QBatchNorm1d, QBatchNorm2d)):
        return IntInputNorm(module)
    return None


def module_bytes(module: nn.Module) -> int:
    """Bytes of this module's own stored tensors; sub-byte weights counted packed."""
    total = 0
    tensors = list(module.named_parameters(recurse=False)) + [
        (n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]
    for name, t in tensors:
        if t is None:
            continue
        if name == "weight" and t.dtype == torch.int8 and getattr(module, "bits", 8) < 8:
            total += math.ceil(t.numel() * module.bits / 8)
        else:
            total += t.numel() * t.element_size()
    return total
