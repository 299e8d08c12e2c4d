"""Hardware models: an FPGA/ASIC-like accelerator (`Accelerator`, presets ``zedboard`` and
``small-asic``) that maps a network at a bit-width to cycles, latency, DRAM traffic and energy."""

from .accelerator import PRESETS, Accelerator, get_accelerator, layer_shapes

__all__ = ["Accelerator", "PRESETS", "get_accelerator", "layer_shapes"]
