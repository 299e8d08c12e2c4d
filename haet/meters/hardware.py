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
import math
import os
import re
import tomllib
import warnings
from dataclasses import dataclass, field

from ..core.errors import ConfigError

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
        (``int8 = [0.2, 0.1]``) and key ``dram_pj_per_byte``. Any problem is a ConfigError naming
        the file (a NaN or negative number would silently disable an energy budget)."""
        from ..core import files

        raw = files.read_bytes(path, 2**20, follow=True, what="hardware table")
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"hardware table {path} is not valid TOML: {err}") from None
        return cls().override(data, source=f"{path}")

    def override(self, data: dict, source: str = "user override") -> "HardwareTable":
        """This table with entries replaced by `data`'s; each checked (`check_overrides`)."""
        check_overrides(data, source)
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


_DTYPE_NAME = re.compile(r"float\d+|bfloat16|tf32|int\d+")


def check_overrides(data, source: str = "user override") -> None:
    """Refuse (ConfigError naming `source`) unknown keys, wrong shapes, and numbers that are not
    finite and positive."""
    def bad(what: str):
        return ConfigError(f"hardware table {source}: {what}")

    def number(v, where: str, allow_zero: bool = False) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v < 0 or (v == 0 and not allow_zero):
            raise bad(f"{where} must be a finite {'non-negative' if allow_zero else 'positive'} number, got {v!r}")

    if not isinstance(data, dict):
        raise bad("expected a table")
    unknown = set(data) - {"peak_flops", "op_energy_pj", "dram_pj_per_byte"}
    if unknown:
        raise ConfigError(f"unknown hardware table keys {sorted(unknown)} in {source}; allowed: peak_flops, "
                          "op_energy_pj, dram_pj_per_byte")
    peak = data.get("peak_flops", {})
    if not isinstance(peak, dict):
        raise bad("peak_flops must be a table of devices")
    for device, by_dtype in peak.items():
        if not isinstance(by_dtype, dict) or not by_dtype:
            raise bad(f"peak_flops.{device} must be a table of dtype = FLOP/s")
        for dtype, v in by_dtype.items():
            if not _DTYPE_NAME.fullmatch(dtype):
                raise bad(f"peak_flops.{device}: unknown dtype {dtype!r} (float32, tf32, bfloat16, float16, int8, ...)")
            number(v, f"peak_flops.{device}.{dtype}")
    ops = data.get("op_energy_pj", {})
    if not isinstance(ops, dict):
        raise bad("op_energy_pj must be a table of dtype = [multiply pJ, add pJ]")
    for dtype, pair in ops.items():
        if not _DTYPE_NAME.fullmatch(dtype):
            raise bad(f"op_energy_pj: unknown dtype {dtype!r} (float32, bfloat16, float16, int8, ...)")
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise bad(f"op_energy_pj.{dtype} must be [multiply pJ, add pJ]")
        for v in pair:
            number(v, f"op_energy_pj.{dtype}", allow_zero=True)
        if sum(pair) <= 0:
            raise bad(f"op_energy_pj.{dtype} must not be all zero")
    if "dram_pj_per_byte" in data:
        number(data["dram_pj_per_byte"], "dram_pj_per_byte")


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
