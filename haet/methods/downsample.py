"""Input and kernel downsampling: some mini-batches run at low resolution with pooled kernels.

Poulos, Nouri, Moshovos, "Training CNNs faster with dynamic input and kernel downsampling"
(arXiv:1910.06548; HAET 2021 workshop).

On every `every`-th mini-batch the inputs are average-pooled by `factor` and every convolution
runs with its kernel pooled by the same factor (3×3 → 2×2 for factor 2), so the forward and
backward passes of that batch cost several times fewer FLOPs. Pooling is a fixed linear map of
the weights, so the gradients of the pooled kernels flow back to the full-size weights and one
optimizer updates them all. The other batches are untouched: they run the model's original
layers, bit for bit.

Degenerate settings are refused (ConfigError): a low-resolution input smaller than
``MIN_LOW_RES_SIDE`` samples per spatial side (28×28 at factor 8 is 4×4: after a reference trunk's
two 2× poolings nothing of the image is left), and schedules in which every training step is
low-resolution (``every=1`` with ``until`` covering every epoch), since the model is evaluated at
full resolution and would never be trained there; also ``until`` so small that no epoch
downsamples.

Supported models: 1-D or 2-D convolutional trunks (zero padding, no dilation) that end in global
pooling, or in an ``nn.Flatten`` (whose input is scaled back to its full-resolution size, nearest
neighbour, so a flatten→linear head such as mnist5k-cnn's keeps working). Anything else is
refused when the method is applied, naming the layer (`apply_downsample` probes the model once).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from ..core.config import check_choice, check_range
from ..core.errors import ConfigError
from ..core.method import Method
from ..core.surgery import replace_modules
from ..data.loader import TensorData
from . import _downsample_ops as ops
from ._downsample_ops import LowRes, downsample_input, pool_kernel

#: Smallest side (in samples) of a low-resolution input: 8 still leaves a 2×2 map after the two 2×
#: poolings of the reference CNNs (mnist5k-cnn, resnet8); below it the low-res batches learn nothing
#: of the images' shapes.
MIN_LOW_RES_SIDE = 8

__all__ = ["DownsampleConfig", "apply_downsample", "remove_downsample", "low_resolution", "downsample_input",
           "pool_kernel", "Downsample"]


@dataclass(frozen=True)
class DownsampleConfig:
    every: int = 2               # every `every`-th batch runs at low resolution (1 = all of them)
    factor: int = 2              # spatial downsampling of inputs and kernels (2: 28×28 → 14×14, 3×3 → 2×2)
    kernel: Literal["avg", "none"] = "avg"  # "avg": area-pooled kernels; "none": full kernels on small inputs
    until: float = 0.8           # share of the epochs (rounded), from the start, that downsample; the rest refine at full size

    def __post_init__(self) -> None:
        check_range("every", self.every, 1, None, integer=True)
        check_range("factor", self.factor, 2, 8, integer=True)
        check_choice("kernel", self.kernel, ("avg", "none"))
        check_range("until", self.until, 0, 1, lo_open=True)
        if self.every == 1 and self.until == 1:
            raise ConfigError("every=1 with until=1 runs every training step at low resolution and never at full "
                              "resolution, where the model is evaluated; allowed: every >= 2, or until < 1")


def require_conv(model: nn.Module) -> None:
    """ConfigError unless `model` has a Conv1d or Conv2d layer (what downsampling pools)."""
    if not any(type(m) in (nn.Conv1d, nn.Conv2d) for m in model.modules()):
        raise ConfigError(f"downsample needs a convolutional model; {type(model).__name__} has no Conv1d/Conv2d layer")


def apply_downsample(model: nn.Module, config: DownsampleConfig | None = None, *,
                     optimizer: torch.optim.Optimizer | None = None,
                     filter_fn: Callable[[str, nn.Module], bool] | None = None,
                     example_input: torch.Tensor | None = None) -> LowRes:
    """Make `model` able to run at low resolution; return the switch (``switch.set(f)`` on,
    ``switch.set(0)`` off; or use `low_resolution`). Convolutions and flatten layers (those
    `filter_fn(name, module)` accepts; a convolution left out runs its full kernel on the small
    input) are swapped for subclasses that share their parameters (the optimizer needs no change,
    names in the state dict stay the same). `example_input` (a few full-resolution samples) is
    checked against ``MIN_LOW_RES_SIDE`` at ``config.factor`` and run once at both resolutions: a
    layer that fails at low resolution raises ConfigError naming it, and so does an output whose
    shape changes. Without it nothing is checked, and a flatten head learns its full-resolution
    size from the first regular forward pass.
    """
    config = config or DownsampleConfig()
    kernel, factor = config.kernel, config.factor
    check_choice("kernel", kernel, ("avg", "none"))
    lowres = LowRes(kernel, [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)])
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            if module.padding_mode != "zeros" or any(d != 1 for d in module.dilation):
                raise ConfigError(f"downsample supports zero-padded convolutions without dilation; layer {name!r} "
                                  f"has padding_mode={module.padding_mode!r}, dilation={module.dilation}")
        elif isinstance(module, (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            raise ConfigError(f"downsample cannot pool the kernels of layer {name!r} ({type(module).__name__}); "
                              "it supports Conv1d and Conv2d")
    require_conv(model)

    if example_input is not None:
        _check_low_res_size(tuple(example_input.shape[2:]), factor)

    def make(name: str, module: nn.Module):
        cls = ops.LOW_RES_CLASSES.get(type(module))
        keep = cls is not None and (filter_fn is None or filter_fn(name, module))
        return ops.adopt(module, cls, lowres) if keep else None

    replace_modules(model, optimizer, make, what="downsample")
    if example_input is not None:
        _probe(model, example_input, lowres, factor)
    return lowres


def remove_downsample(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Swap the low-resolution layers back to plain ones (same parameters)."""
    replace_modules(model, optimizer, lambda n, m: ops.restore(m) if type(m) in ops.LOW_RES_CLASSES.values()
                    else None, what="remove_downsample")


@contextlib.contextmanager
def low_resolution(lowres: LowRes, factor: int = 2):
    """Within the block the model's convolutions pool their kernels by `factor` (feed it
    ``downsample_input(x, factor)``) and its BatchNorm layers leave their running statistics as
    they are."""
    before = lowres.factor
    lowres.set(factor)
    try:
        yield lowres
    finally:
        lowres.set(before)


class Downsample(Method):
    name = "downsample"
    summary = "every few batches: inputs downsampled, conv kernels pooled; gradients reach the full weights"
    paper = "Poulos, Nouri, Moshovos, Training CNNs faster with dynamic input and kernel downsampling (HAET 2021)"
    config_class = DownsampleConfig
    owns = frozenset({"batch_shape", "layer_types"})

    def __init__(self, config: DownsampleConfig | None = None, /, **params) -> None:
        super().__init__(config, **params)
        self.lowres: LowRes | None = None
        self.downsampled_steps = 0
        self.flops_saved = 0.0
        self.flops_per_sample: tuple[float, float] = (0.0, 0.0)  # (full, low) forward+backward

    def check_model(self, model) -> None:
        require_conv(model)

    def fit_start(self, state) -> None:
        c, model = self.config, state.unwrapped_model
        low_epochs = round(c.until * state.epochs)
        if c.every == 1 and low_epochs >= state.epochs:
            raise ConfigError(f"downsample: every=1 with until={c.until} runs every step of all {state.epochs} epochs "
                              "at low resolution and never at full resolution, where the model is evaluated; allowed: "
                              "every >= 2, or an until that leaves full-resolution epochs")
        if low_epochs == 0:
            raise ConfigError(f"downsample: until={c.until} of {state.epochs} epochs rounds to 0 epochs, so no batch "
                              f"would run at low resolution; allowed: until >= {0.5 / state.epochs:.3g}")
        example = _example_input(state.train_data).to(state.device)
        self.lowres = apply_downsample(model, c, optimizer=state.optimizer, example_input=example)
        state.model_version += 1
        self.flops_per_sample = _flops_per_sample(model, example, self.lowres, self.config.factor)

    def batch_start(self, state) -> None:
        low = (state.step + 1) % self.config.every == 0 and state.epoch <= round(self.config.until * state.epochs)
        self.lowres.set(self.config.factor if low else 0)
        if low:
            x, *rest = state.batch
            state.batch = (downsample_input(x, self.config.factor), *rest)

    def after_forward(self, state) -> None:
        if self.lowres.factor:
            self.downsampled_steps += 1
            full, low = self.flops_per_sample
            self.flops_saved += (full - low) * len(state.batch[1])
        self.lowres.set(0)

    def before_eval(self, state) -> None:
        if self.lowres is not None:
            self.lowres.set(0)  # evaluation always runs at full resolution

    def epoch_metrics(self) -> dict:
        return {"downsample/downsampled_steps": self.downsampled_steps, "downsample/flops_saved": self.flops_saved}

    def metrics(self) -> dict:
        full, low = self.flops_per_sample
        return {**self.epoch_metrics(), "downsample/low_res_flops_ratio": low / full if full else None}

    def state_dict(self) -> dict:
        return {"downsampled_steps": self.downsampled_steps, "flops_saved": self.flops_saved}

    def load_state_dict(self, sd: dict) -> None:
        self.downsampled_steps, self.flops_saved = sd["downsampled_steps"], sd["flops_saved"]


# -- private helpers -------------------------------------------------------------------------
def _check_low_res_size(spatial: tuple[int, ...], factor: int) -> None:
    low = tuple(math.ceil(n / factor) for n in spatial)  # downsample_input pools with ceil_mode
    if min(low, default=MIN_LOW_RES_SIDE) < MIN_LOW_RES_SIDE:
        fits = [f for f in range(2, 9) if math.ceil(min(spatial) / f) >= MIN_LOW_RES_SIDE]
        allowed = f"2..{max(fits)}" if fits else "none (the input is too small to downsample)"
        raise ConfigError(f"downsample: factor={factor} turns {'×'.join(map(str, spatial))} inputs into "
                          f"{'×'.join(map(str, low))}; a low-resolution input must keep at least {MIN_LOW_RES_SIDE} "
                          f"samples per side. Allowed factors for this input: {allowed}")


def _example_input(data) -> torch.Tensor:
    """Two full-resolution samples of the training data."""
    if isinstance(data, TensorData):
        return data.x[:2]
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        return torch.stack([torch.as_tensor(data[i][0]) for i in range(min(2, len(data)))])
    return next(iter(data))[0][:2]


def _probe(model: nn.Module, x: torch.Tensor, lowres: LowRes, factor: int) -> None:
    """Run `x` at full and at low resolution; a failure names the layer that raised."""
    entered: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = [m.register_forward_pre_hook(lambda m, a: entered.append(names[m])) for m in model.modules()
             if not list(m.children())]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = model(x)
            entered.clear()
            try:
                with low_resolution(lowres, factor):
                    low = model(downsample_input(x, factor))
            except (RuntimeError, ValueError) as err:
                layer = entered[-1] if entered else "(input)"
                kind = type(model.get_submodule(layer)).__name__ if entered else ""
                raise ConfigError(f"downsample cannot run this model at 1/{factor} resolution: layer {layer!r} "
                                  f"({kind}) failed: {str(err).splitlines()[0]}. It supports convolutional trunks "
                                  "ending in global pooling or in nn.Flatten") from None
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if low.shape != full.shape:
        raise ConfigError(f"downsample: at 1/{factor} resolution the model's output has shape {tuple(low.shape)} "
                          f"instead of {tuple(full.shape)}; it supports trunks ending in global pooling or nn.Flatten")


def _flops_per_sample(model: nn.Module, x: torch.Tensor, lowres: LowRes, factor: int) -> tuple[float, float]:
    """Forward+backward FLOPs per sample at full and low resolution (as the FLOPs meter counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()  # no BatchNorm statistics are updated by the probe
    counts = []
    try:
        for f in (0, factor):
            with low_resolution(lowres, f), FlopCounterMode(display=False) as counter:
                out = model(downsample_input(x, f) if f else x)
                torch.autograd.grad(out.sum(), params, allow_unused=True)  # leaves .grad untouched
            counts.append(counter.get_total_flops() / len(x))
    finally:
        model.train(was_training)
    return counts[0], counts[1]
