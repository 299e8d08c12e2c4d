"""One model family at several widths, and the HeteroFL rule that aggregates them.

Heterogeneous clients run the same architecture with fewer channels (width 0.5 = half of every
hidden layer). Each narrow model is the *leading slice* of the full one: its conv filter ``k`` is
the full model's filter ``k`` restricted to the first input channels, and the final linear layer
reads the first channels of the flattened feature map. This is HeteroFL's rule (Diao, Ding and
Tarokh, ICLR 2021): the server sends each client the slice that fits its width and averages every
weight entry over the clients that hold it, weighted by their sample counts. With one width it is
exactly FedAvg. Inputs and classes are never sliced, so every client shares the full label space.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

WIDTHS = (0.25, 0.5, 1.0)


def cnn2d(input_shape: tuple[int, ...], num_classes: int, width: float = 1.0) -> nn.Sequential:
    """mnist5k-cnn (DESIGN.md) at a width: conv 16w, pool, conv 32w, pool, linear."""
    c, h, w = input_shape
    c1, c2 = _ch(16, width), _ch(32, width)
    return nn.Sequential(
        nn.Conv2d(c, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * (h // 4) * (w // 4), num_classes))


def cnn1d(input_shape: tuple[int, ...], num_classes: int, width: float = 1.0) -> nn.Sequential:
    """mnist1d-cnn (haet.models) at a width: three 1-D convs of 32w channels, linear."""
    c, length = input_shape
    k = _ch(32, width)
    return nn.Sequential(
        nn.Conv1d(c, k, 5, padding=2), nn.ReLU(),
        nn.Conv1d(k, k, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(k, k, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(k * ((length + 3) // 4), num_classes))


#: Model family per task input rank: 3-D inputs (C, H, W) get cnn2d, 2-D inputs (C, L) cnn1d.
FAMILIES: dict[int, tuple[str, Callable[..., nn.Sequential]]] = {3: ("cnn2d", cnn2d), 2: ("cnn1d", cnn1d)}


def build(input_shape: tuple[int, ...], num_classes: int, width: float = 1.0) -> nn.Sequential:
    return FAMILIES[len(input_shape)][1](tuple(input_shape), num_classes, width)


def family_name(input_shape: tuple[int, ...]) -> str:
    return FAMILIES[len(input_shape)][0]


def slice_state(full: dict[str, torch.Tensor], narrow_shapes: dict[str, torch.Size],
                spatial: dict[str, int]) -> dict[str, torch.Tensor]:
    """The leading slice of every full tensor that a narrower model of `narrow_shapes` holds."""
    return {k: _index(full[k], shape, spatial.get(k, 1)) for k, shape in narrow_shapes.items()}


def heterofl_average(full: dict[str, torch.Tensor], updates: list[tuple[dict[str, torch.Tensor], float]],
                     spatial: dict[str, int]) -> dict[str, torch.Tensor]:
    """Average each entry over the clients whose slice covers it (weights: sample counts).

    Entries no client covers keep the value in `full`. With equal widths this is FedAvg.
    """
    out = {}
    for key, ref in full.items():
        acc = torch.zeros_like(ref, dtype=torch.float64)
        count = torch.zeros_like(ref, dtype=torch.float64)
        for state, weight in updates:
            value, mask = _embed(state[key], ref.shape, spatial.get(key, 1))
            acc += weight * value
            count += weight * mask
        mixed = torch.where(count > 0, acc / count.clamp_min(1e-30), ref.double())
        out[key] = mixed.to(ref.dtype)
    return out


def flatten_spatial(model: nn.Sequential, input_shape: tuple[int, ...]) -> dict[str, int]:
    """For each Linear after a Flatten: how many input features one channel spans (h·w or length)."""
    spatial: dict[str, int] = {}
    x = torch.zeros(1, *input_shape)
    channels = None
    with torch.no_grad():
        for name, layer in model.named_children():
            if isinstance(layer, nn.Flatten):
                channels = x.shape[1]
            x = layer(x)
            if isinstance(layer, nn.Linear) and channels is not None:
                spatial[f"{name}.weight"] = layer.in_features // channels
                channels = None
    return spatial


# -- private helpers ---------------------------------------------------------------------------
def _ch(n: int, width: float) -> int:
    return max(1, int(round(n * width)))


def _index(full: torch.Tensor, shape: torch.Size, spatial: int) -> torch.Tensor:
    if spatial == 1:
        return full[tuple(slice(0, n) for n in shape)].clone()
    # A Linear after Flatten holds (out, channels·spatial): the leading channels are leading blocks.
    out_f, in_f = shape
    return full[:out_f].reshape(out_f, -1, spatial)[:, :in_f // spatial].reshape(out_f, in_f).clone()


def _embed(narrow: torch.Tensor, full_shape: torch.Size, spatial: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`narrow` placed at its slice of a zero tensor of `full_shape`, and the 0/1 mask of that slice."""
    value = torch.zeros(full_shape, dtype=torch.float64)
    mask = torch.zeros(full_shape, dtype=torch.float64)
    if spatial == 1:
        idx = tuple(slice(0, n) for n in narrow.shape)
        value[idx] = narrow.double()
        mask[idx] = 1.0
        return value, mask
    out_f, in_f = narrow.shape
    v = value.view(full_shape[0], -1, spatial)
    m = mask.view(full_shape[0], -1, spatial)
    v[:out_f, :in_f // spatial] = narrow.double().reshape(out_f, -1, spatial)
    m[:out_f, :in_f // spatial] = 1.0
    return value, mask
