"""The Meter base class and the step signature shared by meters that measure a few steps."""

from __future__ import annotations

import torch

from ..core.events import Listener


class Meter(Listener):
    """Listens to the Trainer's events (after the methods) and reports into ``record.cost``."""

    #: Key in ``state.meters``.
    name: str = ""
    #: The keys `readings` returns (what budgets and the progress bar can read from this meter).
    provides: tuple[str, ...] = ()

    def readings(self, state) -> dict[str, float]:
        """The meter's running totals now, for budgets and the progress bar (keys: `provides`)."""
        return {}

    def report(self, state) -> dict:
        """Fields for ``record.cost``."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def step_signature(state) -> tuple:
    """What decides a training step's cost: input shapes and dtypes, model version, arithmetic.

    Meters measure a step once per signature, so a method that changes the model (and bumps
    ``state.model_version``) or the batch shape (downsampling, the last short batch) is re-measured.
    """
    return (_shapes(state.batch[0]), state.model_version, state.compute_dtype)


def _shapes(x) -> tuple:
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.dtype)
    if isinstance(x, (list, tuple)):
        return tuple(_shapes(v) for v in x)
    if isinstance(x, dict):
        return tuple((k, _shapes(v)) for k, v in sorted(x.items()))
    return (type(x).__name__,)
