"""A parameterized model of an FPGA/ASIC-like accelerator: cycles, latency, DRAM traffic and energy
of a network at a bit-width q, per inference and per training step.

It is a *model*, not a measurement; every figure it produces is labelled ``model:<preset>``.

The machine. ``pes`` processing engines, each with ``mults_per_pe`` multipliers of
``native_bits`` bits; narrower operands pack several products into one multiplier (a DSP48
slice computes one 18×25 product, two 8-bit ones or four 4-bit ones: ``packing(q) =
max(1, native_bits // q)``, capped at 4), wider ones take several (``ceil(q / native_bits)``
multipliers per product). An on-chip buffer of ``buffer_bytes``, half for weights and half for
activations; DRAM with ``dram_bytes_per_cycle`` of bandwidth.

A layer (Linear or Conv, batch 1, weights and activations at q bits) with M multiply-accumulates,
W weight bytes, I input and O output activation bytes:

- compute cycles = ceil(M / (pes · mults_per_pe · packing(q)));
- loop tiling: the input is split into T = ceil(I / (buffer/2)) tiles; weights stream from DRAM
  once per tile (W·T bytes: reuse is lost when the input does not fit); activations stay on chip
  between layers when I and O both fit in half the buffer, else the layer reads I and writes O;
- DRAM cycles = DRAM bytes / dram_bytes_per_cycle; the layer takes max(compute, DRAM) cycles
  (a roofline: transfers overlap compute);
- buffer traffic: each operand byte fetched from the buffer is broadcast to a PE's multipliers,
  so the buffer supplies 2·M·q/8 / mults_per_pe bytes (weights and activations), plus the O bytes
  written back;
- energy = M · (multiply + add energy at q bits) + buffer bytes · buffer_pj_per_byte + DRAM bytes
  · dram_pj_per_byte. Operation energies come from the core's hardware table
  (`haet.meters.hardware.HardwareTable`, Horowitz ISSCC 2014 at 45 nm), the one source of truth:
  an FPGA's DSP slices spend more per operation than a 45 nm ASIC multiplier, so absolute joules
  are low for an FPGA; the model ranks (q, s) choices, which is what the search needs.

A training step is modelled as three passes of the same products (forward, gradient of the
inputs, gradient of the weights) with twice the inference's DRAM traffic, the weights read and
written once more for the update, and the forward's activations written to DRAM and read back
when they do not fit in half the buffer.

Assumptions it does not model: control and static power, pipeline bubbles between layers,
non-linearities and pooling (a few percent of the work), batch > 1.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import ConfigError, choices_error
from ..meters.hardware import HardwareTable


@dataclass(frozen=True)
class Accelerator:
    name: str
    pes: int                      # processing engines
    mults_per_pe: int             # multipliers per engine, each native_bits wide
    native_bits: int              # width of one multiplier (a DSP48E1: 18×25, counted as 16)
    clock_hz: float
    buffer_bytes: int             # on-chip buffer (BRAM / SRAM)
    buffer_pj_per_byte: float     # energy of one byte read from or written to the buffer
    dram_pj_per_byte: float
    dram_bytes_per_cycle: float   # DRAM bandwidth per clock cycle
    source: str = ""              # where the numbers come from

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("name", "source"):
                if not isinstance(v, str):
                    raise ConfigError(f"accelerator {f.name} must be a string, got {v!r}")
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"accelerator {f.name} must be a finite positive number, got {v!r}")

    # -- the machine ----------------------------------------------------------------------------
    def products_per_cycle(self, bits: int) -> float:
        """Multiply-accumulates the whole array completes per cycle at `bits`-bit operands."""
        if bits <= self.native_bits:
            per_mult = min(4, max(1, self.native_bits // bits))
        else:
            per_mult = 1 / math.ceil(bits / self.native_bits)
        return self.pes * self.mults_per_pe * per_mult

    def mac_pj(self, bits: int, table: HardwareTable | None = None) -> float:
        """Energy of one multiply-accumulate at `bits` bits (multiply + add, from the hardware table)."""
        table = table or HardwareTable.default()
        dtype = "float32" if bits >= 32 else f"int{bits}"
        return 2 * table.pj_per_flop(dtype)  # the table's FLOP is half a multiply-accumulate

    # -- one layer, one inference ------------------------------------------------------------------
    def layer_cost(self, macs: int, weights: int, inputs: int, outputs: int, bits: int,
                   table: HardwareTable | None = None) -> dict:
        """Cycles, DRAM and buffer bytes and energy (J) of one layer at batch 1 (see the module docstring)."""
        byte = bits / 8
        w_bytes, i_bytes, o_bytes = weights * byte, inputs * byte, outputs * byte
        half = self.buffer_bytes / 2
        tiles = max(1, math.ceil(i_bytes / half))
        on_chip = i_bytes <= half and o_bytes <= half
        dram = w_bytes * tiles + (0.0 if on_chip else i_bytes + o_bytes)
        compute_cycles = math.ceil(macs / self.products_per_cycle(bits))
        dram_cycles = math.ceil(dram / self.dram_bytes_per_cycle)
        buffer = 2 * macs * byte / self.mults_per_pe + o_bytes
        energy_pj = macs * self.mac_pj(bits, table) + buffer * self.buffer_pj_per_byte + dram * self.dram_pj_per_byte
        return {"cycles": max(compute_cycles, dram_cycles), "compute_cycles": compute_cycles,
                "dram_cycles": dram_cycles, "dram_bytes": dram, "buffer_bytes": buffer, "tiles": tiles,
                "energy_j": energy_pj * 1e-12}

    # -- a whole model ---------------------------------------------------------------------------
    def estimate(self, model: nn.Module, input_shape: tuple[int, ...], bits: int,
                 table: HardwareTable | None = None) -> dict:
        """Per inference and per training step at batch 1: latency, cycles, DRAM bytes, energy."""
        layers = layer_shapes(model, input_shape)
        if not layers:
            raise ConfigError(f"the accelerator model found no Linear or Conv layer in {type(model).__name__}")
        return self.estimate_layers(layers, bits, table)

    def estimate_layers(self, layers: list[tuple[int, int, int, int]], bits: int,
                        table: HardwareTable | None = None) -> dict:
        """`estimate` from the (MACs, weights, inputs, outputs) of each layer (`layer_shapes`)."""
        table = table or HardwareTable.default()  # resolved once, not per layer
        costs = [self.layer_cost(*shape, bits=bits, table=table) for shape in layers]
        cycles = sum(c["cycles"] for c in costs)
        dram = sum(c["dram_bytes"] for c in costs)
        energy = sum(c["energy_j"] for c in costs)
        weight_bytes = sum(w for _, w, _, _ in layers) * bits / 8
        kept = sum(o for *_, o in layers) * bits / 8  # forward activations the backward needs
        compute_j = sum(m for m, *_ in layers) * self.mac_pj(bits, table) * 1e-12
        buffer_j = sum(c["buffer_bytes"] for c in costs) * self.buffer_pj_per_byte * 1e-12
        # Training: forward + two backward passes of the same products; the update reads and writes
        # the weights; activations kept for backward go to DRAM and back when they do not fit.
        train_dram = 2 * dram + 2 * weight_bytes + (0.0 if kept <= self.buffer_bytes / 2 else 2 * kept)
        train_j = 3 * (compute_j + buffer_j) + train_dram * self.dram_pj_per_byte * 1e-12
        return {"accel/energy_per_inference_j": energy, "accel/latency_s": cycles / self.clock_hz,
                "accel/cycles": cycles, "accel/dram_bytes": dram,
                "accel/energy_per_training_step_j": train_j, "accel/bits": bits,
                "accel/source": f"model:{self.name}"}

    def override(self, data: dict) -> "Accelerator":
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown accelerator keys {unknown}; allowed: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **data)


def layer_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    """(MACs, weights, input elements, output elements) of each Linear and Conv layer at batch 1,
    in execution order, from one forward pass with hooks."""
    shapes: list[tuple[int, int, int, int]] = []

    def hook(module, inputs, output):
        x = inputs[0]
        weights = module.weight.numel()
        if isinstance(module, nn.Linear):
            macs = weights * (x.numel() // x.shape[-1])
        else:
            per_output = weights // module.out_channels
            macs = output.numel() * per_output
        shapes.append((int(macs), int(weights), int(x.numel()), int(output.numel())))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return shapes


#: Presets. ZedBoard: Xilinx Zynq-7020 (DS190: 220 DSP48E1 slices, 140 36-Kb BRAM blocks = 4.9 Mb,
#: of which 560 KB taken as the buffer), a 100 MHz accelerator clock (a common HLS target on this part),
#: DDR3-1066 on a 32-bit bus = 4.26 GB/s = 42.6 B per 100-MHz cycle. Buffer energy: Horowitz ISSCC 2014,
#: 1 MB SRAM, 100 pJ per 64-bit access = 12.5 pJ/B; DRAM 160 pJ/B as the core table.
#: small-asic: a 16×16 array of 8-bit multipliers at 500 MHz with 128 KB of SRAM (Horowitz: 32 KB
#: 20 pJ and 1 MB 100 pJ per 64-bit access; 128 KB interpolated at 5 pJ/B), LPDDR4 12.8 GB/s.
PRESETS: dict[str, Accelerator] = {
    "zedboard": Accelerator("zedboard", pes=220, mults_per_pe=1, native_bits=16, clock_hz=100e6,
                            buffer_bytes=560 * 1024, buffer_pj_per_byte=12.5, dram_pj_per_byte=160.0,
                            dram_bytes_per_cycle=42.6,
                            source="Xilinx DS190 (Zynq-7020); Horowitz ISSCC 2014 energies"),
    "small-asic": Accelerator("small-asic", pes=256, mults_per_pe=1, native_bits=8, clock_hz=500e6,
                              buffer_bytes=128 * 1024, buffer_pj_per_byte=5.0, dram_pj_per_byte=160.0,
                              dram_bytes_per_cycle=25.6, source="a 16x16 systolic array; Horowitz ISSCC 2014"),
}


def get_accelerator(spec: str) -> Accelerator:
    """A preset by name, or a TOML file: ``preset = "zedboard"`` plus any fields to override."""
    if spec in PRESETS:
        return PRESETS[spec]
    if spec.endswith(".toml"):
        try:
            with open(spec, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"cannot read accelerator file {spec}: {err}") from None
        base = data.pop("preset", "zedboard")
        if base not in PRESETS:
            raise choices_error("accelerator preset", base, PRESETS)
        return PRESETS[base].override({"name": f"{base}+{spec}", **data})
    raise choices_error("accelerator", spec, list(PRESETS) + ["FILE.toml"])
