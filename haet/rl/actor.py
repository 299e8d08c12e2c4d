"""An actor: gymnasium environments stepped with a quantized copy of the learner's policy.

The same class runs as a Ray actor (one process each, one torch thread) or as a plain object in
the learner's process (the local backend), so both backends share every line of acting code.
Each actor times its own work: policy inference, environment steps, and loading new weights
(``quantize_s``: unpacking and repacking a payload for the quantized kernels).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from .policy import load_weights, make_policy, quantize_policy


def env_spec(env) -> dict:
    """What the networks need to know of an environment's spaces."""
    import gymnasium as gym

    obs_dim = int(np.prod(env.observation_space.shape))
    space = env.action_space
    if isinstance(space, gym.spaces.Discrete):
        return {"obs_dim": obs_dim, "discrete": True, "out_dim": int(space.n), "action_scale": None}
    return {"obs_dim": obs_dim, "discrete": False, "out_dim": int(np.prod(space.shape)),
            "action_scale": float(space.high.max())}


class Actor:
    def __init__(self, env_id: str, precision: str, width: int, depth: int, seed: int, index: int, *,
                 action_noise: float = 0.1, one_thread: bool = False,
                 env_factory: Callable[[str], object] | None = None) -> None:
        import gymnasium as gym  # the rl extra; imported here so that `import haet.rl` works without it

        if one_thread:
            torch.set_num_threads(1)  # an actor owns one core; more threads only contend with the others
        make = env_factory or gym.make
        self.env, self.eval_env = make(env_id), make(env_id)
        self.spec = env_spec(self.env)
        self.precision, self.index = precision, index
        self.action_noise = action_noise
        template = make_policy(self.spec["obs_dim"], self.spec["out_dim"], width, depth,
                               action_scale=self.spec["action_scale"])
        self.policy = quantize_policy(template, precision)
        # Seeds differ per actor and per purpose so that actors explore different trajectories.
        self.rng = np.random.default_rng([seed, index])
        self.obs, _ = self.env.reset(seed=int(self.rng.integers(2**31)))
        self.eval_env.reset(seed=int(self.rng.integers(2**31)))
        self.episode_return = 0.0
        self.inferences = 0  # policy calls so far (random exploratory actions need none)

    def set_weights(self, payload: dict) -> float:
        """Load a broadcast payload; returns the seconds it took."""
        t0 = time.perf_counter()
        load_weights(self.policy, payload)
        return time.perf_counter() - t0

    def collect(self, steps: int, epsilon: float) -> dict:
        """Take `steps` exploring env steps (epsilon-greedy for dqn, Gaussian noise for ddpg);
        returns the transitions, the returns of episodes that ended, and the time split."""
        obs_dim = self.spec["obs_dim"]
        out = {"obs": np.zeros((steps, obs_dim), np.float32), "next_obs": np.zeros((steps, obs_dim), np.float32),
               "reward": np.zeros(steps, np.float32), "done": np.zeros(steps, np.float32)}
        out["action"] = (np.zeros(steps, np.int64) if self.spec["discrete"]
                         else np.zeros((steps, self.spec["out_dim"]), np.float32))
        returns, inference_s, env_s, calls = [], 0.0, 0.0, self.inferences
        for i in range(steps):
            t0 = time.perf_counter()
            action = self._explore(self.obs, epsilon)
            t1 = time.perf_counter()
            next_obs, reward, terminated, truncated, _ = self.env.step(action)
            t2 = time.perf_counter()
            inference_s += t1 - t0
            env_s += t2 - t1
            out["obs"][i], out["action"][i], out["reward"][i] = self.obs, action, reward
            out["next_obs"][i], out["done"][i] = next_obs, float(terminated)
            self.episode_return += float(reward)
            if terminated or truncated:
                returns.append(self.episode_return)
                self.episode_return = 0.0
                t2 = time.perf_counter()
                next_obs, _ = self.env.reset()
                env_s += time.perf_counter() - t2
            self.obs = next_obs
        return {"transitions": out, "returns": returns, "inference_s": inference_s, "env_s": env_s, "steps": steps,
                "inferences": self.inferences - calls}

    def evaluate(self, episodes: int) -> dict:
        """Run `episodes` greedy episodes (no exploration) on a separate environment."""
        returns, inference_s, env_s, steps, calls = [], 0.0, 0.0, 0, self.inferences
        for _ in range(episodes):
            obs, _ = self.eval_env.reset()
            total, done = 0.0, False
            while not done:
                t0 = time.perf_counter()
                action = self._greedy(obs)
                t1 = time.perf_counter()
                obs, reward, terminated, truncated, _ = self.eval_env.step(action)
                env_s += time.perf_counter() - t1
                inference_s += t1 - t0
                total += float(reward)
                steps += 1
                done = terminated or truncated
            returns.append(total)
        return {"returns": returns, "inference_s": inference_s, "env_s": env_s, "steps": steps,
                "inferences": self.inferences - calls}

    def ping(self) -> int:
        return self.index

    # -- acting ------------------------------------------------------------------------------
    @torch.no_grad()
    def _greedy(self, obs: np.ndarray):
        self.inferences += 1
        out = self.policy(torch.as_tensor(obs, dtype=torch.float32).view(1, -1))[0]
        return int(out.argmax()) if self.spec["discrete"] else out.numpy()

    def _explore(self, obs: np.ndarray, epsilon: float):
        if self.spec["discrete"]:
            if self.rng.random() < epsilon:
                return int(self.rng.integers(self.spec["out_dim"]))
            return self._greedy(obs)
        scale = self.spec["action_scale"]
        action = self._greedy(obs) + self.rng.normal(0.0, self.action_noise * scale, self.spec["out_dim"])
        return np.clip(action, -scale, scale).astype(np.float32)
