"""Shared fixtures. Tests run on CPU, in parallel (pytest -n 2): one torch thread per worker."""

from __future__ import annotations

import os

import pytest
import torch

import haet
from haet.data import TensorData, get_task

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mnist5k():
    """The mnist5k split of seed 0: (train, test) TensorData."""
    return get_task("mnist5k").load(0, None)


@pytest.fixture
def tiny_data():
    """256 random 1×8×8 images with learnable labels (the label is a function of the input)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 8, 8, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    return TensorData(x, y)


def tiny_cnn() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 64, 4))


@pytest.fixture
def trainer_factory(tiny_data):
    """Build a quiet Trainer on the tiny data: trainer_factory(model=None, **kwargs)."""

    def make(model=None, **kwargs):
        haet.seed_everything(0)
        kwargs.setdefault("progress", False)
        return haet.Trainer(model if model is not None else tiny_cnn(), tiny_data, kwargs.pop("eval_data", tiny_data),
                            **kwargs)

    return make
