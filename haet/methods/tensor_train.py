"""Rank-adaptive, low-precision tensor-train layers.

Paper: K. Zhang, C. Hawkins, X. Zhang, C. Hao, Z. Zhang, "On-FPGA Training with Ultra Memory
Reduction: A Low-Precision Tensor Method", ICLR 2021 workshop on Hardware Aware Efficient
Training (HAET). Their claim: 292× less memory than full-size training.

Each eligible ``nn.Linear`` becomes a `haet.layers.TensorTrainLinear` (TT-matrix cores, trained
from scratch with nn.Linear's weight variance, or initialized from the dense weight by TT-SVD).
Ranks adapt during training, in the spirit of the paper's low-rank prior: a Gaussian prior on the
cores, λ Σ_k ‖G_k‖² added to the loss, which for a product of factors is a low-rank-promoting
penalty (min over factorizations W = AB of (‖A‖² + ‖B‖²)/2 is W's nuclear norm), and at each
epoch end TT-rounding drops the directions of each edge whose singular value is below
``prune_threshold`` × the edge's largest (the error this causes in W is the dropped singular
values, exactly). A layer whose ranks drop gets rounded, norm-balanced cores and fresh optimizer
state for them. Cores are fake-quantized to ``bits`` bits (straight-through gradients).

Functional form::

    names = apply_tensor_train(model, ranks=8, filter_fn=None, cores=3, bits=8, optimizer=opt)
    loss = loss + rank_decay * tt_rank_penalty(model)
    prune_tt_ranks(model, threshold=0.1, optimizer=opt)
    tt_memory(model, opt)   # bytes of params, grads, optimizer state: dense vs TT, and the ratio
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from torch import nn

from ..core.config import check_choice, check_range
from ..core.errors import ConfigError
from ..core.method import Method
from ..core.surgery import replace_modules
from ..layers.tensor_train import TensorTrainLinear, tt_modes
from ._param_state import swap_parameters


@dataclass(frozen=True)
class TensorTrainConfig:
    rank: int = 8                  # initial TT rank of every internal edge (clipped to the exact, full rank)
    cores: int = 3                 # TT cores per layer: in/out features each factored into this many modes
    bits: int = 8                  # cores fake-quantized to this many bits (4 or 8 as in the paper); 32 = float32
    init: Literal["random", "svd"] = "random"  # random: from scratch; svd: TT-SVD of the dense weights
    rank_decay: float = 1e-4       # λ of the core prior λ·Σ‖G_k‖² (loss units); 1e-4 cost no accuracy on the MLP
    prune_threshold: float = 0.1   # drop edge directions with σ < this × σ_max at epoch end; 0 = fixed ranks
    min_params: int = 4096         # dense layers with fewer weights (in × out) stay dense: too small to pay
    classifier: Literal["auto", "tt", "dense"] = "auto"  # the last Linear; auto: dense unless it is the only one

    def __post_init__(self) -> None:
        check_range("rank", self.rank, 1, 4096, integer=True)
        check_range("cores", self.cores, 2, 8, integer=True)
        check_choice("bits", self.bits, (2, 4, 8, 16, 32))
        check_choice("init", self.init, ("random", "svd"))
        check_range("rank_decay", self.rank_decay, 0, None)
        check_range("prune_threshold", self.prune_threshold, 0, 1, hi_open=True)
        check_range("min_params", self.min_params, 1, None, integer=True)
        check_choice("classifier", self.classifier, ("auto", "tt", "dense"))


def apply_tensor_train(model: nn.Module, ranks: int | Sequence[int] = 8,
                       filter_fn: Callable[[str, nn.Linear], bool] | None = None, *, cores: int = 3,
                       bits: int | None = None, init: str = "random", optimizer: torch.optim.Optimizer | None = None,
                       state=None, min_params: int = 4096, classifier: str = "auto") -> list[str]:
    """Replace eligible ``nn.Linear`` layers of `model` by `TensorTrainLinear`; returns their names.

    Eligible: exactly ``nn.Linear`` (subclasses such as attention's out_proj are left alone), where
    ``filter_fn(name, module)`` is true, and whose TT form at `ranks` has fewer parameters than
    the dense layer. The default filter takes layers with at least `min_params` weights, and the
    model's last Linear (the classifier) as `classifier` says: "tt", "dense", or "auto" = dense
    when another layer is converted (its few outputs factor badly: on the mnist5k MLP, converting
    it cost 5 points of accuracy), else TT. `optimizer` (and the Trainer `state`, so meters
    re-measure) are kept in step by `replace_modules`.
    """
    check_choice("init", init, ("random", "svd"))
    check_choice("classifier", classifier, ("auto", "tt", "dense"))
    if filter_fn is None:
        linears = [n for n, m in model.named_modules() if type(m) is nn.Linear and
                   m.in_features * m.out_features >= min_params]
        last = [n for n, m in model.named_modules() if type(m) is nn.Linear][-1:]
        skip = set(last) if classifier == "dense" or (classifier == "auto" and set(linears) - set(last)) else set()

        def filter_fn(name, m):
            return name in linears and name not in skip

    def make(name: str, module: nn.Module):
        if type(module) is not nn.Linear or not filter_fn(name, module):
            return None
        in_modes, out_modes = tt_modes(module.in_features, cores), tt_modes(module.out_features, cores)
        if init == "svd":
            layer = TensorTrainLinear.from_linear(module, in_modes, out_modes, ranks, bits=bits)
        else:
            layer = TensorTrainLinear(in_modes, out_modes, ranks, bits=bits, bias=module.bias is not None)
            layer.to(device=module.weight.device, dtype=module.weight.dtype)
        dense = module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
        return layer if _numel(layer) < dense else None

    return replace_modules(model, optimizer, make, what="tensor_train", state=state)


def tt_rank_penalty(model: nn.Module) -> torch.Tensor:
    """Σ over the TT layers' cores of ‖G_k‖² (the low-rank-promoting Gaussian prior)."""
    terms = [(core ** 2).sum() for m in _tt_layers(model).values() for core in m.cores]
    return torch.stack(terms).sum() if terms else torch.zeros(())


@torch.no_grad()
def prune_tt_ranks(model: nn.Module, threshold: float, optimizer: torch.optim.Optimizer | None = None,
                   state=None) -> dict[str, tuple[int, ...]]:
    """TT-round every TT layer, dropping edge directions with σ < threshold × σ_max.

    Returns the new ranks of the layers that changed; their cores get fresh optimizer state
    (the rounded cores are a new basis, in which old moments mean nothing).
    """
    changed: dict[str, tuple[int, ...]] = {}
    for name, layer in _tt_layers(model).items():
        pairs = layer.round_ranks(threshold)
        if pairs:
            swap_parameters(optimizer, pairs, None)
            changed[name] = layer.ranks
    if changed and state is not None:
        state.model_version += 1
    return changed


def tt_memory(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
    """Training-state bytes of the TT layers (parameters, gradients, optimizer state) and of the
    dense layers they replaced, and ``memory_ratio`` = dense total / TT total.

    Gradients: one per trainable element (what backward holds). The dense optimizer state is the
    optimizer's per-parameter layout (per-element slots and scalars, read from its state for the
    cores) applied to the dense weight and bias; before the first step both are 0.
    """
    out = dict.fromkeys(("param_bytes", "grad_bytes", "optimizer_bytes",
                         "dense_param_bytes", "dense_grad_bytes", "dense_optimizer_bytes"), 0)
    for layer in _tt_layers(model).values():
        params = [p for p in layer.parameters()]
        size = params[0].element_size()
        slots, scalar_bytes = _state_layout(optimizer, params[0])
        dense = [layer.in_features * layer.out_features] + ([layer.out_features] if layer.bias is not None else [])
        out["param_bytes"] += sum(p.numel() * size for p in params)
        out["grad_bytes"] += sum(p.numel() * size for p in params if p.requires_grad)
        out["optimizer_bytes"] += sum(_state_bytes(optimizer, p) for p in params)
        out["dense_param_bytes"] += sum(dense) * size
        out["dense_grad_bytes"] += sum(dense) * size
        out["dense_optimizer_bytes"] += sum(n * size * slots + scalar_bytes for n in dense)
    tt_total = out["param_bytes"] + out["grad_bytes"] + out["optimizer_bytes"]
    dense_total = out["dense_param_bytes"] + out["dense_grad_bytes"] + out["dense_optimizer_bytes"]
    out["memory_ratio"] = dense_total / tt_total if tt_total else 0.0
    return out


class TensorTrain(Method):
    name = "tensor_train"
    summary = "tensor-train Linear layers: rank-adaptive (TT-rounding), fake-quantized low-precision cores"
    paper = ("Zhang, Hawkins, Zhang, Hao, Zhang, On-FPGA Training with Ultra Memory Reduction: "
             "A Low-Precision Tensor Method (ICLR 2021 HAET workshop)")
    config_class = TensorTrainConfig
    owns = frozenset({"weight_format", "layer_types"})

    def __init__(self, config: TensorTrainConfig | None = None, /, **params) -> None:
        super().__init__(config, **params)
        self.converted: list[str] = []
        self.rank_history: list[dict[str, list[int]]] = []
        self._model: nn.Module | None = None
        self._optimizer = None

    def fit_start(self, state) -> None:
        c = self.config
        if state.world_size > 1 and c.prune_threshold > 0:
            raise ConfigError("tensor_train: rank pruning changes parameter shapes, which DistributedDataParallel "
                              "cannot follow; use prune_threshold=0 with torchrun")
        self._model, self._optimizer = state.unwrapped_model, state.optimizer
        self.converted = apply_tensor_train(self._model, c.rank, cores=c.cores, bits=None if c.bits == 32 else c.bits,
                                            init=c.init, optimizer=state.optimizer, state=state,
                                            min_params=c.min_params, classifier=c.classifier)

    def after_forward(self, state) -> None:
        if self.config.rank_decay > 0 and self.converted:
            state.loss = state.loss + self.config.rank_decay * tt_rank_penalty(self._model)

    def epoch_end(self, state) -> None:
        if self.config.prune_threshold > 0 and self.converted:
            prune_tt_ranks(self._model, self.config.prune_threshold, state.optimizer, state=state)
        self.rank_history.append(self._ranks())

    def epoch_metrics(self) -> dict:
        ranks = self._ranks()
        out = {f"tt/ranks/{name}": r for name, r in ranks.items()}
        out["tt/rank_total"] = sum(sum(r) for r in ranks.values())
        out["tt/memory_ratio"] = tt_memory(self._model, self._optimizer)["memory_ratio"] if self._model else 0.0
        return out

    def metrics(self) -> dict:
        if self._model is None:
            return {}
        out = {f"tt/{k}": v for k, v in tt_memory(self._model, self._optimizer).items()}
        out["tt/layers"] = len(self.converted)
        out.update({f"tt/ranks/{name}": r for name, r in self._ranks().items()})
        if self.config.bits != 32:  # what a device storing the cores at `bits` bits would hold
            out["tt/quantized_param_bytes"] = sum(
                sum(c.numel() for c in m.cores) * self.config.bits / 8 + 4 * len(m.cores)
                + (m.bias.numel() * m.bias.element_size() if m.bias is not None else 0)
                for m in _tt_layers(self._model).values())
        return out

    def state_dict(self) -> dict:
        return {"ranks": self._ranks(), "rank_history": list(self.rank_history)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Cut the freshly converted layers to the saved ranks, before the model's weights load."""
        layers = _tt_layers(self._model)
        for name, ranks in state_dict["ranks"].items():
            swap_parameters(self._optimizer, layers[name].keep_ranks(ranks), None)
        self.rank_history = [dict(h) for h in state_dict["rank_history"]]

    def _ranks(self) -> dict[str, list[int]]:
        return {name: list(m.ranks) for name, m in _tt_layers(self._model).items()} if self._model else {}


def _tt_layers(model: nn.Module) -> dict[str, TensorTrainLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, TensorTrainLinear)}


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _state_layout(optimizer, param) -> tuple[int, int]:
    """(per-element state tensors, bytes of scalar state) that `optimizer` keeps for `param`."""
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    slots = sum(1 for v in tensors if v.shape == param.shape)
    return slots, sum(v.numel() * v.element_size() for v in tensors if v.shape != param.shape)


def _state_bytes(optimizer, param) -> int:
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
