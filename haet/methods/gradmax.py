"""GradMax: grow a network during training, new neurons initialized to maximize the gradient.

Paper: U. Evci, B. van Merriënboer, T. Unterthiner, M. Vladymyrov, F. Pedregosa, "GradMax:
Growing Neural Networks using Gradient Information", ICLR 2022 (HAET 2021 workshop version).

Training starts with the hidden layers at ``start_width`` of their width and adds units on a
schedule. A new unit gets zero fan-in, so with f(0) = 0 the network function is unchanged. Its
fan-out w then decides the gradient of its fan-in, g = A w (linear in w); GradMax picks the
fan-outs of the k new units as the top-k right singular vectors of A, scaled to a set norm, which
maximizes ‖g‖. For Linear → Linear, A's right singular vectors are the left singular vectors of
M = Σ_batch (∂L/∂z_{l+1}) h_{l-1}ᵀ; haet obtains A for any supported pair (conv, pooling,
flatten in between) exactly, by one forward and backward with virtual units (`_gradmax_ops`).
``init=random`` uses random fan-out directions of the same norm; ``init=zeros`` gives the new units
random fan-in and zero fan-out. The optimizer's state grows with the parameters (old entries kept,
new entries zero).

Functional form::

    info = grow(model, "2", k=32, init="gradmax", batch=(x, y), optimizer=opt)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import check_choice, check_range
from ..core.errors import ConfigError
from ..core.method import Method
from ..core.surgery import replace_modules
from ._gradmax_ops import (GrowReLU, consumer_widened, fan_in_gradients, fan_out_view, find_pairs, make_like,
                           unit_norms, widened, width)
from ._param_state import grow_into, swap_parameters


@dataclass(frozen=True)
class GradMaxConfig:
    start_width: float = 0.25            # fraction of each growable layer's units to start with (the paper: 1/4)
    grow_every: int = 25                 # optimizer steps between growth events
    grow_until: int = 125                # step of the last event: full width from then on (2 epochs of mnist5k)
    init: Literal["gradmax", "random", "zeros"] = "gradmax"  # how new units are initialized
    scale: float = 0.5                   # norm of a new unit's non-zero weights, × the existing units' mean norm

    def __post_init__(self) -> None:
        check_range("start_width", self.start_width, 0, 1, lo_open=True)
        check_range("grow_every", self.grow_every, 1, None, integer=True)
        check_range("grow_until", self.grow_until, self.grow_every, None, integer=True)
        check_choice("init", self.init, ("gradmax", "random", "zeros"))
        check_range("scale", self.scale, 0, None, lo_open=True)


def grow(model: nn.Module, layer: str, k: int, init: str = "gradmax", batch=None, *,
         loss_fn: Callable = F.cross_entropy, optimizer: torch.optim.Optimizer | None = None, scale: float = 0.5,
         generator: torch.Generator | None = None) -> dict:
    """Add `k` units to `layer` (a qualified module name) and the matching inputs to its consumer.

    `batch` (x, y) is needed for ``init="gradmax"``. `optimizer` is kept in step: the new
    parameters take the old ones' places, Adam moments and the like are carried over, new entries
    are zero. Returns ``{"width", "flops", "singular_values"}`` (the last two for gradmax). Needs no
    Trainer: a caller that tracks model versions bumps its own after the call.
    """
    check_choice("init", init, ("gradmax", "random", "zeros"))
    pairs = find_pairs(model)
    if layer not in pairs:
        raise ConfigError(f"gradmax: {layer!r} is not a growable layer; growable: {', '.join(pairs) or '(none)'}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"gradmax: k must be a positive integer, got {k!r}")
    pair = pairs[layer]
    _use_grow_relu(model, [pair])
    old, consumer = model.get_submodule(pair.layer), model.get_submodule(pair.consumer)
    units = width(old)
    view = fan_out_view(consumer, units)                       # (out, units, F)
    out, per_unit = view.shape[0], view.shape[-1]
    p = out * per_unit
    with torch.no_grad():
        out_norm = scale * unit_norms(view, 1).mean()
        in_norm = scale * unit_norms(old.weight, 0).mean()
    info: dict = {"flops": 0.0}
    fan_in = old.weight.new_zeros(k, *old.weight.shape[1:])
    fan_out = view.new_zeros(out, k, per_unit)
    if init == "gradmax":
        if batch is None:
            raise ConfigError("gradmax: init='gradmax' needs a batch (x, y) to compute the gradient directions")
        grads, info["flops"] = fan_in_gradients(model, pair, batch, loss_fn)   # Aᵀ: (p, q)
        u, s, _ = torch.linalg.svd(grads, full_matrices=k > min(grads.shape))
        directions = u[:, :k].t()                                  # top-k right singular vectors of A
        if k > p:  # more new units than fan-out dimensions: the rest get random directions
            directions = torch.cat([directions, _random_directions(k - p, p, generator, grads)])
        info["singular_values"] = s[:k].tolist()
    elif init == "random":
        directions = _random_directions(k, p, generator, view)
    if init in ("gradmax", "random"):
        directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12) * out_norm
        fan_out = directions.reshape(k, out, per_unit).transpose(0, 1).to(view.dtype)
    else:  # zeros: random fan-in, zero fan-out
        fan_in = _random_directions(k, fan_in[0].numel(), generator, fan_in).reshape(fan_in.shape)
        fan_in = fan_in / unit_norms(fan_in, 0).clamp_min(1e-12).reshape(-1, *[1] * (fan_in.dim() - 1)) * in_norm
    new = {pair.layer: widened(old, fan_in), pair.consumer: consumer_widened(consumer, units, pair.spatial, fan_out)}
    _swap(model, new, optimizer, grow_into)
    info["width"] = units + k
    return info


class GradMaxGrowth(Method):
    name = "gradmax"
    summary = "start narrow, grow units on a schedule; new fan-outs maximize the gradient (SVD)"
    paper = ("Evci, van Merriënboer, Unterthiner, Vladymyrov, Pedregosa, GradMax: Growing Neural Networks "
             "using Gradient Information (ICLR 2022; HAET 2021 workshop)")
    config_class = GradMaxConfig
    owns = frozenset({"model_width", "layer_types"})

    def __init__(self, config: GradMaxConfig | None = None, /, **params) -> None:
        super().__init__(config, **params)
        self.full: dict[str, int] = {}
        self.start: dict[str, int] = {}
        self.widths: dict[str, int] = {}
        self.events = 0
        self.growth_flops = 0.0
        self._relus_restored = False
        self._model: nn.Module | None = None
        self._optimizer = None

    def check_model(self, model) -> dict:
        """The growable pairs of `model`; ConfigError when there are none."""
        pairs = find_pairs(model)
        if not isinstance(model, nn.Sequential) or not pairs:
            # Growth follows the data through a chain of layers; outside an nn.Sequential the chain (and
            # the shapes it sees, e.g. a Transformer's (batch, seq, d)) is unknown, and with no pair
            # gradmax would change nothing.
            raise ConfigError(f"gradmax needs an nn.Sequential model with a growable pair of layers (Linear/Conv2d → "
                              f"Linear/Conv2d, with only activations, pooling, dropout or one Flatten between); got "
                              f"{type(model).__name__}" + ("" if isinstance(model, nn.Sequential)
                                                           else " (not an nn.Sequential)")
                              + ("" if pairs else " with no growable pair"))
        return pairs

    def fit_start(self, state) -> None:
        if state.world_size > 1:
            raise ConfigError("gradmax changes parameter shapes during training, which DistributedDataParallel "
                              "cannot follow; run it on one process")
        self._model, self._optimizer = state.unwrapped_model, state.optimizer
        pairs = self.check_model(self._model)
        self.full = {name: width(self._model.get_submodule(name)) for name in pairs}
        self.start = {name: max(1, round(self.config.start_width * w)) for name, w in self.full.items()}
        _use_grow_relu(self._model, list(pairs.values()))
        self._resize(self.start)
        state.model_version += 1

    def batch_end(self, state) -> None:
        c = self.config
        if state.step > c.grow_until and self._restore_relus():
            state.model_version += 1
        if not self.full or state.step % c.grow_every or state.step > c.grow_until:
            return
        event, events = state.step // c.grow_every, c.grow_until // c.grow_every
        for name in self.full:
            target = self.start[name] + round((self.full[name] - self.start[name]) * event / events)
            k = target - self.widths[name]
            if k > 0:
                info = grow(self._model, name, k, c.init, state.batch, loss_fn=state.loss_fn,
                            optimizer=state.optimizer, scale=c.scale)
                state.model_version += 1
                self.widths[name] = info["width"]
                self.growth_flops += info["flops"]
                state.charge(flops=info["flops"], what="gradmax/growth")
        self.events += 1

    def epoch_metrics(self) -> dict:
        out = {f"gradmax/width/{name}": w for name, w in self.widths.items()}
        if self.full:
            out["gradmax/width_fraction"] = sum(self.widths.values()) / sum(self.full.values())
        return out

    def metrics(self) -> dict:
        return {**self.epoch_metrics(), "gradmax/growth_events": self.events, "gradmax/growth_flops": self.growth_flops}

    def state_dict(self) -> dict:
        return {"widths": dict(self.widths), "events": self.events, "growth_flops": self.growth_flops,
                "relus_restored": self._relus_restored}

    def load_state_dict(self, state_dict: dict) -> None:
        """Rebuild the grown structure (fresh values; the model's and optimizer's state load next)."""
        self._resize(dict(state_dict["widths"]))
        self.events, self.growth_flops = state_dict["events"], state_dict["growth_flops"]
        if state_dict["relus_restored"]:
            self._restore_relus()

    def _restore_relus(self) -> bool:
        """After the last growth step, torch's ReLU again: GrowReLU saves its input for backward
        (ReLU saves its output, which the next pooling saves too), one more activation per layer.
        Returns whether the model changed."""
        if not self._relus_restored and self._model is not None:
            self._relus_restored = True
            return bool(replace_modules(self._model, None, lambda n, m: nn.ReLU(m.inplace) if type(m) is GrowReLU
                                        else None, what="gradmax"))
        return False

    def _resize(self, widths: dict[str, int]) -> None:
        """Fresh modules with the given widths for every growable layer and its consumer."""
        model, pairs = self._model, find_pairs(self._model)
        producer = {pair.consumer: pair for pair in pairs.values()}
        new = {}
        # In model order, not a set's: each make_like draws from the RNG, and a set's order changes
        # with PYTHONHASHSEED, which made the same --seed give different weights in different processes.
        for name in dict.fromkeys(n for pair in pairs.values() for n in (pair.layer, pair.consumer)):
            module = model.get_submodule(name)
            if name in producer:
                in_units, spatial = widths[producer[name].layer], producer[name].spatial
            else:
                in_units, spatial = module.weight.shape[1], 1
            new[name] = make_like(module, in_units, widths.get(name, width(module)), spatial)
        _swap(model, new, self._optimizer, None)
        self.widths = dict(widths)


def _swap(model: nn.Module, new: dict[str, nn.Module], optimizer, transfer) -> None:
    """Put the `new` modules in place; each new parameter takes its predecessor's optimizer slot."""
    old = {name: model.get_submodule(name) for name in new}
    replace_modules(model, None, lambda n, m: new.get(n), what="gradmax")
    pairs = [(getattr(old[n], attr), getattr(new[n], attr)) for n in new for attr in ("weight", "bias")
             if getattr(old[n], attr) is not None]
    swap_parameters(optimizer, pairs, None if transfer is None else lambda i, v: transfer(v, pairs[i][1].shape))


def _use_grow_relu(model: nn.Module, pairs: list) -> None:
    """Swap torch ReLUs between grown layers for `GrowReLU` (same forward, derivative 1 at 0): new
    units sit at pre-activation 0, and with derivative 0 there their fan-in would never learn."""
    relus = dict.fromkeys(b for pair in pairs for b in pair.between if type(model.get_submodule(b)) is nn.ReLU)
    if relus:
        replace_modules(model, None, lambda n, m: GrowReLU(m.inplace) if n in relus else None, what="gradmax")


def _random_directions(k: int, p: int, generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(k, p, generator=generator, dtype=torch.float32).to(like)
