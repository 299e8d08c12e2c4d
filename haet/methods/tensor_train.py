"""Rank-adaptive, low-precision tensor-train layers.

Paper: K. Zhang, C. Hawkins, X. Zhang, C. Hao, Z. Zhang, "On-FPGA Training with Ultra Memory
Reduction: A Low-Precision Tensor Method", ICLR 2021 workshop on Hardware Aware Efficient
Training (HAET). Their claim: 292× less memory than full-size training. Their rank-shrinking
prior: C. Hawkins, Z. Zhang, "Bayesian tensorized neural networks with automatic rank selection",
Neurocomputing 2021.

Each eligible ``nn.Linear`` becomes a `haet.layers.TensorTrainLinear` (TT-matrix cores, trained
from scratch with nn.Linear's weight variance, or initialized from the dense weight by TT-SVD, then
put in TT-canonical form, W unchanged), starting from a generous rank. Rank-shrinking prior, per
rank slice (the paper's ARD prior, as a MAP estimate): slice j of internal edge k has a variance
λ_kj; core k's entry G_k[a, ·, ·, b] has the Gaussian prior N(0, λ_{k−1,a} λ_{k,b}) (λ_0 = λ_d = 1)
and each slice's standard deviation √λ_kj a half-Cauchy(0, η) hyperprior. The λ are learned
jointly with the cores: after each optimizer step every λ_kj is set to its maximizer given the
cores (a closed-form root, `update_rank_scales_`), then the cores take the prior's proximal step
(`shrink_rank_slices_`): each slice's norm shrinks by lr·``prior_weight``·(w_j − 1)·‖g_max‖ with
w_j = √(λ_max/λ_kj), the reweighted group-ℓ1 step by which ARD's objective is minimized (Wipf &
Nagarajan 2007); the edge's strongest slice is not shrunk (the scale of W is left to the data),
weaker ones the more the weaker they are, so a slice that stops carrying signal collapses. At each
epoch end, slices with λ_kj < ``prune_threshold`` × max_j λ_kj are removed (`prune_rank_slices`):
the two cores they join are truncated, W loses exactly their terms, and the optimizer state of the
kept entries is kept (the basis does not change). Low precision: the cores are fake-quantized to
``bits`` bits in the forward (straight-through gradients); the master cores, their gradients and
the optimizer state are float32.

Functional form::

    names = apply_tensor_train(model, TensorTrainConfig(rank=16), optimizer=opt)
    opt.step(); update_rank_scales_(model); shrink_rank_slices_(model, lr * prior_weight)  # each step
    prune_rank_slices(model, threshold=1e-2, optimizer=opt)                                # each epoch
    tt_memory(model, opt)   # training-state bytes, converted layers and whole model, dense vs TT
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from ..core.config import check_choice, check_range
from ..core.errors import ConfigError
from ..core.method import Method
from ..core.surgery import replace_modules
from ..layers.tensor_train import TensorTrainLinear, full_ranks, tt_modes
from ._param_state import swap_parameters


@dataclass(frozen=True)
class TensorTrainConfig:
    rank: int = 16                 # initial TT rank of each internal edge (clipped to the full rank); the prior shrinks it
    cores: int = 3                 # TT cores per layer: in/out features each factored into this many modes
    bits: int = 8                  # cores fake-quantized to this many bits in the forward (paper: 4 or 8); 32 = off
    init: Literal["random", "svd"] = "random"  # random: from scratch; svd: TT-SVD of the dense weights
    prior_weight: float = 2.0      # ρ of the prior's proximal step, learning rates per step; 0 = fixed ranks
    #                                (digits MLP, 6 epochs: 2 removed 6 of 64 slices at −1.1 pt; 10 cost 11 pt)
    prior_scale: float = 1.0       # η of each slice's half-Cauchy(0, η) hyperprior on its standard deviation
    prune_threshold: float = 1e-2  # at epoch ends remove slices with λ < this × the edge's largest (1/10 of its scale)
    min_params: int = 4096         # dense layers with fewer weights (in × out) stay dense: too small to pay
    classifier: Literal["auto", "tt", "dense"] = "auto"  # the last Linear; auto: dense unless it is the only one

    def __post_init__(self) -> None:
        check_range("rank", self.rank, 1, 4096, integer=True)
        check_range("cores", self.cores, 2, 8, integer=True)
        check_choice("bits", self.bits, (2, 4, 8, 16, 32))
        check_choice("init", self.init, ("random", "svd"))
        check_range("prior_weight", self.prior_weight, 0, None)
        check_range("prior_scale", self.prior_scale, 0, None, lo_open=True)
        check_range("prune_threshold", self.prune_threshold, 0, 1, hi_open=True)
        check_range("min_params", self.min_params, 1, None, integer=True)
        check_choice("classifier", self.classifier, ("auto", "tt", "dense"))


def apply_tensor_train(model: nn.Module, config: TensorTrainConfig | None = None, *,
                       optimizer: torch.optim.Optimizer | None = None,
                       filter_fn: Callable[[str, nn.Linear], bool] | None = None) -> list[str]:
    """Replace eligible ``nn.Linear`` layers of `model` by `TensorTrainLinear`; returns their names.

    Eligible: exactly ``nn.Linear`` (subclasses such as attention's out_proj are left alone), where
    ``filter_fn(name, module)`` is true, and whose TT form at ``config.rank`` has fewer parameters
    than the dense layer. The default filter takes layers with at least ``config.min_params``
    weights, and the model's last Linear (the classifier) as ``config.classifier`` says: "tt",
    "dense", or "auto" = dense when another layer is converted (its few outputs factor badly: on
    the mnist5k MLP, converting it cost 5 points of accuracy), else TT. `optimizer` is kept in step
    by `replace_modules`. Raises ConfigError when no layer would be converted (nothing would change).
    """
    c = config or TensorTrainConfig()
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    if filter_fn is None:
        big = [n for n, m in linears if m.in_features * m.out_features >= c.min_params]
        last = {n for n, _ in linears[-1:]}
        skip = last if c.classifier == "dense" or (c.classifier == "auto" and set(big) - last) else set()

        def filter_fn(name, m):
            return name in big and name not in skip

    candidates = {n: m for n, m in linears if filter_fn(n, m)}
    bits = None if c.bits == 32 else c.bits
    layers = {}
    for name, module in candidates.items():
        in_modes, out_modes = tt_modes(module.in_features, c.cores), tt_modes(module.out_features, c.cores)
        ranks = [min(c.rank, f) for f in full_ranks(in_modes, out_modes)]
        if _tt_numel(in_modes, out_modes, ranks) >= module.in_features * module.out_features:
            continue  # the TT form would not be smaller
        if c.init == "svd":
            layers[name] = TensorTrainLinear.from_linear(module, in_modes, out_modes, ranks, bits=bits)
        else:
            layers[name] = TensorTrainLinear(in_modes, out_modes, ranks, bits=bits, bias=module.bias is not None)
            layers[name].to(device=module.weight.device, dtype=module.weight.dtype)
    if not layers:
        why = (f"at rank {c.rank} with {c.cores} cores no candidate ({', '.join(candidates)}) has fewer weights in "
               "TT form than dense; lower rank or raise cores" if candidates else
               f"it has no nn.Linear with at least min_params={c.min_params} weights the filter accepts "
               f"(Linears: {', '.join(n for n, _ in linears) or 'none'}; classifier={c.classifier!r})")
        raise ConfigError(f"tensor_train would change nothing in this model: {why}")
    for layer in layers.values():
        layer.canonicalize_()  # slices = the edges' singular directions, so their scales differ from the start
    return replace_modules(model, optimizer, lambda n, m: layers.get(n), what="tensor_train")


@torch.no_grad()
def update_rank_scales_(model: nn.Module, prior_scale: float = 1.0) -> None:
    """Set every slice variance λ_kj of the TT layers to its maximizer given the cores.

    For edge k, s_j = Σ_a ‖G_k[a,·,·,j]‖²/λ_{k−1,a} + Σ_b ‖G_{k+1}[j,·,·,b]‖²/λ_{k+1,b} and n_j the
    entries of the two slices; maximizing −s/(2λ) − (n/2) log λ − log(1 + λ/η²) (half-Cauchy on √λ)
    gives the positive root of (n+2) λ² + (nη² − s) λ − sη² = 0. Edges are updated left to right.
    """
    eta2 = prior_scale ** 2
    for layer in _tt_layers(model).values():
        scales = [torch.ones(1, device=layer.cores[0].device)] + layer.rank_scales() + \
            [torch.ones(1, device=layer.cores[0].device)]
        for k in range(len(layer.cores) - 1):
            left, right = layer.cores[k].detach().double(), layer.cores[k + 1].detach().double()
            s = (left ** 2 / scales[k].double()[:, None, None, None]).sum((0, 1, 2)) + \
                (right ** 2 / scales[k + 2].double()[None, None, None, :]).sum((1, 2, 3))
            n = left[..., 0].numel() + right[0].numel()
            b = n * eta2 - s
            root = torch.sqrt(b ** 2 + 4 * (n + 2) * s * eta2)
            lam = torch.where(b > 0, 2 * s * eta2 / (b + root), (root - b) / (2 * (n + 2)))
            scales[k + 1].copy_(lam.clamp_min(1e-12 * float(lam.max())))  # a floor: it divides the next edge's sums


@torch.no_grad()
def shrink_rank_slices_(model: nn.Module, t: float) -> None:
    """The prior's proximal step: shrink every rank slice's norm by t × its ARD weight.

    Slice j of edge k is g = (G_k[..., j], G_{k+1}[j, ...]); with the edge's current variances λ_k
    (`update_rank_scales_`), g ← g · max(0, 1 − t·‖g_max‖·(w_j − 1) / ‖g‖), w_j = √(λ_max / λ_kj):
    the prox of a group-ℓ1 penalty with weights w_j − 1, the reweighted step by which ARD's
    objective is minimized (Wipf & Nagarajan, NeurIPS 2007). The edge's strongest slice (w = 1) is
    not shrunk, weaker ones the more the weaker they are; a slice pushed past zero is exactly zero
    (its λ then falls to the floor and `prune_rank_slices` removes it).
    """
    for layer in _tt_layers(model).values():
        for k, lam in enumerate(layer.rank_scales()):
            left, right = layer.cores[k], layer.cores[k + 1]
            norms = (left.square().sum((0, 1, 2)) + right.square().sum((1, 2, 3))).sqrt()
            weight = (lam.max() / lam.clamp_min(1e-30)).sqrt()
            factor = (1 - t * norms.max() * (weight - 1) / norms.clamp_min(1e-30)).clamp_min(0)
            left.mul_(factor[None, None, None, :])
            right.mul_(factor[:, None, None, None])


@torch.no_grad()
def prune_rank_slices(model: nn.Module, threshold: float,
                      optimizer: torch.optim.Optimizer | None = None) -> dict[str, tuple[int, ...]]:
    """Remove, at every internal edge of every TT layer, the slices with λ < threshold × max λ.

    Returns the new ranks of the layers that changed. The kept entries keep their optimizer state
    (sliced like the cores): removing a slice does not change the basis of the others.
    """
    changed: dict[str, tuple[int, ...]] = {}
    for name, layer in _tt_layers(model).items():
        for k, lam in enumerate(layer.rank_scales()):
            keep = torch.nonzero(lam >= threshold * lam.max()).flatten()
            if len(keep) == len(lam):
                continue
            pairs = layer.keep_slices(k, keep)
            swap_parameters(optimizer, pairs, lambda i, t, k=keep: t.index_select(3 if i == 0 else 0, k.to(t.device)))
            changed[name] = layer.ranks
    return changed


def tt_memory(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, bits: int = 32) -> dict[str, float]:
    """Training-state bytes (parameters and buffers, gradients, optimizer state) of the converted
    layers and of the whole model, against the same with the dense layers they replaced.

    ``memory_ratio_layers`` = dense layers / TT layers; ``memory_ratio_model`` = dense model / this
    model (every other layer counted alike on both sides). Gradients: one per trainable element.
    The dense optimizer state is the optimizer's per-parameter layout (per-element slots and scalars,
    read from its state for the cores) applied to the dense weight and bias; 0 before the first step.
    ``quantized_param_bytes``: the cores at `bits` bits plus one float scale per core (what a device
    storing them so would hold; this implementation keeps float32 master cores).
    """
    out = dict.fromkeys(("param_bytes", "grad_bytes", "optimizer_bytes",
                         "dense_param_bytes", "dense_grad_bytes", "dense_optimizer_bytes"), 0)
    quantized = 0.0
    for layer in _tt_layers(model).values():
        params = list(layer.parameters())
        size = params[0].element_size()
        slots, scalar_bytes = _state_layout(optimizer, params[0])
        dense = [layer.in_features * layer.out_features] + ([layer.out_features] if layer.bias is not None else [])
        out["param_bytes"] += sum(t.numel() * t.element_size() for t in [*params, *layer.buffers()])
        out["grad_bytes"] += sum(p.numel() * size for p in params if p.requires_grad)
        out["optimizer_bytes"] += sum(_state_bytes(optimizer, p) for p in params)
        out["dense_param_bytes"] += sum(dense) * size
        out["dense_grad_bytes"] += sum(dense) * size
        out["dense_optimizer_bytes"] += sum(n * size * slots + scalar_bytes for n in dense)
        quantized += sum(c.numel() for c in layer.cores) * bits / 8 + 4 * len(layer.cores) + \
            (layer.bias.numel() * size if layer.bias is not None else 0)
    layers = out["param_bytes"] + out["grad_bytes"] + out["optimizer_bytes"]
    dense = out["dense_param_bytes"] + out["dense_grad_bytes"] + out["dense_optimizer_bytes"]
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) + \
        sum(p.numel() * p.element_size() + _state_bytes(optimizer, p) for p in model.parameters() if p.requires_grad)
    out.update(memory_ratio_layers=dense / layers if layers else 0.0, model_bytes=model_bytes,
               dense_model_bytes=model_bytes - layers + dense,
               memory_ratio_model=(model_bytes - layers + dense) / model_bytes if model_bytes else 0.0)
    if bits < 32:
        out["quantized_param_bytes"] = quantized
    return out


class TensorTrain(Method):
    name = "tensor_train"
    summary = "tensor-train Linear layers: ranks shrink under a per-slice prior, fake-quantized low-precision cores"
    paper = ("Zhang, Hawkins, Zhang, Hao, Zhang, On-FPGA Training with Ultra Memory Reduction: "
             "A Low-Precision Tensor Method (ICLR 2021 HAET workshop)")
    config_class = TensorTrainConfig
    owns = frozenset({"weight_format", "layer_types"})

    def __init__(self, config: TensorTrainConfig | None = None, /, **params) -> None:
        super().__init__(config, **params)
        self.converted: list[str] = []
        self.initial_ranks: dict[str, list[int]] = {}
        self._model: nn.Module | None = None
        self._optimizer = None

    def fit_start(self, state) -> None:
        if state.world_size > 1 and self.config.prune_threshold > 0:
            raise ConfigError("tensor_train: rank pruning changes parameter shapes, which DistributedDataParallel "
                              "cannot follow; use prune_threshold=0 with torchrun")
        self._model, self._optimizer = state.unwrapped_model, state.optimizer
        self.converted = apply_tensor_train(self._model, self.config, optimizer=state.optimizer)
        state.model_version += 1
        self.initial_ranks = self._ranks()

    def after_step(self, state) -> None:
        if self.config.prior_weight > 0:
            update_rank_scales_(self._model, self.config.prior_scale)
            lr = next((g["lr"] for g in state.optimizer.param_groups if "lr" in g), 1e-3)
            shrink_rank_slices_(self._model, lr * self.config.prior_weight)
            # ~6 operations per core entry and edge for λ's sums, 4 for the norms and the scaling
            entries = sum(c.numel() for m in _tt_layers(self._model).values() for c in m.cores)
            state.charge(flops=20 * entries, what="tensor_train/prior_step")

    def epoch_end(self, state) -> None:
        if self.config.prune_threshold > 0 and self.config.prior_weight > 0:
            if prune_rank_slices(self._model, self.config.prune_threshold, state.optimizer):
                state.model_version += 1

    def epoch_metrics(self) -> dict:
        ranks = self._ranks()
        out = {f"tensor_train/ranks/{name}": r for name, r in ranks.items()}
        out["tensor_train/rank_total"] = sum(sum(r) for r in ranks.values())
        out["tensor_train/memory_ratio_layers"] = tt_memory(self._model, self._optimizer)["memory_ratio_layers"]
        return out

    def metrics(self) -> dict:
        if self._model is None:
            return {}
        out = {f"tensor_train/{k}": v for k, v in tt_memory(self._model, self._optimizer, self.config.bits).items()}
        out["tensor_train/layers"] = len(self.converted)
        out["tensor_train/ranks"] = {name: {"initial": self.initial_ranks.get(name), "final": r}
                                     for name, r in self._ranks().items()}
        return out

    def state_dict(self) -> dict:
        return {"ranks": self._ranks(), "initial_ranks": dict(self.initial_ranks)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Cut the freshly converted layers to the saved ranks, before the model's weights load."""
        layers = _tt_layers(self._model)
        for name, ranks in state_dict["ranks"].items():
            swap_parameters(self._optimizer, layers[name].keep_ranks(ranks), None)
        self.initial_ranks = {k: list(v) for k, v in state_dict["initial_ranks"].items()}

    def _ranks(self) -> dict[str, list[int]]:
        return {name: list(m.ranks) for name, m in _tt_layers(self._model).items()} if self._model else {}


def _tt_layers(model: nn.Module) -> dict[str, TensorTrainLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, TensorTrainLinear)}


def _tt_numel(in_modes, out_modes, ranks) -> int:
    bounds = [1, *ranks, 1]
    return sum(bounds[k] * m * n * bounds[k + 1] for k, (m, n) in enumerate(zip(in_modes, out_modes)))


def _state_layout(optimizer, param) -> tuple[int, int]:
    """(per-element state tensors, bytes of scalar state) that `optimizer` keeps for `param`."""
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    slots = sum(1 for v in tensors if v.shape == param.shape)
    return slots, sum(v.numel() * v.element_size() for v in tensors if v.shape != param.shape)


def _state_bytes(optimizer, param) -> int:
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
