"""A user's data, made from the task's own images with no download: the distribution shifts a
deployed model meets on one person's device. Each shift is a fixed function of the user's seed."""

from __future__ import annotations

import math

import torch

from ..core.errors import choices_error

SHIFTS = {
    "rotate": "images rotated by a user-specific angle (20-40 degrees)",
    "classes": "the user sees three classes far more often than the others",
    "noise": "sensor noise: Gaussian noise of std 0.3 on every pixel",
    "style": "a fixed per-user pixel transform: gamma, contrast and an inverted 4-pixel border",
}


def _rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], dtype=x.dtype)
    grid = torch.nn.functional.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, align_corners=False)


def apply_shift(shift: str, x: torch.Tensor, y: torch.Tensor, user: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`shift` applied to images `x` (N, C, H, W) with labels `y`, for user number `user`."""
    if shift not in SHIFTS:
        raise choices_error("shift", shift, SHIFTS)
    g = torch.Generator().manual_seed(1000 + user)
    x = x.float()
    if shift == "rotate":
        angle = 20 + 20 * torch.rand(1, generator=g).item()
        return _rotate(x, angle), y
    if shift == "noise":
        return (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1), y
    if shift == "style":
        gamma = 0.4 + 0.2 * torch.rand(1, generator=g).item()
        out = x.clamp(0, 1) ** gamma
        out[..., :4, :] = 1 - out[..., :4, :]
        return out, y
    # classes: keep every sample of three favourite classes and a fifth of the rest
    favourite = torch.randperm(int(y.max()) + 1, generator=g)[:3]
    fav = torch.isin(y, favourite)
    keep = fav | (torch.rand(len(y), generator=g) < 0.2)
    return x[keep], y[keep]


def user_data(shift: str, x: torch.Tensor, y: torch.Tensor, user: int, held_out: float = 0.25):
    """The user's (train, held-out) tensors: `shift` applied to (x, y), then split; the train part
    arrives over the updates, the held-out part measures the user's accuracy."""
    xs, ys = apply_shift(shift, x, y, user)
    n_test = max(1, int(len(xs) * held_out))
    return (xs[n_test:], ys[n_test:]), (xs[:n_test], ys[:n_test])
