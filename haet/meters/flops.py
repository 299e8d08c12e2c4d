"""FLOPs meter: training FLOPs counted by ``torch.utils.flop_counter``, and MFU.

A step is counted (forward + backward, the methods' work between them included; with gradient
accumulation, each micro-batch) the first time its signature appears (`step_signature`: input shapes, model version, arithmetic); every later
step with that signature adds the same count. The counter sees matrix products and convolutions
(the ops that dominate training); elementwise work and the optimizer update are not counted.
A product with a sparse operand counts its nonzeros (2·nnz·N multiply-adds; nnz·N for a
max/mean sparse reduction and for its backward), not the dense shape the counter would assume;
gathers and scatters (message passing over ``edge_index``) are not counted.
Work a method does outside the step (a selection pass, say) is charged by the method to the
state's cost ledger (``state.charge(flops=..., dtype=...)``); this meter reads the ledger and
adds it to what it counted, never the other way round.

Number formats are per layer and per phase, from the layers that actually ran: a layer that runs
its matmuls in another format declares it with an attribute ``flop_dtype`` (a string, or
``{"forward": "int8", "backward": "float32"}``); the FLOPs inside the outermost such layers are
labelled with it, all others with the Trainer's ``state.compute_dtype`` (float32, or the autocast
format). No method relabels FLOPs.

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
    provides = ("flops",)

    def __init__(self, table: HardwareTable | None = None) -> None:
        self.table = table or HardwareTable.default()
        self.total = 0.0
        self.by_dtype: dict[str, float] = {}
        self.per_step: dict[tuple, dict[str, float]] = {}  # step signature -> FLOPs by number format
        self._forward_counts: dict[str, float] = {}
        self.measured_steps = 0
        self._counter: FlopCounterMode | None = None
        self._sig = None

    def _count(self, flops: float, dtype: str) -> None:
        self.total += flops
        self.by_dtype[dtype] = self.by_dtype.get(dtype, 0.0) + flops

    def total_flops(self, state) -> float:
        """Counted training FLOPs plus the work methods charged to the ledger."""
        return self.total + state.ledger.flops

    def total_by_dtype(self, state) -> dict[str, float]:
        out = dict(self.by_dtype)
        for dtype, n in state.ledger.flops_by_dtype.items():
            out[dtype] = out.get(dtype, 0.0) + n
        return out

    def readings(self, state) -> dict[str, float]:
        return {"flops": self.total_flops(state)}

    def batch_start(self, state) -> None:
        self._sig = sig = step_signature(state)
        if sig not in self.per_step:
            self._counter = FlopCounterMode(display=False, custom_mapping=SPARSE_AWARE)
            self._counter.__enter__()

    def after_forward(self, state) -> None:
        if self._counter is not None:
            self._forward_counts = _module_totals(self._counter)

    def after_backward(self, state) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            total = _module_totals(self._counter)
            backward = {k: v - self._forward_counts.get(k, 0.0) for k, v in total.items()}
            self.per_step[self._sig] = label_flops(state.unwrapped_model, self._forward_counts, backward,
                                                   state.compute_dtype)
            self.measured_steps += 1
            self._counter = None
        # Counted per micro-batch: with gradient accumulation an optimizer step is several of them.
        for dtype, n in self.per_step[self._sig].items():
            self._count(n, dtype)

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
        total = self.total_flops(state)
        mfu = total / (train_s * peak) if peak and train_s > 0 else None
        return {"flops": total, "flops_by_dtype": self.total_by_dtype(state), "mfu": mfu,
                "peak_flops": peak, "peak_flops_source": source,
                "flops_charged_by_methods": dict(state.ledger.flops_by_what)}

    def state_dict(self) -> dict:
        return {"total": self.total, "by_dtype": dict(self.by_dtype)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.total = state_dict["total"]
        self.by_dtype = dict(state_dict["by_dtype"])


def _sparse_mm_flop(a, b, *args, out_val=None, **kwargs) -> int:
    """aten.mm: with a sparse operand, 2·nnz·N multiply-adds (the counter's default is the dense
    2·M·K·N, which overcounts a graph adjacency by V / degree)."""
    if a.layout != torch.strided:
        return 2 * a._nnz() * b.shape[-1]
    if b.layout != torch.strided:
        return 2 * b._nnz() * a.shape[0]
    return 2 * a.shape[0] * a.shape[1] * b.shape[1]


def _sparse_addmm_flop(bias, a, b, *args, out_val=None, **kwargs) -> int:
    """aten._sparse_addmm / aten.addmm (bias + a @ b): the product's multiply-adds, as for mm."""
    return _sparse_mm_flop(a, b)


def _sparse_reduce_flop(a, b, *args, out_val=None, **kwargs) -> int:
    """aten._sparse_mm_reduce_impl(_backward): one operation per nonzero per output column."""
    return a._nnz() * b.shape[-1]


_sparse_mm_flop._get_raw = True
_sparse_reduce_flop._get_raw = True
_sparse_addmm_flop._get_raw = True
aten = torch.ops.aten
SPARSE_AWARE = {aten.mm: _sparse_mm_flop, aten.addmm: _sparse_addmm_flop, aten._sparse_addmm: _sparse_addmm_flop,
                aten._sparse_mm_reduce_impl: _sparse_reduce_flop,
                aten._sparse_mm_reduce_impl_backward: _sparse_reduce_flop}


def _module_totals(counter: FlopCounterMode) -> dict[str, float]:
    """FLOPs so far per module name of the counter (``Global`` = all), summed over ops."""
    return {name: float(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}


def labelled_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The outermost modules that declare ``flop_dtype``, by the FLOP counter's module names
    (the root's class name, then attribute paths: ``Sequential.0``)."""
    out: dict[str, torch.nn.Module] = {}

    def walk(module: torch.nn.Module, name: str) -> None:
        if getattr(module, "flop_dtype", None) is not None:
            out[name] = module
            return
        for child_name, child in module.named_children():
            walk(child, f"{name}.{child_name}")

    walk(model, type(model).__name__)
    return out


def label_flops(model: torch.nn.Module, forward: dict[str, float], backward: dict[str, float],
                default: str) -> dict[str, float]:
    """One step's FLOPs by number format: each labelled layer's forward and backward FLOPs in the
    formats it declares, the rest in `default`."""
    out: dict[str, float] = {}

    def add(dtype: str, n: float) -> None:
        if n:
            out[dtype] = out.get(dtype, 0.0) + n

    layers = labelled_layers(model)
    for phase, counts in (("forward", forward), ("backward", backward)):
        rest = counts.get("Global", 0.0)
        for name, module in layers.items():
            n = _lookup(counts, name)
            label = module.flop_dtype
            add(label.get(phase, default) if isinstance(label, dict) else str(label), n)
            rest -= n
        add(default, max(rest, 0.0))
    return out


def _lookup(counts: dict[str, float], name: str) -> float:
    """A module's count; under DistributedDataParallel the counter sees the wrapper as the root."""
    if name in counts:
        return counts[name]
    tail = name.partition(".")[2]
    return counts.get(f"DistributedDataParallel.module.{tail}", 0.0) if tail else 0.0
