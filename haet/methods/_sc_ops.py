"""Simulation kernels and hardware model for `haet.methods.sc_sgd` (dynamic stochastic computing).

Bit streams. A value x in [-1, 1] is carried by a sign bit and L = ``stream_bits`` magnitude bits,
each bit the output of a comparator ``r_j < |x|`` (a stochastic number generator, SNG). Only the
number of ones reaches the integrators, so the simulation draws that count directly, exactly as
distributed as the bit-level circuit's, with no loop over bits:

- ``lowdiscrepancy`` (progressive precision): the comparator thresholds are a van der Corput
  (bit-reversed counter) sequence, rotated by a fresh random offset each step. For L a power of two
  its first L points form a shifted lattice, so the count of ones is ``floor(|x|·L + u)``, u ~ U[0, 1):
  stochastic rounding of |x|·L. Any prefix of 2^k bits is k-bit precise; error variance ≤ 1/(4L²).
- ``bernoulli`` (conventional stochastic computing): independent random thresholds, the count is
  Binomial(L, |x|); error variance |x|(1 - |x|)/L ≤ 1/(4L).
For L = 1 both are one Bernoulli(|x|) bit: the dynamic stochastic computing of Liu, Gross and Han,
one random bit per value per iteration.

Hardware model (per parameter update; one lane per weight, lanes in parallel). Gate equivalents
(GE, 2-input NAND = 1) from static-CMOS transistor counts / 4 as in Weste & Harris, CMOS VLSI
Design (mirror full adder 28 T, transmission-gate D flip-flop 24 T, AND2 6 T, XOR2 and MUX2 12 T);
these are unit-cell estimates, not synthesis results. Energies from haet's hardware table
(Horowitz, ISSCC 2014, 45 nm): an n-bit add, compare, counter step or LFSR step is charged as a
32-bit add (0.1 pJ) scaled by n/32; multiply-accumulate updaters as 4 FLOPs (two multiply-adds) at
``HardwareTable.pj_per_flop`` of their format. Memory traffic (reading and writing weights and
state) is not counted for any updater.
"""

from __future__ import annotations

import math

import torch

from ..meters.hardware import HardwareTable

ENCODINGS = ("lowdiscrepancy", "bernoulli")
STREAM_BITS = tuple(2 ** k for k in range(17))  # 1 .. 65536: powers of two (lattice property above)
DATAPATH_BITS = 16  # comparator, LFSR and counter width of the stochastic lane; also the fixed-point updater's

GE_PER_CELL = {"full_adder": 28 / 4, "dff": 24 / 4, "and2": 6 / 4, "xor2": 12 / 4, "mux2": 12 / 4}


# -- simulation ---------------------------------------------------------------------------------
def stream_counts(x: torch.Tensor, stream_bits: int, encoding: str = "lowdiscrepancy",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Signed count of ones of the sign-magnitude stream of each x in [-1, 1] (E[count] = x·L)."""
    mag = x.abs()
    if encoding == "lowdiscrepancy":
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        count = torch.floor(mag * stream_bits + u)
    else:
        count = torch.binomial(torch.full_like(mag, stream_bits), mag, generator=generator)
    return count.copysign(x)


def pow2_scale(t: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """The smallest power of two ≥ max|t| (1 where that is 0): the streams' full scale, a shift in hardware.

    ``per_row``: one scale per slice along dim 0 (an output unit or filter) for tensors of 2 or more
    dimensions; a 1-D tensor (a bias) always shares one.
    """
    top = t.abs().amax(dim=tuple(range(1, t.dim())), keepdim=True) if per_row and t.dim() > 1 else t.abs().amax()
    return torch.where(top > 0, torch.exp2(torch.ceil(torch.log2(top))), torch.ones_like(top))


def stochastic_moving_average(ema: torch.Tensor, x: torch.Tensor, momentum: float, stream_bits: int,
                              encoding: str = "lowdiscrepancy", generator: torch.Generator | None = None,
                              per_row: bool = True) -> None:
    """One step of the stochastic integrator with feedback (ADDIE), in place on `ema`.

    The up/down counter holding `ema` counts up on the stream of `x` and down on the stream of its
    own value latched at the start of the step; its least significant bit weighs (1 - momentum)·S/L,
    so E[ema'] = momentum·ema + (1 - momentum)·x exactly.
    """
    scale = torch.maximum(pow2_scale(x, per_row), pow2_scale(ema, per_row))
    up = stream_counts(x / scale, stream_bits, encoding, generator)
    down = stream_counts(ema / scale, stream_bits, encoding, generator)
    ema.add_((up - down) * ((1.0 - momentum) * scale / stream_bits))


def sc_momentum_update(param: torch.Tensor, grad: torch.Tensor, ema: torch.Tensor, *, lr: float, momentum: float,
                       stream_bits: int, encoding: str = "lowdiscrepancy", weight_decay: float = 0.0,
                       per_row: bool = True, generator: torch.Generator | None = None) -> None:
    """One momentum-SGD step of one tensor on the stochastic circuit (in place on `param` and `ema`).

    ``ema`` is the moving average of the gradient; in expectation the step equals
    ``torch.optim.SGD(lr=lr, momentum=momentum)``'s, whose buffer is ema / (1 - momentum).
    """
    with torch.no_grad():
        g = grad if weight_decay == 0 else grad.add(param, alpha=weight_decay)
        stochastic_moving_average(ema, g, momentum, stream_bits, encoding, generator, per_row)
        scale = pow2_scale(ema, per_row)
        steps = stream_counts(ema / scale, stream_bits, encoding, generator)  # weight integrator's input
        param.add_(steps * (-lr / (1.0 - momentum) * scale / stream_bits))


# -- hardware model -----------------------------------------------------------------------------
def _adder(n: int) -> float:
    return n * GE_PER_CELL["full_adder"]


def _array_multiplier(n: int) -> float:
    return n * n * GE_PER_CELL["and2"] + n * (n - 1) * GE_PER_CELL["full_adder"]


def _float32_multiplier() -> float:  # 24-bit mantissa array, exponent add, normalize, round
    return _array_multiplier(24) + _adder(8) + 24 * GE_PER_CELL["mux2"] + _adder(24)


def _float32_adder() -> float:  # align and normalize shifters (5 stages of 24 MUX2), add, round, LZC, exponent
    return 2 * 5 * 24 * GE_PER_CELL["mux2"] + 2 * _adder(24) + _adder(8) + 24 * 2 * GE_PER_CELL["and2"]


def hardware_model(stream_bits: int, table: HardwareTable | None = None, bits: int = DATAPATH_BITS) -> dict:
    """Gates, cycles and energy (pJ, source: model) of one parameter update on each updater."""
    table = table or HardwareTable.default()
    n_op_pj = table.op_energy_pj["int32"][1] * bits / 32  # one n-bit add / compare / count / LFSR step
    comparator, counter = _adder(bits), bits * (GE_PER_CELL["dff"] + GE_PER_CELL["full_adder"])
    lfsr = bits * GE_PER_CELL["dff"] + 3 * GE_PER_CELL["xor2"]
    register = bits * GE_PER_CELL["dff"]
    per_clock_ops = 3 + 3 + 2  # three SNG comparators and their random sources, two counter steps
    return {
        "stochastic": {"gates": 5 * comparator + 3 * lfsr + 2 * counter, "cycles": stream_bits,
                       "energy_pj": (per_clock_ops * stream_bits + 2) * n_op_pj},  # + 2 scale comparisons
        f"fixed{bits}": {"gates": 2 * _array_multiplier(bits) + 2 * _adder(bits) + 2 * register, "cycles": 1,
                         "energy_pj": 4 * table.pj_per_flop(f"int{bits}")},
        "float32": {"gates": 2 * _float32_multiplier() + 2 * _float32_adder() + 2 * 32 * GE_PER_CELL["dff"],
                    "cycles": 1, "energy_pj": 4 * table.pj_per_flop("float32")},
    }


def rms_error_bound(momentum: float, stream_bits: int, encoding: str, scale: float = 1.0) -> float:
    """Upper bound on the RMS gap between the stochastic and the float moving average (any step).

    e_t = m·e_{t-1} + (1-m)·S·(n_up - n_down)/L with zero-mean count noises of variance ≤ v each,
    v = 1/4 (stochastic rounding) or L/4 (binomial): E[e²] ≤ (1-m)²/(1-m²)·S²·2v/L².
    """
    v = 0.25 if encoding == "lowdiscrepancy" else stream_bits / 4
    return scale * math.sqrt((1 - momentum) / (1 + momentum) * 2 * v) / stream_bits
