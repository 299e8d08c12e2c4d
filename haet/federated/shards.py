"""Client shards: non-IID splits of a shipped task in which some classes are new.

A *new* class is held by only a few clients (``holders`` of them) and is unknown to the server:
each holder knows its samples only under a private name ("my new class j"), stored here as the
local label ``-(j + 1)``. Seen classes keep their global index on every client. The true class
behind each private name (`ClientShard.new_truth`) is simulation ground truth used only to score
the run; it never leaves the shard.

Seen classes are spread over all clients with a Dirichlet(α) split per class (α → ∞ is IID;
Hsu, Qi and Brown 2019), each new class over its holders in equal parts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data.loader import TensorData
from ..data.tasks import get_task


@dataclass(frozen=True)
class ClientShard:
    """One client's private data: inputs, local labels (seen: global index; new: -(j+1))."""
    x: torch.Tensor
    labels: torch.Tensor
    new_truth: tuple[int, ...]  # true class of local new label j (ground truth for scoring only)

    @property
    def num_new(self) -> int:
        return len(self.new_truth)


@dataclass(frozen=True)
class Split:
    shards: list[ClientShard]
    test: TensorData
    seen: tuple[int, ...]
    new: tuple[int, ...]
    num_classes: int
    input_shape: tuple[int, ...]


def make_split(task: str, clients: int, new_classes: int, seed: int, *, iid: bool = False,
               alpha: float = 0.5, holders: int = 2) -> Split:
    """Split `task`'s training set over `clients`; `new_classes` classes go to `holders` clients each."""
    t = get_task(task)
    train, test = t.load(seed, None)
    rng = np.random.default_rng(seed)
    new = tuple(sorted(int(c) for c in rng.choice(t.num_classes, new_classes, replace=False)))
    seen = tuple(c for c in range(t.num_classes) if c not in new)
    y = train.y.numpy()
    parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
    for c in seen:
        idx = rng.permutation(np.flatnonzero(y == c))
        share = np.full(clients, 1.0 / clients) if iid else rng.dirichlet(np.full(clients, alpha))
        for k, chunk in enumerate(np.split(idx, (np.cumsum(share)[:-1] * len(idx)).astype(int))):
            parts[k].append(chunk)
    order = rng.permutation(clients)  # which clients hold new classes: different ones where possible
    new_of: list[list[int]] = [[] for _ in range(clients)]
    for i, c in enumerate(new):
        owners = [int(order[(i * holders + h) % clients]) for h in range(min(holders, clients))]
        idx = rng.permutation(np.flatnonzero(y == c))
        for k, chunk in zip(owners, np.array_split(idx, len(owners))):
            parts[k].append(chunk)
            new_of[k].append(c)
    shards = []
    for k in range(clients):
        idx = np.sort(np.concatenate(parts[k])) if parts[k] else np.zeros(0, dtype=int)
        labels = train.y[idx].clone()
        for j, c in enumerate(new_of[k]):
            labels[labels == c] = -(j + 1)
        shards.append(ClientShard(train.x[idx].clone(), labels, tuple(new_of[k])))
    return Split(shards, test, seen, new, t.num_classes, tuple(t.input_shape))


def train_labels(shard: ClientShard, slot_of_new: dict[int, int]) -> torch.Tensor:
    """The shard's labels as model outputs: seen classes keep theirs, local new j goes to slot_of_new[j]."""
    labels = shard.labels.clone()
    for j in range(shard.num_new):
        labels[shard.labels == -(j + 1)] = slot_of_new[j]
    return labels
