"""Contention meter: was this run's timing taken on a machine busy with other work?

haet measures time; on a shared machine a run can wait for a core without anyone noticing (on a
2-core machine shared with other jobs, an mnist5k epoch took 9–18 s with torch's 2 threads against
1.4 s with 1). For each run the meter records:

- ``cpu_s``: the process's CPU time (user + system, all threads) during ``fit`` (``getrusage``);
- ``threads``: torch's intra-op thread count, ``cores``: the machine's logical cores;
- ``load_avg``: the 1-minute load average at fit start and end (``os.getloadavg``);
- ``cpu_per_thread``: ``cpu_s / (wall_s × threads)``, the share of its threads' wall time the run
  actually computed;
- ``contended``: true when ``cpu_per_thread`` is below `MIN_CPU_PER_THREAD` (CPU runs only: on a
  GPU the host mostly waits, by design) or the load average exceeded the core count.

A contended run gets a warning on screen and a mark in reports; its times (and time ratios to
other runs) should not be trusted. The fix is fewer threads (``haet bench --threads 1``) or a
quieter machine.
"""

from __future__ import annotations

import os
import resource
import time
import warnings

import torch

from .base import Meter

#: Below this share of CPU time per thread and wall second, the run waited for cores.
MIN_CPU_PER_THREAD = 0.5


class ContentionWarning(UserWarning):
    """The run's timing was taken on a contended machine."""


def contention_verdict(cpu_s: float, wall_s: float, threads: int, load_avg: float | None, cores: int,
                       cpu_bound: bool = True) -> tuple[bool, float | None, list[str]]:
    """(contended, cpu_per_thread, reasons) for a run of `wall_s` seconds that used `cpu_s`."""
    share = cpu_s / (wall_s * threads) if wall_s > 0 and threads > 0 else None
    reasons = []
    if cpu_bound and share is not None and share < MIN_CPU_PER_THREAD:
        reasons.append(f"the process computed {share:.2f} CPU-s per wall-second per thread "
                       f"({threads} thread{'s' if threads != 1 else ''}; below {MIN_CPU_PER_THREAD})")
    if load_avg is not None and load_avg > cores:
        reasons.append(f"the load average was {load_avg:.1f} on {cores} cores")
    return bool(reasons), share, reasons


class ContentionMeter(Meter):
    name = "contention"

    def __init__(self) -> None:
        self.result: dict = {}
        self._start: tuple[float, float, float | None] | None = None

    def fit_start(self, state) -> None:
        self._start = (time.perf_counter(), _cpu_s(), _load())
        self.result = {}

    def fit_end(self, state) -> None:
        if self._start is None:
            return
        wall0, cpu0, load0 = self._start
        wall_s, cpu_s, load1 = time.perf_counter() - wall0, _cpu_s() - cpu0, _load()
        threads, cores = torch.get_num_threads(), os.cpu_count() or 1
        loads = [v for v in (load0, load1) if v is not None]
        contended, share, reasons = contention_verdict(cpu_s, wall_s, threads, max(loads) if loads else None, cores,
                                                       cpu_bound=state.device.type == "cpu")
        self.result = {"cpu_s": cpu_s, "threads": threads, "cores": cores, "cpu_per_thread": share,
                       "load_avg": {"start": load0, "end": load1}, "contended": contended}
        if contended:
            warnings.warn(f"timing contended: {'; '.join(reasons)}. This run's times are not reliable: "
                          "use fewer threads (--threads 1) or a quieter machine", ContentionWarning, stacklevel=2)

    def report(self, state) -> dict:
        return dict(self.result)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return None
