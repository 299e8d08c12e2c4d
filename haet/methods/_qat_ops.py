"""Quantizers, observers and fake-quantized layers for `haet.methods.qat`.

Fake quantization keeps float tensors but rounds them to a grid of ``2^bits`` levels, so a float
matmul on them computes exactly what an integer matmul on the levels computes (up to float32
accumulation). The backward is the clipped straight-through estimator: the gradient passes unchanged inside the
representable range and is zero outside it.

- Fixed point (the paper's choice): every scale is a power of two, 2^e, the smallest that covers
  the observed range; integers rescale by shifts. Weights are symmetric (levels −(2^(b−1)−1) ..
  2^(b−1)−1); activations are unsigned (0 .. 2^b−1) when the observed minimum is ≥ 0 (after a
  ReLU, softmax probabilities) and signed otherwise.
- Affine: real scales; weights symmetric, activations asymmetric with a zero point.

Weights are observed every step (their current max per output channel, or per tensor);
activations by an exponential moving average of their min and max in training mode, frozen in
evaluation. Biases are rounded to 32-bit integers at the scale input-scale × weight-scale, as the
integer model adds them to the int32 accumulator.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models.transformer import MatMul


class FakeQuant(torch.autograd.Function):
    """``(clamp(round(x / scale) + zero, lo, hi) − zero) · scale`` with the clipped straight-through
    gradient (1 where the rounded value was inside [lo, hi], else 0). Plain tensor ops: on CPU about
    5× faster than ``torch.fake_quantize_per_tensor_affine``'s kernel. With ``clip=False`` (the
    caller knows no value falls outside, e.g. weights scaled by their own maximum) the clamp and the
    mask are skipped: the result and the gradient are the same, three passes over `x` fewer."""

    @staticmethod
    def forward(ctx, x, scale, zero: int, lo: int, hi: int, clip: bool = True):
        levels = torch.div(x, scale).round_()
        if zero:
            levels += zero
        ctx.clipped = clip
        if clip:
            clamped = levels.clamp(lo, hi)
            ctx.save_for_backward(clamped == levels)
            levels = clamped
        if zero:
            levels -= zero
        return levels.mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        if ctx.clipped:
            grad = torch.where(ctx.saved_tensors[0], grad, 0.0)
        return grad, None, None, None, None, None


def fake_quant(x: torch.Tensor, scale, zero: int, lo: int, hi: int, clip: bool = True) -> torch.Tensor:
    """Fake-quantize `x` (`scale` a float, or a tensor that broadcasts against `x`)."""
    return FakeQuant.apply(x, scale, zero, lo, hi, clip)


def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest power of two ≥ x (elementwise, x > 0), computed exactly with frexp."""
    mantissa, exponent = torch.frexp(x)   # x = m · 2^e, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(x), exponent - (mantissa == 0.5).to(exponent.dtype))


def pow2_ceil_float(x: float) -> float:
    mantissa, exponent = math.frexp(x)
    return math.ldexp(1.0, exponent - (mantissa == 0.5))


def weight_scale(w: torch.Tensor, bits: int, scheme: str, per_channel: bool) -> torch.Tensor:
    """Scale of each output channel (dim 0) of `w`, or a 1-element tensor per tensor."""
    w = w.detach()
    amax = w.abs().amax(dim=tuple(range(1, w.dim()))) if per_channel else w.abs().max().reshape(1)
    amax = amax.float().clamp_min(1e-12)
    qmax = 2 ** (bits - 1) - 1
    return pow2_ceil(amax / qmax) if scheme == "fixed_point" else amax / qmax


def fake_quant_weight(w: torch.Tensor, bits: int, scheme: str, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(fake-quantized `w`, its scale per output channel); symmetric levels ±(2^(bits−1)−1)."""
    scale = weight_scale(w, bits, scheme, per_channel)
    qmax = 2 ** (bits - 1) - 1
    # |w| / scale ≤ qmax by construction of the scale: nothing to clip
    return fake_quant(w, scale.reshape((-1,) + (1,) * (w.dim() - 1)), 0, -qmax, qmax, clip=False), scale


def fake_quant_bias(b: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor | None:
    """`b` rounded to integers at `scale` (int32 in the integer model); straight-through gradient."""
    if b is None:
        return None
    return b + (torch.round(b / scale) * scale - b).detach()


class ActQuant(nn.Module):
    """Observer (moving average of min and max) and fake quantizer of one activation tensor."""

    def __init__(self, bits: int = 8, scheme: str = "fixed_point", momentum: float = 0.9) -> None:
        super().__init__()
        self.bits, self.scheme, self.momentum = bits, scheme, momentum
        self.register_buffer("min_max", torch.zeros(2))
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool))
        self.last: tuple[float, int, int, int] | None = None  # the qparams of the latest forward

    def qparams(self) -> tuple[float, int, int, int]:
        """(scale, zero point, lowest level, highest level) from the observed range."""
        lo, hi = self.min_max.tolist()
        n = 2 ** self.bits
        if self.scheme == "affine":
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            scale = max(hi - lo, 1e-12) / (n - 1)
            return scale, int(min(max(round(-lo / scale), 0), n - 1)), 0, n - 1
        if lo >= 0:  # unsigned: all levels on the non-negative side
            qmin, qmax, amax = 0, n - 1, hi
        else:
            qmin, qmax, amax = -(n // 2), n // 2 - 1, max(-lo, hi)
        return pow2_ceil_float(max(amax, 1e-12) / qmax), 0, qmin, qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clip = True
        if self.training:
            with torch.no_grad():
                new = torch.stack(torch.aminmax(x.detach())).float()
                if bool(self.observed):
                    self.min_max.lerp_(new, 1 - self.momentum)
                else:
                    self.min_max.copy_(new)
                    self.observed.fill_(True)
            self.last = scale, zero, qmin, qmax = self.qparams()
            batch_lo, batch_hi = new.tolist()  # this batch inside the levels: no clamp needed
            clip = batch_lo / scale + zero < qmin or batch_hi / scale + zero > qmax
        elif bool(self.observed):
            self.last = self.qparams()
        else:
            self.last = None
            return x  # never calibrated: nothing to quantize to yet
        return fake_quant(x, *self.last, clip=clip)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scheme={self.scheme}"


# -- fake-quantized layers: the float module's class with a quantizing forward ------------------
# `retype` gives a float module one of these classes in place of its own, sharing its parameter
# and buffer objects (the optimizer's references stay valid) and keeping their names.

class _QuantWeightMixin:
    bits_w: int
    scheme: str
    per_channel: bool
    input_q: ActQuant

    def _quantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        w, w_scale = fake_quant_weight(self.weight, self.bits_w, self.scheme, self.per_channel)
        last = self.input_q.last
        return w, w_scale, fake_quant_bias(self.bias, w_scale * last[0]) if last else self.bias


class QLinear(_QuantWeightMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_q(x)
        w, _, b = self._quantized()
        return F.linear(x, w, b)


class _QConv(_QuantWeightMixin):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_q(x)
        w, _, b = self._quantized()
        return self._conv_forward(x, w, b)


class QConv1d(_QConv, nn.Conv1d):
    pass


class QConv2d(_QConv, nn.Conv2d):
    pass


class QConv3d(_QConv, nn.Conv3d):
    pass


class QEmbedding(nn.Embedding):
    """The table is quantized per row (per_channel) or per tensor; its output is an activation
    on the grid already."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        w, _ = fake_quant_weight(self.weight, self.bits_w, self.scheme, self.per_channel)
        return F.embedding(idx, w, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                           self.sparse)


class QMatMul(MatMul):
    """A product of two activations: both inputs quantized (Q·Kᵀ, probabilities·V)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.input_q(a), self.other_q(b))


class QLayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.input_q(x))


class QBatchNorm1d(nn.BatchNorm1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.input_q(x))


class QBatchNorm2d(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.input_q(x))


#: float type -> fake-quantized type (exact types: subclasses are not assumed compatible).
QUANTIZED: dict[type, type] = {
    nn.Linear: QLinear, nn.Conv1d: QConv1d, nn.Conv2d: QConv2d, nn.Conv3d: QConv3d, nn.Embedding: QEmbedding,
    MatMul: QMatMul, nn.LayerNorm: QLayerNorm, nn.BatchNorm1d: QBatchNorm1d, nn.BatchNorm2d: QBatchNorm2d,
}
#: Modules that multiply activations but are not handled: a warning names them.
NOT_HANDLED = (nn.MultiheadAttention, nn.Bilinear, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
               nn.RNNBase, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.Transformer)


def retype(module: nn.Module, cls: type) -> nn.Module:
    """A new module of class `cls` sharing `module`'s parameters, buffers and submodules."""
    new = cls.__new__(cls)
    for key, value in module.__dict__.items():
        new.__dict__[key] = value.copy() if isinstance(value, (dict, set)) else value
    return new


def quantize_module(module: nn.Module, bits_w: int, bits_a: int, scheme: str, per_channel: bool,
                    momentum: float, device: torch.device | None = None) -> nn.Module | None:
    """The fake-quantized version of `module`, or None when its type is not handled."""
    cls = QUANTIZED.get(type(module))
    if cls is None:
        return None
    if isinstance(module, nn.modules.conv._ConvNd) and module.padding_mode != "zeros":
        return None
    q = retype(module, cls)
    q.bits_w, q.scheme, q.per_channel = bits_w, scheme, per_channel
    if cls is not QEmbedding:
        q.input_q = ActQuant(bits_a, scheme, momentum).to(device)
    if cls is QMatMul:
        q.other_q = ActQuant(bits_a, scheme, momentum).to(device)
    # The arithmetic this layer's matmuls run in, read by the FLOPs meter per layer and phase: the
    # forward multiplies two quantized operands (the wider sets the width); the backward multiplies
    # float gradients (gradients are not quantized), so it is float32.
    width = bits_a if cls is QMatMul else max(bits_w, bits_a)
    q.flop_dtype = {"forward": f"int{width}", "backward": "float32"}
    return q
