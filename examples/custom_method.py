"""A worked example of a haet method: clip the global gradient norm after backward.

Run it: ``python examples/custom_method.py``. The README walks through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import haet
from haet.core.config import check_range
from haet.data import get_task
from haet.models import build_model


# 1. Hyperparameters: a frozen dataclass, validated on construction.
@dataclass(frozen=True)
class ClipConfig:
    max_norm: float = 1.0  # largest global L2 norm of the gradients; 1.0 is a common default

    def __post_init__(self) -> None:
        check_range("max_norm", self.max_norm, 0, None, lo_open=True)


# 2. The functional form: works on any model, with or without the Trainer.
def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Scale all gradients so that their global norm is at most `max_norm`; return the norm before."""
    return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))


# 3. The thin Method: stores the config, calls the function on the right event, reports metrics.
class GradientClipping(haet.Method):
    name = "clip"
    summary = "clip the global gradient norm"
    paper = "Pascanu et al., On the difficulty of training RNNs (2013)"
    config_class = ClipConfig

    def __init__(self, config: ClipConfig | None = None, /, **params) -> None:
        super().__init__(config, **params)
        self.clipped_steps = 0

    def after_backward(self, state: haet.State) -> None:
        if clip_gradients(state.model, self.config.max_norm) > self.config.max_norm:
            self.clipped_steps += 1

    def metrics(self) -> dict:
        return {"clip/clipped_steps": self.clipped_steps}  # namespaced: <method>/<quantity>


if __name__ == "__main__":
    task = get_task("mnist5k")
    train, test = task.load(seed=0, data_dir=None)
    haet.seed_everything(0)
    model = build_model("mnist5k-cnn", task.input_shape, task.num_classes)
    record = haet.Trainer(model, train, test, methods=[GradientClipping(max_norm=0.5)]).fit(epochs=1)
    print(record.metrics, record.method_metrics)
