"""The actor-learner loop (ActorQ): fp32 learner, quantized actors, a replay buffer.

Rounds: every actor takes ``steps_per_round`` env steps with the weights it last received while
the learner trains on the replay buffer (under Ray at the same time; locally one after the
other, with the same results: an actor's round never depends on the learner's steps of that
round). Then the transitions go into the buffer and, once ``refresh_every`` learner steps have
passed since the last broadcast, the learner encodes its policy in the actors' precision and
broadcasts it. Every ``eval_every`` env steps the actors play greedy episodes with the current
weights (the policy that acts is the quantized one), and ``--until`` compares their mean return
with the target.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from ..core.budget import Budget
from ..core.errors import ConfigError
from ..core.record import RunRecord, hardware_info
from ..meters.hardware import HardwareTable
from .backends import ActorError, LocalBackend, RayBackend
from .buffer import ReplayBuffer
from .config import RLConfig, Until
from .learners import DDPGLearner, DQNLearner
from .policy import encode_weights, linear_weight_count, payload_bytes

_DTYPE = {"int8": "int8", "fp16": "float16", "fp32": "float32"}


def train(config: RLConfig, *, budget: Budget | None = None, until: Until | None = None,
          on_round: Callable[[dict], None] | None = None, env_factory=None, temp_dir: str | None = None) -> RunRecord:
    """Run ActorQ until `until` is met or `budget` (time and/or learner steps) is spent; returns the
    record (``stopped_by`` "target", "budget:time", "budget:steps", "interrupt" or "error").

    `on_round` is called after every round with a dict of progress (env and learner steps,
    elapsed seconds, last evaluation return, the backend). `env_factory(env_id)` replaces
    ``gymnasium.make`` for the actors (it must pickle for the Ray backend)."""
    return ActorQ(config).run(budget=budget, until=until, on_round=on_round, env_factory=env_factory,
                              temp_dir=temp_dir)


class ActorQ:
    """The thin class over `train`: after `run`, ``learner.policy`` is the trained fp32 policy."""

    def __init__(self, config: RLConfig) -> None:
        self.config = config
        self.learner = None

    def run(self, *, budget: Budget | None = None, until: Until | None = None,
            on_round: Callable[[dict], None] | None = None, env_factory=None, temp_dir: str | None = None) -> RunRecord:
        config = self.config
        budget = budget or Budget()
        extra = set(budget.to_dict()) - {"time_s", "steps"}
        if extra:
            raise ConfigError(f"haet rl takes budget time and steps only, not {', '.join(sorted(extra))}")
        if budget.is_empty() and until is None:
            raise ConfigError("give a budget (time=..., steps=...) or --until return=..., or the run never ends")
        device = _device(config.device)
        threads = torch.get_num_threads()
        torch.set_num_threads(config.learner_threads)
        torch.manual_seed(config.seed)
        run = _Run(config, budget, until, device)
        self.learner = run.learner
        t_wall = time.perf_counter()
        backend = None
        try:
            kwargs = [dict(env_id=config.env, precision=config.actor_precision, width=config.policy_width,
                           depth=config.policy_depth, seed=config.seed, index=i, action_noise=config.action_noise,
                           env_factory=env_factory) for i in range(config.actors)]
            if config.backend == "ray":
                backend = RayBackend(kwargs, timeout_s=config.actor_timeout_s, temp_dir=temp_dir)
            else:
                backend = LocalBackend(kwargs)
            run.m["startup_s"] = time.perf_counter() - t_wall
            run.loop(backend, on_round)
        except ActorError as e:
            run.stopped_by, run.error = "error", str(e)
        except KeyboardInterrupt:
            run.stopped_by = "interrupt"
        except Exception as e:  # Ray failing to start, an environment that breaks: a record, not a traceback
            run.stopped_by, run.error = "error", f"{type(e).__name__}: {e}"
        finally:
            if backend is not None:
                backend.close()
            record = run.record(time.perf_counter() - t_wall)
            torch.set_num_threads(threads)
        return record


class _Run:
    def __init__(self, config: RLConfig, budget: Budget, until: Until | None, device: torch.device) -> None:
        import gymnasium as gym

        from .actor import env_spec

        self.config, self.budget, self.until, self.device = config, budget, until, device
        probe = gym.make(config.env)
        spec = env_spec(probe)
        probe.close()
        c = config
        if spec["discrete"]:
            self.learner = DQNLearner(spec["obs_dim"], spec["out_dim"], c.policy_width, c.policy_depth, lr=c.lr,
                                      gamma=c.gamma, tau=c.tau, device=device)
            action_shape, action_dtype = (), np.int64
        else:
            self.learner = DDPGLearner(spec["obs_dim"], spec["out_dim"], spec["action_scale"], c.policy_width,
                                       c.policy_depth, lr=c.lr, gamma=c.gamma, tau=c.tau, device=device)
            action_shape, action_dtype = (spec["out_dim"],), np.float32
        self.buffer = ReplayBuffer(c.buffer_size, spec["obs_dim"], action_shape, action_dtype, c.seed)
        self.policy_macs = linear_weight_count(self.learner.policy)[0]
        self.env_steps = self.learner_steps = self.episodes = self.inferences = 0
        self.broadcasts, self.bytes_sent, self.payload_bytes = 0, 0, 0
        self.m = dict.fromkeys(("startup_s", "learner_s", "wait_s", "broadcast_s", "quantize_s", "inference_s",
                                "env_s", "eval_s"), 0.0)
        self.history: list[dict] = []
        self.last_eval: list[float] = []
        self.train_returns: list[float] = []
        self.stopped_by, self.error, self.time_to_target = "budget", None, None
        self.t0 = None

    # -- the loop ------------------------------------------------------------------------------
    def loop(self, backend, on_round) -> None:
        c = self.config
        self.t0 = time.perf_counter()
        pending = self._broadcast(backend)
        last_broadcast, next_eval = 0, c.eval_every
        while True:
            epsilon = self._epsilon()
            ticket = pending + backend.submit("collect", [(c.steps_per_round, epsilon)] * c.actors)
            self._learn()  # on data of earlier rounds, while the actors collect
            t = time.perf_counter()
            results = backend.gather(ticket)
            self.m["wait_s"] += time.perf_counter() - t
            self.m["quantize_s"] += sum(r for r in results[:len(pending)])
            for r in results[len(pending):]:
                self._take(r)
            pending = []
            if self.learner_steps - last_broadcast >= c.refresh_every:
                pending, last_broadcast = self._broadcast(backend), self.learner_steps
            if self.env_steps >= next_eval:
                next_eval += c.eval_every
                if self.learner_steps != last_broadcast:  # evaluate the learner's current policy
                    pending, last_broadcast = pending + self._broadcast(backend), self.learner_steps
                self._evaluate(backend, pending)
                pending = []
                if self.until is not None and np.mean(self.last_eval) >= self.until.return_:
                    self.stopped_by, self.time_to_target = "target", self.elapsed()
            if on_round is not None:
                on_round(self.progress(backend))
            if self.stopped_by == "target":
                return
            kind = self.budget.exhausted({"steps": self.learner_steps, "train_s": self.elapsed()})
            if kind is not None:
                self.stopped_by = f"budget:{kind}"
                if not self.history or self.history[-1]["learner_steps"] != self.learner_steps:
                    # the record's return is of the final policy
                    if self.learner_steps != last_broadcast:
                        pending = pending + self._broadcast(backend)
                    self._evaluate(backend, pending)
                return

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0 if self.t0 is not None else 0.0

    def _epsilon(self) -> float:
        c = self.config
        frac = min(1.0, self.env_steps / c.explore_steps)
        return 1.0 + frac * (c.epsilon_end - 1.0)

    def _learn(self) -> None:
        c = self.config
        if self.env_steps < c.learning_starts:
            return
        owed = int(self.env_steps * c.updates_per_step) - self.learner_steps
        if self.budget.steps is not None:
            owed = min(owed, int(self.budget.steps) - self.learner_steps)
        t = time.perf_counter()
        for _ in range(max(0, owed)):
            self.learner.update(self.buffer.sample(c.batch_size))
            self.learner_steps += 1
            if self.budget.time_s is not None and self.elapsed() >= self.budget.time_s:
                break  # a long backlog (the first round after learning_starts) must not overrun the budget
        self.m["learner_s"] += time.perf_counter() - t

    def _take(self, r: dict) -> None:
        self.buffer.add(r["transitions"])
        self.env_steps += r["steps"]
        self.episodes += len(r["returns"])
        self.train_returns = (self.train_returns + r["returns"])[-100:]
        self.inferences += r["inferences"]
        self.m["inference_s"] += r["inference_s"]
        self.m["env_s"] += r["env_s"]

    def _broadcast(self, backend) -> list:
        """Encode the policy in the actors' precision, send it; returns the tickets of the loads."""
        t = time.perf_counter()
        payload = encode_weights(self.learner.policy, self.config.actor_precision)
        t_encoded = time.perf_counter()
        ref = backend.put(payload)
        ticket = backend.submit("set_weights", [(ref,)] * self.config.actors)
        self.m["broadcast_s"] += time.perf_counter() - t_encoded
        if self.config.actor_precision != "fp32":
            self.m["quantize_s"] += t_encoded - t
        else:
            self.m["broadcast_s"] += t_encoded - t
        self.payload_bytes = payload_bytes(payload)
        self.bytes_sent += self.payload_bytes * self.config.actors
        self.broadcasts += 1
        return ticket

    def _evaluate(self, backend, pending: list) -> None:
        c = self.config
        t = time.perf_counter()
        share = [c.eval_episodes // c.actors + (i < c.eval_episodes % c.actors) for i in range(c.actors)]
        results = backend.gather(pending + backend.submit("evaluate", [(n,) for n in share]))
        self.m["quantize_s"] += sum(results[:len(pending)])
        self.last_eval = [x for r in results[len(pending):] for x in r["returns"]]
        self.inferences += sum(r["inferences"] for r in results[len(pending):])
        self.m["eval_s"] += time.perf_counter() - t
        self.history.append({"env_steps": self.env_steps, "learner_steps": self.learner_steps,
                             "train_s": self.elapsed(), "return": float(np.mean(self.last_eval)),
                             "return_std": float(np.std(self.last_eval))})

    def progress(self, backend) -> dict:
        return {"env_steps": self.env_steps, "learner_steps": self.learner_steps, "elapsed_s": self.elapsed(),
                "eval_return": float(np.mean(self.last_eval)) if self.last_eval else None,
                "train_return": float(np.mean(self.train_returns)) if self.train_returns else None,
                "backend": backend}

    # -- the record ----------------------------------------------------------------------------
    def record(self, wall_s: float) -> RunRecord:
        c = self.config
        train_s = self.elapsed()
        per_s = (lambda n: n / train_s) if train_s > 0 else (lambda n: None)
        energy = self._energy()
        mm = {f"rl/{k}": v for k, v in self.m.items()}
        mm.update({"rl/actor_steps_per_s": per_s(self.env_steps), "rl/learner_steps_per_s": per_s(self.learner_steps),
                   "rl/env_steps": self.env_steps, "rl/learner_steps": self.learner_steps,
                   "rl/episodes": self.episodes, "rl/broadcasts": self.broadcasts,
                   "rl/broadcast_bytes": self.bytes_sent, "rl/payload_bytes": self.payload_bytes,
                   "rl/policy_params": sum(linear_weight_count(self.learner.policy)),
                   "rl/train_return": float(np.mean(self.train_returns)) if self.train_returns else None,
                   "rl/energy_actors_j": energy["actors"], "rl/energy_learner_j": energy["learner"]})
        metrics = {"return": float(np.mean(self.last_eval)) if self.last_eval else None,
                   "return_std": float(np.std(self.last_eval)) if self.last_eval else None,
                   "eval_episodes": len(self.last_eval)}
        params = {k: getattr(c, k) for k in ("algo", "actors", "actor_precision", "policy_width", "policy_depth",
                                             "backend", "refresh_every", "steps_per_round", "updates_per_step",
                                             "learner_threads")}
        hardware = hardware_info(self.device)
        hardware["actor_threads"] = 1 if c.backend == "ray" else hardware["threads"]
        return RunRecord(
            task=c.env, model=c.model_name, methods=[{"name": "actorq", "params": params}],
            label=f"{c.algo}/{c.actor_precision}", seed=c.seed, device=str(self.device), hardware=hardware,
            epochs=0, steps=self.learner_steps, stopped_by=self.stopped_by, metrics=metrics, history=self.history,
            cost={"wall_s": wall_s, "train_s": train_s, "eval_s": self.m["eval_s"],
                  "time_to_target_s": self.time_to_target, "flops": energy["flops"],
                  "energy_j": energy["actors"] + energy["learner"], "energy_source": "model"},
            method_metrics=mm, budget={**self.budget.to_dict(),
                                       **({"until_return": self.until.return_} if self.until else {})},
            error=self.error, haet_version=_version())

    def _energy(self) -> dict:
        """haet's energy model (hardware table: Horowitz 45 nm): actor inference FLOPs in the actors'
        number format plus their weight reads and the broadcast bytes; learner steps in fp32."""
        table = HardwareTable.default()
        c = self.config
        actor_flops = 2 * self.policy_macs * self.inferences
        weight_bytes = {"int8": 1, "fp16": 2, "fp32": 4}[c.actor_precision] * self.policy_macs
        actors = (actor_flops * table.pj_per_flop(_DTYPE[c.actor_precision])
                  + (weight_bytes * self.inferences + self.bytes_sent) * table.dram_pj_per_byte) * 1e-12
        learner_flops = self.learner.flops_per_sample * c.batch_size * self.learner_steps
        learner = learner_flops * table.pj_per_flop("float32") * 1e-12
        return {"actors": actors, "learner": learner, "flops": actor_flops + learner_flops}


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' asked for, but torch sees no CUDA device; use --device cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _version() -> str:
    from .. import __version__

    return __version__
