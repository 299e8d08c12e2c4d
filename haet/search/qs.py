"""QS-NAS: the least-energy bit-width × width scale that meets a target accuracy.

Hosseini et al. (HAET @ ICLR 2021): scaled-up low-bit networks match full precision. The search
explores the bit-width q (weights and activations, trained with `qat`) and the width scale s of a
model family, fits the accuracy surface, predicts the (q, s) with the least energy per inference
on an accelerator model (`haet.hardware`) whose predicted accuracy meets the target, *verifies it
by training it*, and repeats until a verified point meets the target or the training budget ends.

The surface: logit(accuracy) ≈ a + b·log2 q + c·log2 s + d·log2 q·log2 s (+ e·(log2 q)² from five
trained points on), least squares over the trained points — the paper's low-order polynomial, in
log coordinates and on the logit scale because accuracy saturates in both q and s and stays in
(0, 1). With fewer than four points, the points' own accuracies stand. The initial design is the
four corners of the grid and its centre. Energy is the
accelerator model's, so it needs no training: only accuracy is learned.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..core.errors import ConfigError
from ..hardware import Accelerator

SCALABLE = ("mnist5k-cnn", "mlp")


def scaled_model(name: str, input_shape: tuple[int, ...], num_classes: int, scale: float) -> nn.Module:
    """A member of a model family with every hidden width multiplied by `scale` (at least 1 unit)."""
    from ..models import mlp

    def w(n: int) -> int:
        return max(1, round(n * scale))

    if name == "mnist5k-cnn":
        c, h, wd = input_shape
        return nn.Sequential(nn.Conv2d(c, w(16), 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(w(16), w(32), 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(w(32) * (h // 4) * (wd // 4), num_classes))
    if name == "mlp":
        return mlp(input_shape, num_classes, hidden=(w(512), w(512)))
    raise ConfigError(f"QS search scales the widths of {', '.join(SCALABLE)}; got model {name!r}")


@dataclass
class Point:
    bits: int
    scale: float
    energy_j: float                 # per inference, from the accelerator model
    latency_s: float
    dram_bytes: float
    accuracy: float | None = None   # measured (trained) or None
    predicted: float | None = None  # from the fitted surface
    seeds: list[float] = field(default_factory=list)
    verified: bool = False          # trained because the search chose it

    def to_dict(self) -> dict:
        return asdict(self)


def _features(q: int, s: float, n: int) -> np.ndarray:
    lq, ls = math.log2(q), math.log2(s)
    return np.array([1.0, lq, ls, lq * ls, lq * lq][:n])


def fit_surface(points: Sequence[Point]) -> Callable[[int, float], float]:
    """The accuracy surface through the trained points (see the module docstring)."""
    trained = [p for p in points if p.accuracy is not None]
    if len(trained) < 4:
        known = {(p.bits, p.scale): p.accuracy for p in trained}
        return lambda q, s: known.get((q, s), float("nan"))
    n = 5 if len(trained) >= 5 else 4
    a = np.array([_features(p.bits, p.scale, n) for p in trained])
    eps = 1e-3
    acc = np.clip(np.array([p.accuracy for p in trained]), eps, 1 - eps)
    coef, *_ = np.linalg.lstsq(a, np.log(acc / (1 - acc)), rcond=None)
    return lambda q, s: float(1 / (1 + math.exp(-float(coef @ _features(q, s, n)))))


def pareto(points: Sequence[Point]) -> list[Point]:
    """Trained points that no other trained point beats on both energy (lower) and accuracy (higher)."""
    trained = sorted((p for p in points if p.accuracy is not None), key=lambda p: (p.energy_j, -p.accuracy))
    front, best = [], -math.inf
    for p in trained:
        if p.accuracy > best:
            front.append(p)
            best = p.accuracy
    return front


def search(grid: Sequence[Point], train: Callable[[int, float], list[float]], target: float, *,
           max_trainings: int = 8, on_point: Callable[[Point, str], None] | None = None) -> dict:
    """Train the grid's corners, then repeatedly train the least-energy point predicted to meet
    `target` until a trained point meets it or `max_trainings` is spent. `train(q, s)` returns the
    accuracy of each seed. Returns the chosen point (or None), the points and the trainings used."""
    if not grid:
        raise ConfigError("the QS search needs at least one (bits, scale) point")
    points = {(p.bits, p.scale): p for p in grid}
    bits, scales = sorted({p.bits for p in grid}), sorted({p.scale for p in grid})
    centre = (bits[len(bits) // 2], scales[len(scales) // 2])
    corners = dict.fromkeys([(bits[0], scales[-1]), (bits[-1], scales[0]), (bits[0], scales[0]),
                             (bits[-1], scales[-1]), centre])
    trainings = 0

    def run(key, why: str) -> None:
        nonlocal trainings
        p = points[key]
        p.seeds = list(train(p.bits, p.scale))
        p.accuracy = float(np.mean(p.seeds))
        trainings += 1
        if on_point is not None:
            on_point(p, why)

    for key in corners:
        if trainings >= max_trainings:
            break
        if key in points and points[key].accuracy is None:
            run(key, "initial design")
    while True:  # ends when no untrained point is predicted to meet the target at less energy
        surface = fit_surface(list(points.values()))
        for p in points.values():
            p.predicted = surface(p.bits, p.scale)
        meeting = [p for p in points.values() if p.accuracy is not None and p.accuracy >= target]
        chosen = min(meeting, key=lambda p: p.energy_j) if meeting else None
        candidates = sorted((p for p in points.values() if p.accuracy is None and p.predicted == p.predicted
                             and p.predicted >= target), key=lambda p: p.energy_j)
        if not candidates or trainings >= max_trainings or (chosen is not None
                                                            and candidates[0].energy_j >= chosen.energy_j):
            break
        candidates[0].verified = True
        run((candidates[0].bits, candidates[0].scale), "predicted to meet the target at less energy")
    return {"chosen": chosen, "points": list(points.values()), "trainings": trainings,
            "best": max((p for p in points.values() if p.accuracy is not None), key=lambda p: p.accuracy, default=None)}


def grid_points(accel: Accelerator, model_name: str, input_shape, num_classes: int, bits: Sequence[int],
                scales: Sequence[float]) -> list[Point]:
    """Every (q, s) with its accelerator estimate (no training)."""
    from ..hardware import layer_shapes

    shapes = {s: layer_shapes(scaled_model(model_name, input_shape, num_classes, s), input_shape) for s in scales}
    out = []
    for q in bits:
        for s in scales:
            est = accel.estimate_layers(shapes[s], q)
            out.append(Point(q, s, est["accel/energy_per_inference_j"], est["accel/latency_s"],
                             est["accel/dram_bytes"]))
    return out
