"""Settings of an ActorQ run, the environments it knows, and the ``--until`` target.

Environments are gymnasium's classic-control tasks only (no download, no Box2D/MuJoCo); each maps
to the algorithm that fits its action space: DQN for discrete actions, DDPG for continuous ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import check_choice, check_range
from ..core.errors import ConfigError, choices_error

#: gymnasium id -> algorithm its action space takes.
ENVS: dict[str, str] = {"CartPole-v1": "dqn", "Acrobot-v1": "dqn", "MountainCar-v0": "dqn", "Pendulum-v1": "ddpg"}
ALGOS = ("dqn", "ddpg")
PRECISIONS = ("int8", "fp16", "fp32")
BACKENDS = ("ray", "local")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class RLConfig:
    env: str = "CartPole-v1"
    algo: str | None = None            # None: the env's algorithm from ENVS
    actors: int = 2                    # actor processes (Ray) or objects (local)
    actor_precision: str = "int8"      # the actors' copy of the policy; the learner stays fp32
    policy_width: int = 256            # units per hidden layer (the paper: 2048)
    policy_depth: int = 3              # hidden layers (the paper: 3)
    backend: str = "ray"
    device: str = "auto"               # the learner's device; actors always run on CPU
    learner_threads: int = 1           # the learner's torch threads (local backend: the actors' too); on a
                                       # CPU shared with actors more threads mostly wait on each other
    seed: int = 0
    refresh_every: int = 100           # learner steps between weight broadcasts (checked once per round)
    steps_per_round: int = 50          # env steps each actor takes between two exchanges with the learner
    updates_per_step: float = 1.0      # learner steps per env step collected (the replay ratio)
    batch_size: int = 64
    buffer_size: int = 50_000          # transitions kept by the learner's replay buffer
    learning_starts: int = 1_000       # env steps collected before the first learner step
    gamma: float = 0.99
    lr: float = 1e-3                   # Adam, for the Q-network (dqn) or the policy and critic (ddpg)
    tau: float = 0.01                  # soft target-network update per learner step
    explore_steps: int = 10_000        # dqn: env steps over which epsilon falls from 1 to epsilon_end
    epsilon_end: float = 0.05
    action_noise: float = 0.1          # ddpg: Gaussian exploration noise, as a fraction of the action range
    eval_every: int = 2_000            # env steps between evaluations
    eval_episodes: int = 20            # episodes per evaluation (metrics.return is their mean)
    actor_timeout_s: float = 120.0     # an actor that does not answer within this is reported as an error

    def __post_init__(self) -> None:
        if self.env not in ENVS:
            raise choices_error("env", self.env, ENVS)
        if self.algo is None:
            object.__setattr__(self, "algo", ENVS[self.env])
        check_choice("algo", self.algo, ALGOS)
        if self.algo != ENVS[self.env]:
            raise ConfigError(f"algo {self.algo!r} does not fit {self.env} (its actions are "
                              f"{'discrete' if ENVS[self.env] == 'dqn' else 'continuous'}); use algo {ENVS[self.env]!r}")
        check_choice("actor_precision", self.actor_precision, PRECISIONS)
        check_choice("backend", self.backend, BACKENDS)
        check_choice("device", self.device, DEVICES)
        check_range("actors", self.actors, 1, 64, integer=True)
        check_range("policy_width", self.policy_width, 1, 16_384, integer=True)
        check_range("policy_depth", self.policy_depth, 1, 16, integer=True)
        check_range("learner_threads", self.learner_threads, 1, 1024, integer=True)
        check_range("seed", self.seed, 0, 2**31 - 1, integer=True)
        for name in ("refresh_every", "steps_per_round", "batch_size", "eval_every", "eval_episodes"):
            check_range(name, getattr(self, name), 1, None, integer=True)
        check_range("buffer_size", self.buffer_size, self.batch_size, None, integer=True)
        check_range("learning_starts", self.learning_starts, self.batch_size, self.buffer_size, integer=True)
        check_range("explore_steps", self.explore_steps, 1, None, integer=True)
        check_range("updates_per_step", self.updates_per_step, 0, 64, lo_open=True)
        check_range("gamma", self.gamma, 0, 1)
        check_range("lr", self.lr, 0, 1, lo_open=True)
        check_range("tau", self.tau, 0, 1, lo_open=True)
        check_range("epsilon_end", self.epsilon_end, 0, 1)
        check_range("action_noise", self.action_noise, 0, None)
        check_range("actor_timeout_s", self.actor_timeout_s, 0, None, lo_open=True)

    @property
    def model_name(self) -> str:
        return f"mlp-{self.policy_width}x{self.policy_depth}"


@dataclass(frozen=True)
class Until:
    """Stop when an evaluation's mean return reaches `return_`."""

    return_: float

    @classmethod
    def parse(cls, text: str) -> "Until":
        """Parse ``return=195``."""
        values: dict[str, float] = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, sep, raw = item.partition("=")
            key = key.strip().lower()
            if not sep or key not in _UNTIL_KEYS:
                raise ConfigError(f"bad --until item {item!r}; use key=value with key one of: {', '.join(_UNTIL_KEYS)}")
            try:
                value = float(raw)
            except ValueError:
                value = float("nan")
            if value != value or value in (float("inf"), float("-inf")):
                raise ConfigError(f"bad --until value {item!r}; a finite number")
            values[key] = value
        if "return" not in values:
            raise ConfigError(f"--until {text!r} names no target; use return=<mean evaluation return>")
        return cls(return_=values["return"])


_UNTIL_KEYS = ("return",)
