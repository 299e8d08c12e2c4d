"""Fully quantized fixed-point training (quantization-aware training, QAT).

Paper: A. Bie, B. Venkitesh, J. B. Monteiro, Md. A. Haidar, M. Rezagholizadeh, "Fully quantizing
Transformer-based ASR for edge deployment", HAET workshop at ICLR 2021. Every matmul input, weights and activations, is quantized to 8-bit fixed point
(power-of-two scales) during training with a straight-through estimator, so the trained model runs
in integer arithmetic: 4× smaller than float32 at full-precision quality.

Functional form:
    apply_qat(model, QATConfig(bits_w=8, bits_a=8), filter_fn=None)  # in place: fake-quantized
    int_model = convert(model)           # int8 weights/activations, int32 accumulation, shifts
    export_bytes(int_model)              # its size in bytes

"Fully quantized": Linear and Conv inputs and weights, Embedding tables, both inputs of every
`haet.models.transformer.MatMul` (Q·Kᵀ and probabilities·V) and the inputs of LayerNorm and
BatchNorm are quantized. Gradients are not (the backward pass runs in float32), so the FLOPs
meter's training FLOPs are labelled int<bits> for the forward and float32 for the backward.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from ..core.config import check_choice, check_range
from ..core.errors import ConfigError
from ..core.method import Method
from ..core.surgery import replace_modules
from ._qat_int import module_bytes, to_integer
from ._qat_ops import NOT_HANDLED, QUANTIZED, ActQuant, quantize_module


@dataclass(frozen=True)
class QATConfig:
    bits_w: int = 8      # weight bits (symmetric levels ±(2^(bits−1)−1)); 8 is the paper's, 4 halves the size again
    bits_a: int = 8      # activation bits at every matmul input; 8 is the paper's
    scheme: Literal["fixed_point", "affine"] = "fixed_point"  # power-of-two scales (shifts), or real scales
    per_channel: bool = True  # one weight scale per output channel / embedding row (vs one per tensor)
    momentum: float = 0.9     # activation observers: moving average of min/max, weight of the old value

    def __post_init__(self) -> None:
        check_range("bits_w", self.bits_w, 2, 8, integer=True)
        check_range("bits_a", self.bits_a, 2, 8, integer=True)
        check_choice("scheme", self.scheme, ("fixed_point", "affine"))
        check_choice("per_channel", self.per_channel, (True, False))
        check_range("momentum", self.momentum, 0, 1, hi_open=True)

    @property
    def compute_dtype(self) -> str:
        """The integer width of the forward matmuls: the wider of the two operands."""
        return f"int{max(self.bits_w, self.bits_a)}"


def apply_qat(model: nn.Module, config: QATConfig | None = None, *,
              optimizer: torch.optim.Optimizer | None = None,
              filter_fn: Callable[[str, nn.Module], bool] | None = None) -> list[str]:
    """Make `model` fake-quantized in place; returns the names of the quantized modules.

    `filter_fn(name, module)` may exclude modules (default: every handled one). Parameters are
    shared with the float modules, so an optimizer built before keeps working. Warns when a module
    that multiplies activations is of a type QAT does not handle (nn.MultiheadAttention, ...).
    """
    config = config or QATConfig()
    device = next((t.device for t in model.parameters()), torch.device("cpu"))

    def make(name: str, module: nn.Module) -> nn.Module | None:
        if filter_fn is not None and not filter_fn(name, module):
            return None
        return quantize_module(module, config.bits_w, config.bits_a, config.scheme, config.per_channel,
                               config.momentum, device)

    names = replace_modules(model, optimizer, make, what="qat")
    skipped = [n for n, m in model.named_modules() if isinstance(m, NOT_HANDLED)]
    if skipped:
        warnings.warn(f"qat: these modules are not quantized (type not handled): {', '.join(skipped)}",
                      stacklevel=2)
    return names


def convert(model: nn.Module) -> nn.Module:
    """An integer-arithmetic copy of a fake-quantized (and calibrated) fixed-point model."""
    qmods = [m for m in model.modules() if type(m) in QUANTIZED.values()]
    if not qmods:
        raise ConfigError("convert needs a model prepared with apply_qat")
    if any(m.scheme != "fixed_point" for m in qmods):
        raise ConfigError("convert needs scheme='fixed_point': only power-of-two rescales are exported")
    int_model = copy.deepcopy(model).eval()
    replace_modules(int_model, None, lambda name, m: to_integer(m), what="convert")
    return int_model


def export_bytes(model: nn.Module) -> int:
    """Bytes of a model's stored tensors (parameters and persistent buffers), sub-byte weights packed."""
    return sum(module_bytes(m) for m in model.modules())


class QuantizationAware(Method):
    name = "qat"
    summary = "fully quantized fixed-point training: every matmul input in 8 bits, integer export"
    paper = ("Bie, Venkitesh, Monteiro, Haidar, Rezagholizadeh: Fully quantizing Transformer-based ASR "
             "for edge deployment (HAET @ ICLR 2021)")
    config_class = QATConfig
    owns = frozenset({"weight_format", "layer_types"})

    def __init__(self, config: QATConfig | None = None, /, **params) -> None:
        super().__init__(config, **params)
        self.quantized: list[str] = []
        self.export: dict = {}

    def fit_start(self, state) -> None:
        # Each quantized layer declares its arithmetic (`flop_dtype`); the FLOPs meter labels the
        # FLOPs of the layers that actually ran, so nothing is relabelled here.
        self.quantized = apply_qat(state.unwrapped_model, self.config, optimizer=state.optimizer)
        if not self.quantized:
            raise ConfigError(f"qat: {type(state.unwrapped_model).__name__} has no layer qat quantizes (Linear, Conv, "
                              "Embedding, MatMul, LayerNorm, BatchNorm); qat would change nothing")
        state.model_version += 1

    def fit_end(self, state) -> None:
        model = state.unwrapped_model
        observed = all(bool(m.observed) for m in model.modules() if isinstance(m, ActQuant))
        if self.config.scheme == "fixed_point" and self.quantized and observed:
            self.export = {"export_bytes": export_bytes(convert(model)),
                           "float_bytes": _float_bytes(model)}

    def metrics(self) -> dict:
        out = {"qat/quantized_modules": len(self.quantized)}
        if self.export:
            out.update({f"qat/{k}": v for k, v in self.export.items()})
            out["qat/compression"] = self.export["float_bytes"] / self.export["export_bytes"]
        return out


def _float_bytes(model: nn.Module) -> int:
    """Size reference: the model's parameters and persistent buffers in float32, quantizers excluded."""
    total = 0
    for m in model.modules():
        if isinstance(m, ActQuant):
            continue
        own = list(m.parameters(recurse=False)) + [
            b for n, b in m.named_buffers(recurse=False) if n not in m._non_persistent_buffers_set]
        total += sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in own)
    return total
