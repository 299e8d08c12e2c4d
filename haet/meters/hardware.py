"""The hardware table: peak FLOP/s by device and dtype, energy per operation, energy per byte.

Every hardware number haet uses lives here, with its source. Override any entry with
``HardwareTable.default().override({...})``, a TOML file (``HardwareTable.from_toml(path)``), or
the ``HAET_HARDWARE`` environment variable naming such a file. Devices not in the table get a
warning and no MFU.

Energy per operation: Horowitz, "Computing's energy problem (and what we can do about it)",
ISSCC 2014, 45 nm at 0.9 V. A FLOP as counted by ``torch.utils.flop_counter`` is one multiply
*or* one add (a multiply-accumulate is 2 FLOPs), so the energy of one counted FLOP is
(multiply + add) / 2 at that number format. Integer formats accumulate in int32 (add 0.1 pJ).
Formats Horowitz does not list are marked "extrapolated" (integer multiplier energy scaled with
bit-width squared, as array multipliers scale in area).

Bytes moved: DRAM, 640 pJ per 32-bit access (Horowitz) = 160 pJ/byte.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import warnings
from dataclasses import dataclass, field

# Peak dense FLOP/s from vendor data sheets. Keys are substrings of the device name; dtypes are
# torch dtype names. "tf32" is float32 matmul on tensor cores (torch.backends.cuda.matmul.allow_tf32).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"float32": 66.9e12, "tf32": 494.7e12, "bfloat16": 989.4e12, "float16": 989.4e12, "int8": 1978.9e12},
    "H100": {"float32": 66.9e12, "tf32": 494.7e12, "bfloat16": 989.4e12, "float16": 989.4e12, "int8": 1978.9e12},
    "A100": {"float32": 19.5e12, "tf32": 156e12, "bfloat16": 312e12, "float16": 312e12, "int8": 624e12},
    "L4": {"float32": 30.3e12, "tf32": 60e12, "bfloat16": 121e12, "float16": 121e12, "int8": 242e12},
    "V100": {"float32": 15.7e12, "float16": 125e12},
    "T4": {"float32": 8.1e12, "float16": 65e12, "int8": 130e12},
}

# (multiply pJ, add pJ) per operation at 45 nm; see the module docstring.
OP_ENERGY_PJ: dict[str, tuple[float, float]] = {
    "float32": (3.7, 0.9),
    "float16": (1.1, 0.4),
    "bfloat16": (1.1, 0.4),   # not in Horowitz: taken equal to float16
    "int32": (3.1, 0.1),
    "int8": (0.2, 0.1),       # 8-bit multiply, 32-bit accumulate
}


def _int_bits_energy(bits: int) -> tuple[float, float]:
    """Extrapolated: multiplier energy scaled from int8 with bits², int32 accumulation."""
    return (0.2 * (bits / 8) ** 2, 0.1)


@dataclass(frozen=True)
class HardwareTable:
    peak_flops: dict[str, dict[str, float]] = field(default_factory=lambda: dict(PEAK_FLOPS))
    op_energy_pj: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(OP_ENERGY_PJ))
    dram_pj_per_byte: float = 160.0
    source: str = "Horowitz ISSCC 2014 (45 nm); vendor data sheets for peak FLOP/s"

    @classmethod
    def default(cls) -> "HardwareTable":
        path = os.environ.get("HAET_HARDWARE")
        return cls.from_toml(path) if path else cls()

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> "HardwareTable":
        """Read overrides from TOML: tables ``[peak_flops."My GPU"]``, ``[op_energy_pj]``
        (``int8 = [0.2, 0.1]``) and key ``dram_pj_per_byte``."""
        with open(path, "rb") as f:
            data = tomllib.load(f)
        return cls().override(data, source=f"{path}")

    def override(self, data: dict, source: str = "user override") -> "HardwareTable":
        unknown = set(data) - {"peak_flops", "op_energy_pj", "dram_pj_per_byte"}
        if unknown:
            raise ValueError(f"unknown hardware table keys {sorted(unknown)}; allowed: peak_flops, op_energy_pj, dram_pj_per_byte")
        peak = {**self.peak_flops, **{k: dict(v) for k, v in data.get("peak_flops", {}).items()}}
        ops = {**self.op_energy_pj, **{k: tuple(v) for k, v in data.get("op_energy_pj", {}).items()}}
        return dataclasses.replace(self, peak_flops=peak, op_energy_pj=ops,
                                   dram_pj_per_byte=float(data.get("dram_pj_per_byte", self.dram_pj_per_byte)),
                                   source=f"{self.source}; overridden by {source}")

    # -- look-ups ----------------------------------------------------------------------------
    def pj_per_flop(self, dtype: str) -> float:
        """Energy of one counted FLOP (half a multiply-accumulate) in this number format."""
        if dtype in self.op_energy_pj:
            mul, add = self.op_energy_pj[dtype]
        elif m := re.fullmatch(r"int(\d+)", dtype):
            mul, add = _int_bits_energy(int(m.group(1)))
        else:
            warnings.warn(f"no energy per op for dtype {dtype!r}; using float32's", stacklevel=2)
            mul, add = self.op_energy_pj["float32"]
        return (mul + add) / 2

    def peak_flops_for(self, device_name: str, dtype: str = "float32") -> tuple[float | None, str]:
        """Peak FLOP/s of the named device and where the figure comes from (None if unknown)."""
        for key, by_dtype in self.peak_flops.items():
            if key.lower() in device_name.lower():
                if dtype in by_dtype:
                    return by_dtype[dtype], f"table:{key}"
        return None, "unknown"


def cpu_peak_flops(threads: int) -> tuple[float | None, str]:
    """Estimated float32 peak of `threads` CPU cores: cores × clock × FLOP/cycle from the ISA flags.

    FLOP/cycle per core: 32 with AVX2+FMA or AVX-512 (two 8-wide FMA pipes; AVX-512 parts often
    do not sustain more), 16 with AVX, 8 otherwise. An estimate, labelled so in the record.
    """
    mhz, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz") and mhz is None:
                    mhz = float(line.split(":", 1)[1])
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        return None, "unknown"
    if not mhz:
        return None, "unknown"
    per_cycle = 32 if ({"avx2", "fma"} <= flags or "avx512f" in flags) else 16 if "avx" in flags else 8
    return threads * mhz * 1e6 * per_cycle, f"estimate:{threads} cores x {mhz:.0f} MHz x {per_cycle} FLOP/cycle"
