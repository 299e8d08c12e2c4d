"""Cost meters: time, memory, FLOPs, energy. Each is small and listens to the Trainer's events."""

from .base import Meter, step_signature
from .contention import ContentionMeter
from .energy import EnergyMeter
from .flops import FlopsMeter
from .hardware import HardwareTable
from .memory import MemoryMeter
from .time import TimeMeter


def default_meters() -> list[Meter]:
    """The meters a Trainer uses unless told otherwise (energy last: its model reads the others)."""
    return [TimeMeter(), MemoryMeter(), FlopsMeter(), EnergyMeter(), ContentionMeter()]


__all__ = ["Meter", "ContentionMeter", "TimeMeter", "MemoryMeter", "FlopsMeter", "EnergyMeter", "HardwareTable",
           "default_meters", "step_signature"]
