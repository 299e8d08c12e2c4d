"""Label smoothing: train against targets that keep a little probability on every class.

Szegedy et al., "Rethinking the Inception architecture" (CVPR 2016), §7; an ingredient of the HAET
2021 challenge winners and of airbench's CIFAR-10 speed runs.

With smoothing ε the target is (1 − ε)·one-hot + ε/K, so the cross-entropy splits into
(1 − ε)·CE(logits, y) + ε·mean_k(−log p_k). The method adds the second term to the run's loss at
AFTER_FORWARD, so it composes with any per-sample weights (they weight both terms) and costs one
log-softmax per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.config import check_range
from ..core.errors import ConfigError
from ..core.method import Method

__all__ = ["LabelSmoothingConfig", "smoothed_loss", "LabelSmoothing"]


@dataclass(frozen=True)
class LabelSmoothingConfig:
    smoothing: float = 0.1   # ε: probability spread uniformly over the classes; 0.1 is the paper's and airbench's scale

    def __post_init__(self) -> None:
        check_range("smoothing", self.smoothing, 0, 1, hi_open=True)


def smoothed_loss(loss: torch.Tensor, logits: torch.Tensor, smoothing: float,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """Turn a cross-entropy `loss` (mean over the batch, optionally `weights`-weighted) into the
    label-smoothed one: (1 − ε)·loss + ε·mean over classes of −log p."""
    uniform = -F.log_softmax(logits.float(), dim=-1).mean(dim=-1)
    if weights is not None:
        uniform = (uniform * weights).sum() / weights.sum().clamp_min(1e-12)
    else:
        uniform = uniform.mean()
    return (1 - smoothing) * loss + smoothing * uniform


class LabelSmoothing(Method):
    name = "label_smoothing"
    summary = "cross-entropy against smoothed targets (1−ε on the label, ε spread over all classes)"
    paper = "Szegedy et al., Rethinking the Inception architecture, CVPR 2016"
    config_class = LabelSmoothingConfig

    def __init__(self, config=None, /, **params) -> None:
        super().__init__(config, **params)
        self.steps = 0

    def check_model(self, model) -> None:
        from ..generative import is_generative

        if is_generative(model):
            raise ConfigError(f"label_smoothing smooths the targets of a classifier's cross-entropy; "
                              f"{type(model).__name__} is a generative model (its loss is the negative ELBO)")

    def check_compatible(self, others: list[Method]) -> None:
        # A method that computes the gradients itself never reads state.loss: the smoothing would be dropped.
        for other in others:
            if "backward" in other.owns:
                raise ConfigError(f"label_smoothing and {other.name} cannot run together: {other.name} computes "
                                  "the gradients without the loss label_smoothing changes")

    def after_forward(self, state) -> None:
        logits = state.outputs
        if not torch.is_tensor(logits) or logits.dim() != 2:
            raise ConfigError(f"label_smoothing needs class logits of shape (batch, classes), got "
                              f"{tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__}")
        weights = state.batch[2] if len(state.batch) > 2 else None
        state.loss = smoothed_loss(state.loss, logits, self.config.smoothing, weights)
        self.steps += 1

    def metrics(self) -> dict:
        return {"label_smoothing/batches": self.steps}

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state_dict: dict) -> None:
        self.steps = int(state_dict["steps"])
