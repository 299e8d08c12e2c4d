"""FLOPs meter: training FLOPs counted by ``torch.utils.flop_counter``, and MFU.

A step is counted (forward + backward, the methods' work between them included) the first time
its signature appears (`step_signature`: input shapes, model version, arithmetic); every later
step with that signature adds the same count. The counter sees matrix products and convolutions
(the ops that dominate training); elementwise work and the optimizer update are not counted.
Work a method does outside the step (a selection pass, say) is added with
``state.meters["flops"].add(flops, dtype)``.

MFU = FLOPs / (train seconds × peak FLOP/s), the peak from the hardware table (GPUs) or estimated
from the CPU's clock and instruction set; an unknown device gets a warning and no MFU.
"""

from __future__ import annotations

import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

from .base import Meter, step_signature
from .hardware import HardwareTable, cpu_peak_flops


class FlopsMeter(Meter):
    name = "flops"

    def __init__(self, table: HardwareTable | None = None) -> None:
        self.table = table or HardwareTable.default()
        self.total = 0.0
        self.by_dtype: dict[str, float] = {}
        self.per_step: dict[tuple, float] = {}
        self.measured_steps = 0
        self._counter: FlopCounterMode | None = None
        self._sig = None

    def add(self, flops: float, dtype: str = "float32") -> None:
        """Count FLOPs done outside the measured training step (e.g. a method's selection pass)."""
        self.total += flops
        self.by_dtype[dtype] = self.by_dtype.get(dtype, 0.0) + flops

    def batch_start(self, state) -> None:
        self._sig = sig = step_signature(state)
        if sig not in self.per_step:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def after_backward(self, state) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.per_step[self._sig] = float(self._counter.get_total_flops())
            self.measured_steps += 1
            self._counter = None

    def after_step(self, state) -> None:
        self.add(self.per_step[self._sig], state.compute_dtype)

    def before_eval(self, state) -> None:
        # A step that never reached backward (a non-finite loss) leaves the counter open: close it
        # without counting, so evaluation is neither counted nor slowed.
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None

    def peak_flops(self, state) -> tuple[float | None, str]:
        if state.device.type == "cuda":
            name = torch.cuda.get_device_name(state.device)
            dtype = "tf32" if (state.compute_dtype == "float32" and torch.backends.cuda.matmul.allow_tf32) \
                else state.compute_dtype
            peak, source = self.table.peak_flops_for(name, dtype)
            if peak is None:
                warnings.warn(f"GPU {name!r} ({dtype}) is not in the hardware table: no MFU. "
                              "Add it with HAET_HARDWARE=table.toml", stacklevel=2)
            return peak, source
        return cpu_peak_flops(torch.get_num_threads())

    def report(self, state) -> dict:
        peak, source = self.peak_flops(state)
        train_s = state.clock.train_s
        mfu = self.total / (train_s * peak) if peak and train_s > 0 else None
        return {"flops": self.total, "flops_by_dtype": dict(self.by_dtype), "mfu": mfu,
                "peak_flops": peak, "peak_flops_source": source}

    def state_dict(self) -> dict:
        return {"total": self.total, "by_dtype": dict(self.by_dtype)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.total = state_dict["total"]
        self.by_dtype = dict(state_dict["by_dtype"])
