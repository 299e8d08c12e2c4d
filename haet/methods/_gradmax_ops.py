"""GradMax's model surgery: growable (layer, consumer) pairs, resized modules, the fan-in Jacobian.

A growable pair is two layers of one ``nn.Sequential``, ``Linear``/``Conv2d`` → ``Linear``/``Conv2d``,
with only channel-wise modules between them that map 0 to 0 (activations, pooling, dropout, one
``Flatten`` from a Conv2d to a Linear). New units are appended after the existing ones, so a
consumer Linear after a Flatten gains columns ``[C·S, (C+k)·S)`` (S = spatial positions per
channel) and every old entry keeps its index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

PASS_THROUGH = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Identity, nn.Dropout,
                nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)


class GrowReLU(nn.ReLU):
    """ReLU with derivative 1 at 0 (the forward is identical).

    GradMax needs f(0) = 0 and f'(0) ≠ 0: new units start with zero fan-in, so their
    pre-activation is exactly 0, and torch's ReLU (derivative 0 there) would give their fan-in no
    gradient, ever. ``clamp_min`` passes the gradient at 0, as the paper's code's "relu1" does.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp_min_(x, 0) if self.inplace else torch.clamp_min(x, 0)


@dataclass
class GrowPair:
    layer: str       # qualified name of the layer that gains units
    consumer: str    # qualified name of the layer that reads them
    between: list    # qualified names of the modules in between
    spatial: int     # consumer inputs per unit: S after a Flatten, else 1


def width(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def find_pairs(model: nn.Module) -> dict[str, GrowPair]:
    """Every growable pair of `model`, by the name of the layer that grows."""
    pairs: dict[str, GrowPair] = {}
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for i, (name, layer) in enumerate(children):
            if not _growable_type(layer):
                continue
            j = i + 1
            while j < len(children) and isinstance(children[j][1], PASS_THROUGH):
                j += 1
            if j == len(children) or not _growable_type(children[j][1]):
                continue
            consumer, between = children[j][1], [m for _, m in children[i + 1:j]]
            flatten = sum(isinstance(m, nn.Flatten) for m in between)
            spatial = 1
            if isinstance(layer, nn.Conv2d) and isinstance(consumer, nn.Linear):
                if flatten != 1 or consumer.in_features % layer.out_channels:
                    continue
                spatial = consumer.in_features // layer.out_channels
            elif isinstance(consumer, nn.Conv2d) and (isinstance(layer, nn.Linear) or flatten):
                continue
            elif width(layer) != _in_units(consumer):
                continue
            q = f"{prefix}." if prefix else ""
            pairs[q + name] = GrowPair(q + name, q + children[j][0], [q + n for n, _ in children[i + 1:j]], spatial)
    return pairs


def fan_out_view(consumer: nn.Module, units: int) -> torch.Tensor:
    """The consumer's weight as (out, units, F): F = S (Linear) or kh·kw (Conv2d)."""
    w = consumer.weight
    return w.reshape(w.shape[0], units, -1)


def make_like(module: nn.Module, in_units: int, out: int, spatial: int = 1) -> nn.Module:
    """A freshly initialized module of `module`'s kind with `in_units` input units and `out` outputs."""
    w = module.weight
    if isinstance(module, nn.Linear):
        new = nn.Linear(in_units * spatial, out, bias=module.bias is not None)
    else:
        new = nn.Conv2d(in_units, out, module.kernel_size, module.stride, module.padding, module.dilation,
                        bias=module.bias is not None, padding_mode=module.padding_mode)
    return new.to(device=w.device, dtype=w.dtype)


@torch.no_grad()
def widened(layer: nn.Module, fan_in: torch.Tensor) -> nn.Module:
    """`layer` with units appended: weights `fan_in` (k, ...), bias 0."""
    new = make_like(layer, _in_units(layer), width(layer) + len(fan_in))
    new.weight.copy_(torch.cat([layer.weight, fan_in]))
    if layer.bias is not None:
        new.bias.copy_(torch.cat([layer.bias, layer.bias.new_zeros(len(fan_in))]))
    return new


@torch.no_grad()
def consumer_widened(consumer: nn.Module, units: int, spatial: int, fan_out: torch.Tensor) -> nn.Module:
    """`consumer` reading `fan_out.shape[1]` more units; `fan_out` is (out, k, F)."""
    new = make_like(consumer, units + fan_out.shape[1], _out(consumer), spatial)
    w = torch.cat([fan_out_view(consumer, units), fan_out], dim=1)
    new.weight.copy_(w.reshape(new.weight.shape))
    if consumer.bias is not None:
        new.bias.copy_(consumer.bias)
    return new


def fan_in_gradients(model: nn.Module, pair: GrowPair, batch, loss_fn) -> tuple[torch.Tensor, float]:
    """Aᵀ (p × q): how the fan-in gradient of a new, zero-fan-in unit depends on its fan-out.

    A new unit has pre-activation exactly 0, so the gradient of its fan-in is linear in its
    fan-out w: g = A w, with A = Σ_batch,positions (input patches) ⊗ J_betweenᵀ C_wᵀ δ, where
    δ = ∂L/∂z_{l+1} (the consumer's output gradient), J_between the Jacobian at 0 of the
    channel-wise modules in between (ReLU with f'(0) = 1, pooling, Flatten) and C_w the consumer's
    map for fan-out w. Transposing, row (o, f) of Aᵀ is the consumer's weight gradient for output
    o and fan-out entry f, with the input patches pushed through J_between (a forward-mode
    derivative at 0) as its input. For Linear → Linear this is M = Σ_batch δ h_{l-1}ᵀ.
    Costs one forward and backward of the model plus small products. Returns (Aᵀ, FLOPs).
    Buffers (batch-norm statistics) are restored afterwards.
    """
    layer, consumer = model.get_submodule(pair.layer), model.get_submodule(pair.consumer)
    seen: dict = {}
    hooks = [layer.register_forward_hook(lambda m, i, o: seen.update(h=i[0].detach(), shape=o.shape)),
             consumer.register_forward_hook(lambda m, i, o: seen.update(z=o))]
    between = [model.get_submodule(n) for n in pair.between]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    try:
        with FlopCounterMode(display=False) as counter:
            loss = loss_fn(model(batch[0]), batch[1])
            (delta,) = torch.autograd.grad(loss, seen["z"])              # δ = ∂L/∂z_{l+1}
            h = seen["h"]
            if isinstance(layer, nn.Linear):
                patches = h                                              # (B, q)
            else:
                patches = F.unfold(h, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
                patches = patches.reshape(len(h), -1, *seen["shape"][2:])  # (B, q, H, W)
            _, pushed = torch.func.jvp(lambda t: _chain(between, t), (torch.zeros_like(patches),), (patches,))
            q = patches.shape[1]
            if isinstance(consumer, nn.Linear):
                grads = torch.einsum("bo,bqs->osq", delta, pushed.reshape(len(h), q, -1)).reshape(-1, q)
            else:
                w = torch.nn.grad.conv2d_weight(pushed, (delta.shape[1], q, *consumer.kernel_size), delta,
                                                consumer.stride, consumer.padding, consumer.dilation)
                grads = w.permute(0, 2, 3, 1).reshape(-1, q)
    finally:
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
    return grads, float(counter.get_total_flops())


def _chain(modules: list, t: torch.Tensor) -> torch.Tensor:
    for m in modules:
        t = m(t)
    return t


def _growable_type(m: nn.Module) -> bool:
    if type(m) is nn.Linear:
        return True
    return type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros"


def _in_units(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def _out(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def unit_norms(t: torch.Tensor, dim: int) -> torch.Tensor:
    """L2 norm of each slice of `t` along `dim` (each unit's weights)."""
    return t.transpose(0, dim).reshape(t.shape[dim], -1).norm(dim=1) if t.numel() else t.new_zeros(0)
