"""Small frozen option objects that keep the Trainer's signature readable.

- `TrainOptions`: how a step is made (gradient accumulation, clipping) and how often the run is
  evaluated.
- `Precision`: the arithmetic of forward and loss (``fp32``, ``bf16``, ``fp16``) through
  ``torch.autocast``; master weights, gradients and optimizer state stay float32.
- `Target`: a value of an evaluated metric to stop at (``--until accuracy=0.95``).
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass

import torch

from .config import check_range
from .errors import ConfigError


@dataclass(frozen=True)
class TrainOptions:
    accumulate: int = 1                # micro-batches per optimizer step (gradient accumulation)
    clip_grad: float | None = None     # clip the gradients' global L2 norm to this before each step
    eval_every: int | None = None      # evaluate every N optimizer steps (None: after each epoch)

    def __post_init__(self) -> None:
        check_range("accumulate", self.accumulate, 1, integer=True)
        if self.clip_grad is not None:
            check_range("clip_grad", self.clip_grad, 0, lo_open=True)
        if self.eval_every is not None:
            check_range("eval_every", self.eval_every, 1, integer=True)


#: Precision names -> the autocast dtype (None: plain float32).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: The label of each autocast format in FLOPs and energy (the hardware table's names).
DTYPE_LABELS = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class Precision:
    """Mixed precision: forward and loss under ``torch.autocast`` in `name`'s format.

    bf16 runs on CPU and CUDA; fp16 on CUDA only, with a gradient scaler (float16's range is too
    narrow for small gradients). Weights stay float32 (the master copy the optimizer updates).
    """
    name: str = "fp32"

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.name!r}")

    @property
    def dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.name]

    @property
    def label(self) -> str:
        """The number format FLOPs and modelled energy are labelled with."""
        return DTYPE_LABELS.get(self.dtype, "float32")

    def check_device(self, device: torch.device) -> None:
        if self.name == "fp16" and device.type != "cuda":
            raise ConfigError("precision fp16 needs a CUDA GPU (it trains with a gradient scaler there); "
                              "on CPU use bf16 or fp32")

    def autocast(self, device: torch.device):
        """The context forward and loss run in."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def scaler(self, device: torch.device):
        """A gradient scaler for fp16 on CUDA, else None."""
        if self.name == "fp16" and device.type == "cuda":
            return torch.amp.GradScaler("cuda")
        return None


def as_precision(value) -> Precision:
    if isinstance(value, Precision):
        return value
    if value is None:
        return Precision()
    if not isinstance(value, str):
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return Precision(value)


#: Metric names read as "lower is better" (a target is met at or below it); all others at or above.
_LOWER_IS_BETTER = re.compile(r"(loss|error|err|perplexity|mse|mae|rmse|wer|cer|ter|nll|neg_elbo|bits_per_dim|bpd)(_|$)|_s$", re.IGNORECASE)


@dataclass(frozen=True)
class Target:
    """Stop as soon as an evaluation has ``metric >= value`` (``<=`` for loss-like metrics)."""
    metric: str
    value: float
    op: str = ""   # ">=" or "<="; "" = from the metric's name (loss, error, ...: "<="; others ">=")

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise ConfigError(f"a target needs a metric name, got {self.metric!r}")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise ConfigError(f"target {self.metric} must be a finite number, got {self.value!r}")
        if self.op not in ("", ">=", "<="):
            raise ConfigError(f"target comparison must be >= or <=, got {self.op!r}")
        if not self.op:
            object.__setattr__(self, "op", "<=" if _LOWER_IS_BETTER.search(self.metric) else ">=")

    def met(self, metrics: dict) -> bool:
        if self.metric not in metrics:
            raise ConfigError(f"the target metric {self.metric!r} is not evaluated by this run; "
                              f"evaluated: {', '.join(sorted(metrics)) or '(nothing)'}")
        v = metrics[self.metric]
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return v >= self.value if self.op == ">=" else v <= self.value

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"

    @classmethod
    def parse(cls, text: str) -> "Target":
        """``accuracy=0.95`` (direction from the name), ``loss<=0.1`` or ``accuracy>=0.9``."""
        m = re.fullmatch(r"\s*([A-Za-z_][\w/.-]*)\s*(>=|<=|=)\s*([-+0-9.eE]+)\s*", text or "")
        if not m:
            raise ConfigError(f"bad target {text!r}; write METRIC=VALUE (e.g. accuracy=0.95), METRIC>=VALUE "
                              "or METRIC<=VALUE")
        try:
            value = float(m.group(3))
        except ValueError:
            raise ConfigError(f"bad target value in {text!r}: {m.group(3)!r} is not a number") from None
        return cls(m.group(1), value, "" if m.group(2) == "=" else m.group(2))


def as_targets(until) -> tuple[Target, ...]:
    """`until` as targets: None, a Target, a string (``"accuracy=0.95"``) or a dict {metric: value};
    several targets stop the run when any one is met."""
    if until is None:
        return ()
    if isinstance(until, Target):
        return (until,)
    if isinstance(until, str):
        return tuple(Target.parse(part) for part in until.split(",") if part.strip())
    if isinstance(until, dict):
        return tuple(Target(str(k), v) for k, v in until.items())
    if isinstance(until, (list, tuple)) and all(isinstance(t, Target) for t in until):
        return tuple(until)
    raise ConfigError(f"until must be a dict {{metric: value}}, a string like 'accuracy=0.95' or a Target; "
                      f"got {type(until).__name__}")
