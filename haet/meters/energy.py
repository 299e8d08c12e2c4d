"""Energy meter: measured where the hardware allows it, else modelled, and always labelled.

Sources, in order of preference:
- ``nvml``: the GPU's cumulative energy counter (``nvmlDeviceGetTotalEnergyConsumption``, Volta
  and newer; package ``nvidia-ml-py``, extra ``haet[gpu]``). The whole board, this process or not.
- ``rapl``: Intel/AMD RAPL package counters in ``/sys/class/powercap`` where readable. The whole
  CPU package (all processes), DRAM domain not included.
- ``model``: FLOPs by number format × energy per FLOP + bytes moved × energy per byte, from the
  hardware table (`haet.meters.hardware`). It counts arithmetic and DRAM traffic at 45 nm and
  nothing else (no idle or static power, caches, control): use it to compare methods, not to
  read a power bill. It needs the FLOPs and memory meters.

Only training is metered (evaluation is excluded). The modelled figure is reported alongside a
measured one (``energy_model_j``) so runs on different machines stay comparable.
"""

from __future__ import annotations

import glob
import os
import warnings

from .base import Meter
from .hardware import HardwareTable


class EnergyMeter(Meter):
    name = "energy"
    provides = ("energy_j",)

    def __init__(self, table: HardwareTable | None = None, source: str = "auto") -> None:
        if source not in ("auto", "nvml", "rapl", "model"):
            raise ValueError(f"energy source must be one of auto, nvml, rapl, model; got {source!r}")
        self.table = table or HardwareTable.default()
        self.requested = source
        self.source = "model"
        self._counter = None        # callable -> joules since an arbitrary origin (measured sources)
        self._measured_j = 0.0      # training energy of finished segments
        self._segment_start = None  # counter value when the current training segment started
        self._state = None

    # -- sources ------------------------------------------------------------------------------
    def fit_start(self, state) -> None:
        self._state = state
        self.source, self._counter = self._pick_source(state)
        self._segment_start = None

    def _pick_source(self, state):
        want = self.requested
        if want in ("auto", "nvml") and state.device.type == "cuda":
            counter = _nvml_counter(state.device.index or 0)
            if counter is not None:
                return "nvml", counter
        if want in ("auto", "rapl"):
            counter = _rapl_counter()
            if counter is not None:
                return "rapl", counter
        if want not in ("auto", "model"):
            warnings.warn(f"energy source {want!r} is not available here; using the model", stacklevel=3)
        if "flops" not in state.meters or "memory" not in state.meters:
            raise ValueError("the energy model needs the flops and memory meters")
        return "model", None

    # -- training segments (evaluation excluded) ----------------------------------------------
    def epoch_start(self, state) -> None:
        if self._counter is not None and self._segment_start is None:
            self._segment_start = self._counter()

    def before_eval(self, state) -> None:
        if self._counter is not None and self._segment_start is not None:
            self._measured_j += self._counter() - self._segment_start
            self._segment_start = None

    def after_eval(self, state) -> None:
        if state.batch is not None:  # an evaluation between steps (eval_every): training goes on
            self.epoch_start(state)

    def fit_end(self, state) -> None:
        self.before_eval(state)

    # -- readings -----------------------------------------------------------------------------
    def model_joules(self, state=None) -> dict:
        """The modelled training energy so far, split into compute and memory (joules)."""
        state = state or self._state
        flops = state.meters["flops"].total_by_dtype(state)
        moved = state.meters["memory"].total_bytes_moved(state)
        compute = sum(n * self.table.pj_per_flop(dtype) for dtype, n in flops.items()) * 1e-12
        memory = moved * self.table.dram_pj_per_byte * 1e-12
        return {"compute": compute, "memory": memory}

    def joules(self, state=None) -> float:
        """Training energy so far, from this meter's source."""
        if self._counter is None:
            return sum(self.model_joules(state).values())
        running = self._counter() - self._segment_start if self._segment_start is not None else 0.0
        return self._measured_j + running

    def readings(self, state) -> dict[str, float]:
        return {"energy_j": self.joules(state)}

    def report(self, state) -> dict:
        out = {"energy_j": self.joules(state), "energy_source": self.source}
        if "flops" in state.meters and "memory" in state.meters:
            split = self.model_joules(state)
            out["energy_model_j"] = sum(split.values())
            out["energy_model_split_j"] = split
        return out

    def state_dict(self) -> dict:
        return {"measured_j": self.joules() if self._counter is not None else 0.0}

    def load_state_dict(self, state_dict: dict) -> None:
        self._measured_j = state_dict["measured_j"]


def _nvml_counter(index: int):
    try:
        import pynvml
    except ImportError:
        warnings.warn("NVML energy needs the nvidia-ml-py package (pip install 'haet[gpu]'); "
                      "using the energy model", stacklevel=4)
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except Exception as err:  # NVMLError: not supported on this GPU, no driver, ...
        warnings.warn(f"NVML energy counter not available ({err}); using the energy model", stacklevel=4)
        return None
    return lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0  # mJ -> J


RAPL_ROOT = "/sys/class/powercap"


def _rapl_counter(root: str | None = None):
    """Sum of the RAPL package domains under `root` (default RAPL_ROOT), in joules, handling
    counter wrap-around."""
    domains = []
    for path in sorted(glob.glob(os.path.join(root or RAPL_ROOT, "intel-rapl:*"))):
        name_file, energy_file = os.path.join(path, "name"), os.path.join(path, "energy_uj")
        try:
            with open(name_file) as f:
                if not f.read().startswith("package"):
                    continue
            with open(energy_file) as f:
                int(f.read())
            with open(os.path.join(path, "max_energy_range_uj")) as f:
                wrap = int(f.read())
        except (OSError, ValueError):
            continue
        domains.append((energy_file, wrap))
    if not domains:
        return None
    last: list[int | None] = [None] * len(domains)
    total = [0.0] * len(domains)

    def read() -> float:
        for i, (energy_file, wrap) in enumerate(domains):
            with open(energy_file) as f:
                now = int(f.read())
            if last[i] is not None:
                total[i] += (now - last[i]) % wrap
            last[i] = now
        return sum(total) * 1e-6

    read()
    return read
