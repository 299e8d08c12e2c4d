"""The fp32 learners: DQN (discrete actions) and DDPG (continuous actions).

Each learner owns its networks and optimizer, takes one gradient step per `update(batch)` on a
replay batch, and exposes `policy` (the network the actors copy) and `update_flops` (for the
energy model). Target networks follow by soft (Polyak) updates with rate `tau`.

DQN: Mnih et al. 2015 with the double-DQN target (van Hasselt et al. 2016) and a Huber loss.
DDPG: Lillicrap et al. 2016, deterministic policy with a tanh head scaled to the action bounds.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .policy import linear_weight_count, make_policy, mlp


class DQNLearner:
    def __init__(self, obs_dim: int, n_actions: int, width: int, depth: int, *, lr: float, gamma: float,
                 tau: float, device: torch.device) -> None:
        self.policy = make_policy(obs_dim, n_actions, width, depth).to(device)
        self.target = copy.deepcopy(self.policy).requires_grad_(False)
        self.opt = torch.optim.Adam(self.policy.parameters(), lr=lr)
        self.gamma, self.tau, self.device = gamma, tau, device
        macs = linear_weight_count(self.policy)[0]
        # One step at batch B: forward, backward (2× forward) and the two target-side forwards.
        self.flops_per_sample = 2 * macs * (1 + 2 + 2)

    def update(self, batch: dict[str, np.ndarray]) -> float:
        b = _tensors(batch, self.device)
        q = self.policy(b["obs"]).gather(1, b["action"].long().view(-1, 1)).squeeze(1)
        with torch.no_grad():
            best = self.policy(b["next_obs"]).argmax(1, keepdim=True)  # double DQN: online net picks
            next_q = self.target(b["next_obs"]).gather(1, best).squeeze(1)  # target net scores
            target = b["reward"] + self.gamma * (1 - b["done"]) * next_q
        loss = F.smooth_l1_loss(q, target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.policy.parameters(), 10.0)
        self.opt.step()
        _soft_update(self.target, self.policy, self.tau)
        return float(loss.detach())


class DDPGLearner:
    def __init__(self, obs_dim: int, action_dim: int, action_scale: float, width: int, depth: int, *, lr: float,
                 gamma: float, tau: float, device: torch.device) -> None:
        self.policy = make_policy(obs_dim, action_dim, width, depth, action_scale=action_scale).to(device)
        self.critic = mlp(obs_dim + action_dim, 1, width, depth).to(device)
        self.target_policy = copy.deepcopy(self.policy).requires_grad_(False)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.policy_opt = torch.optim.Adam(self.policy.parameters(), lr=lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=lr)
        self.gamma, self.tau, self.device = gamma, tau, device
        pm, cm = linear_weight_count(self.policy)[0], linear_weight_count(self.critic)[0]
        # Critic: target forwards + forward/backward; policy: forward/backward through the critic.
        self.flops_per_sample = 2 * (pm + cm) + 2 * cm * 3 + 2 * (pm + cm) * 3

    def update(self, batch: dict[str, np.ndarray]) -> float:
        b = _tensors(batch, self.device)
        action = b["action"].view(len(b["action"]), -1)
        with torch.no_grad():
            next_a = self.target_policy(b["next_obs"])
            next_q = self.target_critic(torch.cat([b["next_obs"], next_a], 1)).squeeze(1)
            target = b["reward"] + self.gamma * (1 - b["done"]) * next_q
        q = self.critic(torch.cat([b["obs"], action], 1)).squeeze(1)
        critic_loss = F.mse_loss(q, target)
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()
        policy_loss = -self.critic(torch.cat([b["obs"], self.policy(b["obs"])], 1)).mean()
        self.policy_opt.zero_grad(set_to_none=True)
        policy_loss.backward()
        self.policy_opt.step()
        _soft_update(self.target_critic, self.critic, self.tau)
        _soft_update(self.target_policy, self.policy, self.tau)
        return float(critic_loss.detach())


def _tensors(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, device=device) for k, v in batch.items()}


@torch.no_grad()
def _soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    for t, s in zip(target.parameters(), source.parameters()):
        t.lerp_(s, tau)
