"""Memory meter: peak memory of the run and a breakdown of one measured step in bytes.

- Peak: on CPU the process's peak resident set (``VmHWM``, reset at the start of fit through
  ``/proc/self/clear_refs`` where Linux allows it, else the lifetime peak from ``getrusage``); on
  CUDA ``torch.cuda.max_memory_allocated``. The CPU figure includes everything the process holds
  (the data set, PyTorch itself), the CUDA figure only tensors.
- Breakdown, per step signature (see `step_signature`): parameters, gradients alive at the end of
  backward, optimizer state after the update, and activations = bytes of the tensors autograd saved
  for backward during the forward (parameters excluded, shared storage counted once; the live
  peak, see `SavedTensorPeak`, so a method that runs micro-batches inside the forward is counted
  by its largest micro-batch). Reported as the largest value seen for each part.
- Bytes moved per step, for the energy model: 4·P (parameters read in forward and backward, read
  and written by the update) + 2·A (activations written, read back) + 2·G (gradients written, read
  by the update) + 2·S (optimizer state read and written) + I (the input batch), where G is the
  bytes of the trainable parameters.
"""

from __future__ import annotations

import re
import resource
import sys

import torch

from .base import Meter, step_signature


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors (a tensor listed twice counts once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def optimizer_state_bytes(optimizer) -> int:
    return tensor_bytes(v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))


class SavedTensorPeak:
    """While active: the peak of the bytes autograd holds saved for backward, live.

    Each saved tensor is packed with a holder that counts its storage while the graph keeps it
    (shared storage counted once; storages of `exclude`, e.g. parameters and buffers, left out),
    so tensors freed by a backward inside the window no longer count: a step that runs several
    forward/backward passes (micro-batches) reports its largest, not their sum. A plain step
    reports the same as summing what the forward saved. Windows may nest (a method's inside the
    meter's or the other way round): every active one counts each saved tensor."""

    _active: list["SavedTensorPeak"] = []

    def __init__(self, exclude=()) -> None:
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.live: dict[int, list[int]] = {}     # storage pointer -> [bytes, holders]
        self.current = self.peak = 0
        self._hooks = None

    def __enter__(self) -> "SavedTensorPeak":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._hooks.__enter__()
        SavedTensorPeak._active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        SavedTensorPeak._active.remove(self)
        self._hooks.__exit__(*exc)
        self._hooks = None

    def _pack(self, t: torch.Tensor):
        # torch calls only the innermost hooks: this one counts the tensor for every active window
        parts = [(s.data_ptr(), s.nbytes()) for s in _storages(t)]  # a sparse tensor: indices and values
        parts = [(ptr, n) for ptr, n in parts if n > 0]
        owners = [w for w in SavedTensorPeak._active if any(ptr not in w.exclude for ptr, _ in parts)]
        if not owners:
            return t
        return _Held(owners, t, parts)

    def _add(self, ptr: int, nbytes: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            self.live[ptr] = [nbytes, 1]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        else:
            entry[1] += 1

    def _drop(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[ptr]
            self.current -= entry[0]


class _Held:
    """A saved tensor as autograd keeps it; its storages counted until autograd lets go of it."""
    __slots__ = ("owners", "tensor", "parts")

    def __init__(self, owners: list[SavedTensorPeak], tensor: torch.Tensor, parts: list[tuple[int, int]]) -> None:
        self.owners, self.tensor, self.parts = owners, tensor, parts
        for owner in owners:
            for ptr, nbytes in parts:
                if ptr not in owner.exclude:
                    owner._add(ptr, nbytes)

    def __del__(self) -> None:
        for owner in self.owners:
            for ptr, _ in self.parts:
                if ptr not in owner.exclude:
                    owner._drop(ptr)


def _unpack(packed):
    return packed.tensor if isinstance(packed, _Held) else packed


class MemoryMeter(Meter):
    name = "memory"
    provides = ("peak_mem_mb", "mem_budget_mb")

    def __init__(self) -> None:
        self.breakdown = {"params": 0, "grads": 0, "optimizer": 0, "activations": 0}
        self.bytes_moved = 0.0
        self.peak_mb = 0.0
        self._cuda = False
        self.start_mb = 0.0    # resident size at fit start (CPU); 0 on CUDA (the allocator starts empty)
        self._moved_per_sig: dict[tuple, float] = {}   # per optimizer step: the update's traffic
        self._micro_per_sig: dict[tuple, float] = {}   # per micro-batch: forward and backward traffic
        self._measuring: tuple | None = None
        self._measure: dict = {}
        self._hooks: SavedTensorPeak | None = None
        self._sig = None

    # -- peak ---------------------------------------------------------------------------------
    def current_peak_mb(self) -> float:
        if self._cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        return max(self.peak_mb, _process_peak_mb())

    def added_mb(self) -> float:
        """Peak memory added since fit start: on CPU the peak minus the resident size at fit start."""
        return max(0.0, self.current_peak_mb() - self.start_mb)

    def readings(self, state) -> dict[str, float]:
        peak = self.current_peak_mb()
        return {"peak_mem_mb": peak, "mem_budget_mb": peak if self._cuda else max(0.0, peak - self.start_mb)}

    def fit_start(self, state) -> None:
        self._cuda = state.device.type == "cuda"
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(state.device)
        else:
            _reset_process_peak()
            self.start_mb = _process_rss_mb() or 0.0

    def fit_end(self, state) -> None:
        self.peak_mb = self.current_peak_mb()

    # -- breakdown of measured steps ----------------------------------------------------------
    def batch_start(self, state) -> None:
        self._sig = sig = step_signature(state)
        if sig in self._moved_per_sig:
            return
        self._measuring = sig
        self._hooks = SavedTensorPeak(exclude=state.model.parameters()).__enter__()
        x = state.batch[0]
        self._measure = {"input": x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0}

    def after_forward(self, state) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._measure["activations"] = self._hooks.peak
            self._hooks = None

    def after_backward(self, state) -> None:
        sig = self._sig
        if self._measuring is not None:
            self._measure["grads"] = tensor_bytes(p.grad for p in state.model.parameters())
        if sig not in self._micro_per_sig:
            params = list(state.model.parameters())
            m = self._measure
            self._micro_per_sig[sig] = (2 * tensor_bytes(params) + 2 * m.get("activations", 0)
                                        + 2 * tensor_bytes(p for p in params if p.requires_grad) + m.get("input", 0))
        # Counted per micro-batch: with gradient accumulation an optimizer step is several of them.
        self.bytes_moved += self._micro_per_sig[sig]

    def after_step(self, state) -> None:
        sig = self._sig
        if self._measuring is not None:
            m = self._measure
            params = list(state.model.parameters())
            p_bytes = tensor_bytes(params)
            g_bytes = tensor_bytes(p for p in params if p.requires_grad)
            s_bytes = optimizer_state_bytes(state.optimizer)
            for key, value in (("params", p_bytes), ("grads", m.get("grads", 0)), ("optimizer", s_bytes),
                               ("activations", m.get("activations", 0))):
                self.breakdown[key] = max(self.breakdown[key], value)
            self._moved_per_sig[sig] = 2 * p_bytes + 2 * s_bytes  # the update reads and writes both
            self._measuring = None
        self.bytes_moved += self._moved_per_sig.get(sig, 0.0)

    def report(self, state) -> dict:
        peak = self.peak_mb or self.current_peak_mb()
        return {"peak_mem_mb": peak, "peak_mem_added_mb": peak if self._cuda else max(0.0, peak - self.start_mb),
                "mem_start_mb": self.start_mb, "memory_bytes": dict(self.breakdown),
                "bytes_moved": self.total_bytes_moved(state)}

    def total_bytes_moved(self, state) -> float:
        """Bytes moved by the measured steps plus what methods charged to the ledger."""
        return self.bytes_moved + state.ledger.bytes_moved

    def state_dict(self) -> dict:
        return {"breakdown": dict(self.breakdown), "bytes_moved": self.bytes_moved,
                "peak_mb": self.current_peak_mb()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.breakdown.update(state_dict["breakdown"])
        self.bytes_moved = state_dict["bytes_moved"]
        self.peak_mb = state_dict["peak_mb"]


def _storages(t: torch.Tensor) -> list:
    """The storages behind a tensor: one for a dense tensor; indices and values for a sparse one
    (a sparse tensor has no storage of its own)."""
    layout = t.layout
    if layout == torch.strided:
        return [t.untyped_storage()]
    if layout in (torch.sparse_csr, torch.sparse_bsr):
        parts = (t.crow_indices(), t.col_indices(), t.values())
    elif layout in (torch.sparse_csc, torch.sparse_bsc):
        parts = (t.ccol_indices(), t.row_indices(), t.values())
    elif layout == torch.sparse_coo:
        parts = (t._indices(), t._values())
    else:
        return []
    return [p.untyped_storage() for p in parts]


_HWM = re.compile(rb"VmHWM:\s+(\d+)\s*kB")
_RSS = re.compile(rb"VmRSS:\s+(\d+)\s*kB")


def _process_rss_mb() -> float | None:
    """The process's resident size now (Linux), or None where /proc is not available."""
    try:
        with open("/proc/self/status", "rb") as f:
            m = _RSS.search(f.read())
        return int(m.group(1)) / 1024 if m else None
    except OSError:
        return None


def _process_peak_mb() -> float:
    try:
        with open("/proc/self/status", "rb") as f:
            m = _HWM.search(f.read())
        if m:
            return int(m.group(1)) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _reset_process_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        pass
