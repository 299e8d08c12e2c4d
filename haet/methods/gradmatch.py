"""GRAD-MATCH subset selection, and the adaptive random subset it is compared with.

Killamsetty, Sivasubramanian, Ramakrishnan, De, Iyer, "GRAD-MATCH: Gradient Matching based Data
Subset Selection for Efficient Deep Model Training", ICML 2021 (HAET 2021 workshop).

Every `select_every` epochs, choose a subset S of the training data (a `fraction` of it) and
weights w ≥ 0 so that the weighted subset's gradient matches the full training (or a held-out
validation) gradient: minimize ``‖Σ_S wᵢ ∇Lᵢ − ∇L_target‖² + λ‖w‖²`` by orthogonal matching pursuit
(OMP) on last-layer gradients, then train on the subset with the weighted loss
``Σ wᵢ·lossᵢ / Σ wᵢ``. The per-example gradients are never built: their Gram matrices come in closed
form from the final layer's input and the logit gradients (`_gradmatch_ops`), and OMP runs for all
classes at once. The per-batch variant (``per_batch=True``) selects whole mini-batches.

`RandomSubset` draws a fresh uniform random subset of the same size at each selection (the
paper's "random-online" baseline); full data is the plain baseline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..core.config import check_choice, check_range
from ..core.errors import ConfigError
from ..core.method import Method
from ..data.loader import Loader, TensorData, as_tensor_data
from . import _gradmatch_ops as ops


@dataclass(frozen=True)
class GradMatchConfig:
    fraction: float = 0.3        # share of the training samples kept at each selection, in (0, 1): 1 would keep all
    select_every: int = 5        # epochs between selections; a CPU selection costs ~20-30% of an epoch
    warm_fraction: float = 0.0   # share of the epochs trained on all data before the first selection
    per_batch: bool = False      # select whole mini-batches (GRAD-MATCH-PB): coarser, much cheaper OMP
    lam: float = 0.5             # ridge weight, × a pool's mean squared per-sample gradient norm (CORDS's λ is absolute)
    target: Literal["train", "valid"] = "train"  # match the training gradient or a held-out one
    valid_fraction: float = 0.1  # with target="valid": share of the training data held out as target
    #: arithmetic of the selection's forward pass; "auto": bfloat16 where the hardware has it (AVX512-BF16
    #: CPUs, recent GPUs; about 2× faster here), else float32. Gram matrices and OMP stay float32.
    selection_dtype: Literal["auto", "float32", "bfloat16"] = "auto"

    def __post_init__(self) -> None:
        _check_fraction("gradmatch", self.fraction)
        check_range("fraction", self.fraction, 0, 1, lo_open=True, hi_open=True)
        check_range("select_every", self.select_every, 1, None, integer=True)
        check_range("warm_fraction", self.warm_fraction, 0, 1, hi_open=True)
        check_choice("per_batch", self.per_batch, (True, False))
        check_range("lam", self.lam, 0, None)
        check_choice("target", self.target, ("train", "valid"))
        check_range("valid_fraction", self.valid_fraction, 0, 1, lo_open=True, hi_open=True)
        check_choice("selection_dtype", self.selection_dtype, ("auto", "float32", "bfloat16"))


@dataclass(frozen=True)
class RandomSubsetConfig:
    fraction: float = 0.3        # share of the training samples kept at each selection, in (0, 1): 1 would keep all
    select_every: int = 5        # epochs between fresh draws (the same schedule as gradmatch's)

    def __post_init__(self) -> None:
        _check_fraction("random_subset", self.fraction)
        check_range("fraction", self.fraction, 0, 1, lo_open=True, hi_open=True)
        check_range("select_every", self.select_every, 1, None, integer=True)


def grad_match_select(model: nn.Module, data: TensorData | tuple, fraction: float, *, lam: float = 0.5,
                      per_batch: bool = False, batch_size: int = 64, target_data: TensorData | tuple | None = None,
                      candidates: torch.Tensor | None = None, pool_size: int = 1024, loss_fn=None,
                      bfloat16: bool | None = None, seed: int = 0,
                      info: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``round(fraction·N)`` samples of `data` (or whole batches of `batch_size` when
    `per_batch`) and weights ≥ 0 whose weighted last-layer gradient matches that of all of `data`
    (or of `target_data`, scaled to the same number of samples).

    Selection is per class (each class matches its own gradient with its share of the budget;
    classes larger than `pool_size` are split into random pools). `lam` is relative: the ridge
    weight of a pool is ``lam · mean ‖∇ᵢ‖²`` over its candidates (CORDS's λ is absolute; see the
    card). `candidates` restricts the choice to those indices of `data`. The forward pass runs in
    bfloat16 when `bfloat16` (None: where the hardware computes it natively).

    Returns (indices into `data`, weights). The weights are OMP's non-negative least-squares
    coefficients: the weighted sum ``Σ wᵢ∇ᵢ`` approximates the target's *summed* gradient, but
    nothing constrains ``Σ wᵢ`` (the ridge term shrinks it, and a sample pointing along the target
    gets a large weight); the Trainer divides each batch's weighted loss by its ``Σ wᵢ``, so only
    the weights' ratios within a batch matter there. When `info` is a dict it receives
    ``match_error``, ``‖Σwᵢ∇ᵢ − T‖/‖T‖`` against the full target T (the summed last-layer gradient
    of all candidates, or of `target_data` scaled by candidates/held-out samples; not the per-class
    pools OMP solves), and ``flops_by_dtype`` (the selection's forward pass in its arithmetic;
    Gram matrices, OMP and the error in float32).
    """
    x, y = (data.x, data.y) if isinstance(data, TensorData) else data
    if candidates is None:
        candidates = torch.arange(len(x))
    device = next(model.parameters()).device
    if bfloat16 is None:
        bfloat16 = ops.bfloat16_is_native(device)
    H, G, forward_flops = ops.last_layer_features(model, x[candidates].to(device), y[candidates].to(device),
                                                  loss_fn, bfloat16=bfloat16)  # H = [h, 1]: bias too
    gen = torch.Generator().manual_seed(seed)
    labels = y[candidates] if y.dtype == torch.long and y.dim() == 1 else None
    if per_batch:  # candidates are the mini-batches of a random partition; their gradients are summed
        members = list(torch.split(torch.randperm(len(H), generator=gen), batch_size))
        A = torch.stack([G[m].T @ H[m] for m in members]).flatten(1)
        K, pools = (A @ A.T)[None], torch.arange(len(members))[None]
        budget = torch.tensor([max(1, round(fraction * len(members)))])
        flops = 2.0 * len(H) * A.shape[1] + 2.0 * len(A) ** 2 * A.shape[1]
    else:  # candidates are samples, matched class by class
        pools = ops.make_pools(labels, len(H), pool_size, gen)
        Hp, Gp = ops.gather_pools(H, G, pools)
        K = ops.pool_gram(Hp, Gp)
        budget = ops.pool_budgets((pools >= 0).sum(1), fraction)
        flops = ops.gram_flops(pools, H.shape[1], G.shape[1])
    if target_data is None:  # each pool matches its own summed gradient T: ⟨∇ᵢ, T⟩ = Σⱼ Kᵢⱼ
        c, bb = K.sum(2), K.sum((1, 2))
        full_target = G.T @ H                                   # Σᵢ gᵢ h̃ᵢᵀ over all candidates
    else:
        sizes = torch.tensor([len(H)]) if per_batch else (pools >= 0).sum(1)
        pool_labels = None if per_batch or labels is None else labels[pools[:, 0]]
        M, full_target, valid_flops = _valid_targets(model, target_data, pool_labels, sizes, len(H), loss_fn,
                                                     device, bfloat16)
        c = (A @ M[0].flatten())[None] if per_batch else (torch.bmm(Gp, M) * Hp).sum(-1)
        bb = (M * M).sum((1, 2))
        forward_flops += valid_flops
    diag = torch.diagonal(K, dim1=1, dim2=2)
    n_valid = (diag > 0).sum(1).clamp(min=1)
    lam_abs = lam * diag.sum(1) / n_valid
    sel, w, omp_flops = ops.omp_gram(K, c, budget, lam=lam_abs, valid=diag > 0, bb=bb)
    keep = (sel >= 0) & (w > 0)
    chosen = torch.gather(pools, 1, sel.clamp(min=0))[keep]
    weights = w[keep]
    if per_batch:  # every sample of a chosen batch carries the batch's weight
        weights = weights.repeat_interleave(torch.tensor([len(members[i]) for i in chosen.tolist()]))
        chosen = torch.cat([members[i] for i in chosen.tolist()])
    if info is not None:  # the error of the whole subset against the whole target, not pool by pool
        local = chosen.to(H.device)
        matched = (G[local] * weights.to(G)[:, None]).T @ H[local]
        info["match_error"] = float((matched - full_target).norm() / full_target.norm().clamp_min(1e-30))
        error_flops = 2.0 * (len(local) + len(H)) * G.shape[1] * H.shape[1]
        forward_dtype = "bfloat16" if bfloat16 else "float32"
        info["flops_by_dtype"] = {forward_dtype: forward_flops}
        info["flops_by_dtype"]["float32"] = (info["flops_by_dtype"].get("float32", 0.0) + flops + omp_flops
                                             + error_flops)
    return candidates[chosen.cpu()], weights.float().cpu()


def held_out_split(n: int, valid_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded split of ``range(n)`` used with ``target="valid"``: (held-out indices, the rest).
    The held-out part is matched against and never trained on."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_valid = max(1, round(valid_fraction * n))
    return order[:n_valid], order[n_valid:]


def random_subset_select(n: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """A uniform random subset of ``round(fraction·n)`` (at least 1) of the indices 0..n-1."""
    return torch.randperm(n, generator=generator)[:max(1, round(fraction * n))]


class _SubsetMethod(Method):
    """Shared event logic: at each selection epoch draw a subset, and train each epoch on it."""

    def __init__(self, config=None, /, **params) -> None:
        super().__init__(config, **params)
        self.indices: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None
        self.selection_s = 0.0
        self.selections = 0

    def fit_start(self, state) -> None:
        state.train_data = as_tensor_data(state.train_data, self.name)  # a TensorDataset or DataLoader over one too

    def epoch_start(self, state) -> None:
        warm = round(getattr(self.config, "warm_fraction", 0.0) * state.epochs)
        if state.epoch <= warm:  # warm start: all the data that may be trained on, unweighted
            trainable = self._trainable(state)
            if trainable is not None:
                state.train_loader = Loader(state.train_data, state.batch_size, seed=state.seed, indices=trainable,
                                            rank=state.rank, world_size=state.world_size).set_epoch(state.epoch)
            return
        if self.indices is None or (state.epoch - warm - 1) % self.config.select_every == 0:
            start = time.perf_counter()
            self.indices, self.weights = self._select(state)
            self.selection_s += time.perf_counter() - start
            self.selections += 1
        state.train_loader = Loader(state.train_data, state.batch_size, seed=state.seed, indices=self.indices,
                                    weights=self.weights, rank=state.rank,
                                    world_size=state.world_size).set_epoch(state.epoch)

    def _select(self, state) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def _trainable(self, state) -> torch.Tensor | None:
        """The indices that may be trained on (None: all of the training data)."""
        return None

    def epoch_metrics(self) -> dict:
        return {f"{self.name}/selection_s": self.selection_s,
                f"{self.name}/subset_size": 0 if self.indices is None else len(self.indices)}

    def metrics(self) -> dict:
        return {**self.epoch_metrics(), f"{self.name}/selections": self.selections}

    def state_dict(self) -> dict:
        return {"indices": self.indices, "weights": self.weights, "selection_s": self.selection_s,
                "selections": self.selections}

    def load_state_dict(self, sd: dict) -> None:
        self.indices, self.weights = sd["indices"], sd["weights"]
        self.selection_s, self.selections = sd["selection_s"], sd["selections"]


class GradMatch(_SubsetMethod):
    name = "gradmatch"
    summary = "train on a weighted subset whose gradient matches the full data's (OMP, last layer)"
    paper = ("Killamsetty et al., GRAD-MATCH: Gradient Matching based Data Subset Selection for "
             "Efficient Deep Model Training, ICML 2021")
    config_class = GradMatchConfig
    owns = frozenset({"data_selection"})

    def check_compatible(self, others: list[Method]) -> None:
        for other in others:
            if "backward" in other.owns and not other.exact_gradients:
                raise ConfigError(f"gradmatch matches the loss gradients backpropagation computes; with {other.name} "
                                  "the model trains on other gradients; use one of them")

    def check_model(self, model) -> None:
        from ..generative import is_generative

        if is_generative(model):
            raise ConfigError(f"gradmatch matches a classifier's last-layer loss gradients, class by class; "
                              f"{type(model).__name__} is a generative model with no class output (random_subset "
                              "trains on subsets of any task)")

    def __init__(self, config: GradMatchConfig | None = None, /, **params) -> None:
        super().__init__(config, **params)
        self.match_error = float("nan")
        self.selection_flops = 0.0

    def _select(self, state) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, data = self.config, state.train_data
        candidates, target = None, None
        if cfg.target == "valid":
            held, candidates = held_out_split(len(data), cfg.valid_fraction, state.seed)
            target = (data.x[held], data.y[held])
        info: dict = {}
        idx, w = grad_match_select(state.unwrapped_model, data, cfg.fraction, lam=cfg.lam, per_batch=cfg.per_batch,
                                   batch_size=state.batch_size, target_data=target, candidates=candidates,
                                   loss_fn=state.loss_fn, seed=state.seed * 1009 + state.epoch, info=info)
        self.match_error = info["match_error"]
        for dtype, flops in info["flops_by_dtype"].items():
            self.selection_flops += flops
            state.charge(flops=flops, dtype=dtype, what="gradmatch/selection")
        return idx, w

    def _trainable(self, state) -> torch.Tensor | None:
        if self.config.target != "valid":
            return None
        return held_out_split(len(state.train_data), self.config.valid_fraction, state.seed)[1]

    def epoch_metrics(self) -> dict:
        return {**super().epoch_metrics(), "gradmatch/match_error": self.match_error}

    def metrics(self) -> dict:
        return {**super().metrics(), "gradmatch/selection_flops": self.selection_flops}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "match_error": self.match_error, "selection_flops": self.selection_flops}

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self.match_error, self.selection_flops = sd["match_error"], sd["selection_flops"]


class RandomSubset(_SubsetMethod):
    name = "random_subset"
    summary = "train on a fresh uniform random subset, redrawn every select_every epochs"
    paper = "GRAD-MATCH's random-online baseline (Killamsetty et al., ICML 2021)"
    config_class = RandomSubsetConfig
    owns = frozenset({"data_selection"})

    def _select(self, state) -> tuple[torch.Tensor, None]:
        gen = torch.Generator().manual_seed(state.seed * 1009 + state.epoch + 7919)
        return random_subset_select(len(state.train_data), self.config.fraction, gen), None


# -- private helpers -------------------------------------------------------------------------
def _check_fraction(owner: str, fraction) -> None:
    if fraction == 1 and not isinstance(fraction, bool):
        raise ConfigError(f"fraction=1 keeps every sample, so {owner} would only add work to plain training; "
                          "allowed: a number in (0, 1) (use the baseline for all the data)")


def _valid_targets(model, target_data, pool_labels, sizes, n_candidates, loss_fn, device, bfloat16):
    """Summed gradients (P, C, d+1) of held-out data: of the pool's class when `pool_labels` is
    given, else of all of it, scaled to stand for as many samples as each pool (`sizes`); and the
    full target, the summed gradient of all held-out data scaled to `n_candidates` samples."""
    vx, vy = (target_data.x, target_data.y) if isinstance(target_data, TensorData) else target_data
    Hv, Gv, flops = ops.last_layer_features(model, vx.to(device), vy.to(device), loss_fn, bfloat16=bfloat16)
    out = []
    for p, size in enumerate(sizes.tolist()):
        mask = torch.ones(len(Hv), dtype=torch.bool) if pool_labels is None else vy.cpu() == pool_labels[p]
        out.append((Gv[mask.to(Hv.device)].T @ Hv[mask.to(Hv.device)]) * (size / max(1, int(mask.sum()))))
    return torch.stack(out), (Gv.T @ Hv) * (n_candidates / len(Hv)), flops
