"""What every benchmark prints first: date, machine, threads, load and the code's git revision,
so that results are stored with the code that made them."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys

import torch

from haet import __version__
from haet.core.record import cpu_name


def header(script: str, threads: int) -> str:
    """Set torch's thread count and return the header line(s) for `script`'s output."""
    torch.set_num_threads(threads)
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        rev = "unknown"
    load = os.getloadavg()
    cores = os.cpu_count() or 1
    busy = " (machine shared and loaded: timings are noisy)" if load[0] > cores else ""
    return (f"# {script}, {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, haet {__version__} at {rev}, "
            f"{cpu_name()}, {cores} cores, {threads} torch threads, torch {torch.__version__}, "
            f"Python {sys.version.split()[0]}, load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}{busy}")
