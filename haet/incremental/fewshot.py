"""Learning from a few labels on the device: a prototype classifier and FixMatch-like training.

- Prototypes (Snell et al. 2017): embed the k labelled examples of each class with a frozen trunk;
  a class's prototype is the mean of its embeddings; a sample gets the class of the nearest one.
  One forward pass per sample, no training.
- FixMatch-like (Sohn et al. 2020): a labelled batch's loss plus, for unlabelled samples, the
  model's own prediction on a weakly augmented view taken as a label when its confidence is at
  least `threshold`, and the loss of the strongly augmented view against it (consistency).
  Runs in the `Trainer` (budgets, meters): the model wrapper returns both views' logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import check_range


def pick_labelled(y: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Indices of `per_class` samples of every class present in `y` (seeded)."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(picks)


def prototypes(embeddings: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The class means of `embeddings` (num_classes, D); a class with no example gets +inf."""
    protos = torch.full((num_classes, embeddings.shape[1]), float("inf"))
    for c in range(num_classes):
        members = embeddings[y == c]
        if len(members):
            protos[c] = members.mean(0)
    return protos


def nearest_prototype(embeddings: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    return torch.cdist(embeddings, protos.nan_to_num(posinf=1e30)).argmin(1)


def pseudo_labels(logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, mask): the argmax class, and whether its softmax probability is >= `threshold`."""
    conf, labels = torch.softmax(logits.detach().float(), 1).max(1)
    return labels, conf >= threshold


def weak_view(x: torch.Tensor) -> torch.Tensor:
    """A random shift of up to 2 pixels (one per batch, cheap on a device)."""
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,)))
    return torch.roll(x, (dy, dx), dims=(-2, -1))


def strong_view(x: torch.Tensor) -> torch.Tensor:
    """A shift of up to 4 pixels, per-sample contrast, noise and an 8×8 cutout."""
    dx, dy = (int(v) for v in torch.randint(-4, 5, (2,)))
    out = torch.roll(x, (dy, dx), dims=(-2, -1))
    out = out * (0.5 + torch.rand(len(x), 1, 1, 1)) + 0.2 * torch.randn_like(out)
    h, w = x.shape[-2:]
    cy, cx = int(torch.randint(0, max(1, h - 8), ())), int(torch.randint(0, max(1, w - 8), ()))
    out[..., cy:cy + 8, cx:cx + 8] = 0
    return out


@dataclass(frozen=True)
class FixMatchConfig:
    threshold: float = 0.95
    unlabelled_weight: float = 1.0
    ratio: int = 7  # unlabelled samples per labelled one in the training set (labelled ones are repeated)

    def __post_init__(self) -> None:
        check_range("threshold", self.threshold, 0, 1)
        check_range("unlabelled_weight", self.unlabelled_weight, 0, 100)
        check_range("ratio", self.ratio, 1, 1000, integer=True)


class FixMatchModel(nn.Module):
    """Training: (weak-view logits, strong-view logits); evaluation: the model's plain logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        if not self.training:
            return self.model(x)
        return self.model(weak_view(x)), self.model(strong_view(x))


class FixMatchLoss:
    """Labelled samples (y >= 0): cross-entropy of the weak view. Unlabelled (y == -1): the strong
    view's cross-entropy against confident weak-view pseudo-labels, over all unlabelled samples."""

    def __init__(self, cfg: FixMatchConfig) -> None:
        self.cfg = cfg
        self.unlabelled_seen = self.pseudo_labelled = 0

    def __call__(self, outputs, y: torch.Tensor, reduction: str = "mean"):
        if not isinstance(outputs, tuple):  # evaluation
            return nn.functional.cross_entropy(outputs, y, reduction=reduction)
        weak, strong = outputs
        lab = y >= 0
        sup = nn.functional.cross_entropy(weak[lab], y[lab], reduction="sum") / max(1, int(lab.sum()))
        unl = ~lab
        labels, mask = pseudo_labels(weak[unl], self.cfg.threshold)
        self.unlabelled_seen += int(unl.sum())
        self.pseudo_labelled += int(mask.sum())
        if mask.any():
            cons = nn.functional.cross_entropy(strong[unl][mask], labels[mask], reduction="sum") / int(unl.sum())
        else:
            cons = strong.sum() * 0.0
        return sup + self.cfg.unlabelled_weight * cons


def fixmatch_data(x: torch.Tensor, y: torch.Tensor, labelled: torch.Tensor, ratio: int):
    """The training set: labelled samples repeated so that they make up about 1/(1+ratio) of it,
    then the unlabelled ones with label -1."""
    is_lab = torch.zeros(len(x), dtype=torch.bool)
    is_lab[labelled] = True
    n_unl = int((~is_lab).sum())
    reps = max(1, round(n_unl / (ratio * max(1, len(labelled)))))
    xl, yl = x[labelled].repeat(reps, *([1] * (x.dim() - 1))), y[labelled].repeat(reps)
    return torch.cat([xl, x[~is_lab]]), torch.cat([yl, torch.full((n_unl,), -1, dtype=y.dtype)])
