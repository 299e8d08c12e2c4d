"""Tensor-backed data and a fast, seeded batch loader.

`TensorData` holds a whole data set as tensors. `Loader` slices it into batches by indexing with a
seeded permutation: no per-sample ``__getitem__`` and no collation, so the loop costs what a
hand-written one does. The order of epoch ``e`` is a pure function of (seed, e): a resumed run
sees the same batches as an uninterrupted one. A loader may iterate over a subset of the samples
with per-sample weights (subset-selection methods), and over one shard of each epoch's order
(data parallel).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset


class TensorData(Dataset):
    """A data set held as tensors ``x`` (N, ...) and ``y`` (N, ...).

    A map-style ``Dataset`` like any other (``DataLoader(TensorData(x, y), batch_size=64)`` works);
    the Trainer batches it faster itself with `Loader` (slicing, no per-sample collation).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def __getitems__(self, indices) -> list[tuple]:
        # DataLoader's batched fetch: a list of samples, which the default collate stacks.
        return [self[i] for i in indices]

    def to(self, device) -> "TensorData":
        return TensorData(self.x.to(device), self.y.to(device))


class BernoulliData(TensorData):
    """Images with values in [0, 1] whose training batches are binary draws: each pixel is 1 with
    its grey value as probability, drawn afresh each epoch (dynamic binarization). `Loader` draws
    from a generator of (seed, epoch, batch), so a resumed run sees the same draws; indexing one
    sample draws from torch's global generator."""

    def __getitem__(self, i):
        return torch.bernoulli(self.x[i]), self.y[i]

    def to(self, device) -> "BernoulliData":
        return BernoulliData(self.x.to(device), self.y.to(device))

    @staticmethod
    def draw(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.device.type != "cpu":
            return torch.bernoulli(x.cpu(), generator=generator).to(x.device)
        return torch.bernoulli(x, generator=generator)


def as_tensor_data(data: Any, what: str = "this method") -> TensorData:
    """`data` as a `TensorData`: a TensorData as is; a ``TensorDataset`` of (x, y) tensors, or a
    DataLoader over one, by its tensors; any other map-style Dataset of (x, y) tensor samples by
    stacking them. Anything else (an iterable of batches) is refused with a clear error."""
    from ..core.errors import ConfigError

    if isinstance(data, TensorData):
        return data
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, TensorDataset):
        if len(data.tensors) != 2:
            raise ConfigError(f"{what} needs a TensorDataset of (inputs, labels); got {len(data.tensors)} tensors")
        return TensorData(*data.tensors)
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        samples = [data[i] for i in range(len(data))]
        if all(isinstance(s, (tuple, list)) and len(s) == 2 and isinstance(s[0], torch.Tensor) for s in samples):
            return TensorData(torch.stack([s[0] for s in samples]), torch.as_tensor([s[1] for s in samples])
                              if not isinstance(samples[0][1], torch.Tensor) else torch.stack([s[1] for s in samples]))
    raise ConfigError(f"{what} needs the training data as tensors: a haet.TensorData, a TensorDataset (or a "
                      f"DataLoader over one) or a Dataset of (tensor, label) samples; got {type(data).__name__}")


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """The generator of epoch `epoch`'s data order (stream 0), or of another random stream of that
    epoch (stream 1: dynamic binarization): a function of (seed, epoch, stream) only."""
    base = seed * 1_000_003 + epoch
    return torch.Generator().manual_seed(base if stream == 0 else base * 7919 + stream)


class Loader:
    """Batches of a `TensorData`, reshuffled each epoch from (seed, epoch).

    ``indices``/``weights`` restrict an epoch to a weighted subset (batches are then
    ``(x, y, w)``); ``rank``/``world_size`` give each process an equal, disjoint shard.
    """

    def __init__(self, data: TensorData, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 indices: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if weights is not None and (indices is None or len(weights) != len(indices)):
            raise ValueError("weights need indices of the same length")
        self.data, self.batch_size, self.seed, self.shuffle = data, batch_size, seed, shuffle
        self.indices, self.weights = indices, weights
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 1

    def set_epoch(self, epoch: int) -> "Loader":
        self.epoch = epoch
        return self

    def _order(self) -> torch.Tensor:
        n = len(self.indices) if self.indices is not None else len(self.data)
        order = torch.randperm(n, generator=epoch_generator(self.seed, self.epoch)) if self.shuffle \
            else torch.arange(n)
        if self.world_size > 1:
            per_rank = n // self.world_size  # equal shards so every rank takes the same number of steps
            order = order[self.rank * per_rank:(self.rank + 1) * per_rank]
        return order

    def __len__(self) -> int:
        n = len(self._order())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple]:
        order = self._order()
        x, y = self.data.x, self.data.y
        draws = None
        if isinstance(self.data, BernoulliData):  # a stream of its own: the data order stays as it was
            draws = epoch_generator(self.seed, self.epoch, stream=1)
        stop = len(order) - (len(order) % self.batch_size if self.drop_last else 0)
        for start in range(0, stop, self.batch_size):
            pos = order[start:start + self.batch_size]
            idx = pos if self.indices is None else self.indices[pos]
            xb = x[idx] if draws is None else BernoulliData.draw(x[idx], draws)
            if self.indices is None or self.weights is None:
                yield xb, y[idx]
            else:
                yield xb, y[idx], self.weights[pos]
