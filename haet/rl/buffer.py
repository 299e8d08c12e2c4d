"""The learner's replay buffer: a fixed-size ring of transitions in numpy arrays."""

from __future__ import annotations

import numpy as np

FIELDS = ("obs", "action", "reward", "next_obs", "done")


class ReplayBuffer:
    """Uniform replay. ``done`` marks true terminations only: an episode cut by a time limit still
    bootstraps from its next state."""

    def __init__(self, capacity: int, obs_dim: int, action_shape: tuple[int, ...], action_dtype, seed: int) -> None:
        self.capacity = capacity
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)
        self.action = np.zeros((capacity, *action_shape), action_dtype)
        self.reward = np.zeros(capacity, np.float32)
        self.done = np.zeros(capacity, np.float32)
        self.size = 0
        self._next = 0
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.size

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """Append a batch of transitions (arrays of equal length, keyed by FIELDS)."""
        n = len(batch["reward"])
        idx = (self._next + np.arange(n)) % self.capacity
        for name in FIELDS:
            getattr(self, name)[idx] = batch[name]
        self._next = int((self._next + n) % self.capacity)
        self.size = min(self.capacity, self.size + n)

    def sample(self, batch_size: int) -> dict[str, np.ndarray]:
        idx = self._rng.integers(0, self.size, batch_size)
        return {name: getattr(self, name)[idx] for name in FIELDS}
