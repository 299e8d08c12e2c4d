"""Incremental training of a deployed model on a user's data (MoIL, paper 15 in PAPERS.md).

A model pre-trained on a global set gets `updates` updates; update u trains on all the user's
data that has arrived so far. Three switchable optimizations:

- last-layer training: the trunk (everything before a split point) is frozen, only the head learns;
- feature-map caching: the frozen trunk's outputs are computed once per sample and reused across
  epochs and updates (`FeatureCache`, bounded in bytes); training then never runs the trunk;
- global dataset mixing: each update replays a fixed sample of the global set, `mix` being the
  fraction of the update's training set that is global, so the model does not forget it.

`run_updates` is the functional form; every update is a `Trainer` run (budgets, meters), plus the
cache fill, whose time and FLOPs are added to the update's cost.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..core.config import check_choice, check_range
from ..core.errors import ConfigError
from ..core.evaluation import evaluate
from ..core.optim import make_optimizer
from ..data.loader import TensorData
from ..meters.hardware import HardwareTable
from .cache import DTYPES, FeatureCache


@dataclass(frozen=True)
class IncrementalConfig:
    updates: int = 5
    epochs: int = 3            # epochs over the update's training set
    last_layer: bool = False
    split: int | str | None = None  # child index or name where the head starts; None: the last child with weights
    cache_mb: float = 0.0      # 0: no caching; needs last_layer
    cache_dtype: str = "float32"
    mix: float = 0.0           # fraction of each update's training set drawn from the global replay sample
    batch_size: int = 64
    optimizer: str = "adam:lr=1e-3"

    def __post_init__(self) -> None:
        check_range("updates", self.updates, 1, 1000, integer=True)
        check_range("epochs", self.epochs, 1, 1000, integer=True)
        check_range("cache_mb", self.cache_mb, 0, 1e6)
        check_choice("cache_dtype", self.cache_dtype, DTYPES)
        check_range("mix", self.mix, 0, 0.9)
        check_range("batch_size", self.batch_size, 1, 1 << 20, integer=True)
        if self.cache_mb > 0 and not self.last_layer:
            raise ConfigError("feature-map caching (cache_mb > 0) needs last-layer training: a trunk that "
                              "learns has no fixed features to cache")
        make_optimizer(self.optimizer)  # validates the spec now, not at the first update


class Frozen(nn.Module):
    """A frozen trunk: no gradients, and kept in eval mode when the model around it trains."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk.eval().requires_grad_(False)
        self.calls = 0  # samples run through the trunk (tests count them)

    def train(self, mode: bool = True) -> "Frozen":
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += len(x)
        with torch.no_grad():
            return self.trunk(x)


def split_model(model: nn.Module, split: int | str | None = None) -> tuple[nn.Sequential, nn.Sequential]:
    """(trunk, head) of an ``nn.Sequential`` cut before child `split` (an index or a child's name;
    default: the last child with weights). The parts share the model's modules."""
    if not isinstance(model, nn.Sequential):
        raise ConfigError(f"last-layer training splits an nn.Sequential model; got {type(model).__name__}")
    names = [name for name, _ in model.named_children()]
    if split is None:
        with_weights = [i for i, m in enumerate(model) if any(True for _ in m.parameters())]
        if not with_weights:
            raise ConfigError("the model has no layer with weights to train")
        index = with_weights[-1]
    elif isinstance(split, str) and not split.lstrip("-").isdigit():
        if split not in names:
            raise ConfigError(f"--split {split!r} is not a layer of the model; choose one of: {', '.join(names)}")
        index = names.index(split)
    else:
        index = int(split)
        if not 1 <= index < len(names):
            raise ConfigError(f"--split must be a layer index in [1, {len(names) - 1}], got {split}")
    return nn.Sequential(*list(model)[:index]), nn.Sequential(*list(model)[index:])


def _flops_per_sample(module: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x[:1])
    return float(counter.get_total_flops())


def _replay_pool(global_train: TensorData, seed: int) -> torch.Tensor:
    return torch.randperm(len(global_train), generator=torch.Generator().manual_seed(seed + 7))


def update_set(u: int, cfg: IncrementalConfig, user_train: TensorData, global_train: TensorData,
               pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Update u's training set (x, y, ids): the user's samples seen so far, then the replay sample.
    ids: user sample i -> i, global sample j -> -1 - j (the cache's keys)."""
    seen = math.ceil(len(user_train) * (u + 1) / cfg.updates)
    n_global = min(len(pool), round(cfg.mix / (1 - cfg.mix) * seen))
    g = pool[:n_global]  # a fixed prefix: the same global samples every update, so their features are reused
    x = torch.cat([user_train.x[:seen], global_train.x[g]])
    y = torch.cat([user_train.y[:seen], global_train.y[g]])
    ids = torch.cat([torch.arange(seen), -1 - g])
    return x, y, ids


def run_updates(model: nn.Module, global_train: TensorData, global_test: TensorData, user_train: TensorData,
                user_test: TensorData, cfg: IncrementalConfig, *, seed: int = 0, budget=None,
                on_update: Callable[[dict], None] | None = None, out_dir=None, task: str | None = None,
                model_name: str | None = None) -> list[dict]:
    """Apply `cfg.updates` updates to `model` (in place); one result dict per update."""
    from ..core.trainer import Trainer

    pool = _replay_pool(global_train, seed)
    trunk = head = None
    if cfg.last_layer:
        trunk, head = split_model(model, cfg.split)
        frozen = Frozen(trunk)
        trainable = nn.Sequential(frozen, head)
    cache = FeatureCache(int(cfg.cache_mb * 2**20), cfg.cache_dtype) if cfg.cache_mb > 0 else None
    table = HardwareTable.default()
    trunk_flops = _flops_per_sample(trunk, user_train.x) if cache is not None else 0.0
    results = []
    for u in range(cfg.updates):
        x, y, ids = update_set(u, cfg, user_train, global_train, pool)
        fill_s, fill_flops = 0.0, 0.0
        cpu0 = time.process_time()  # CPU seconds of the whole update: robust to other processes' load
        if cache is not None:
            before = cache.trunk_samples
            t0 = time.perf_counter()
            feats = cache.features(trunk, x, ids, batch_size=256)
            fill_s = time.perf_counter() - t0
            fill_flops = (cache.trunk_samples - before) * trunk_flops
            net, data = head, TensorData(feats, y)
        elif cfg.last_layer:
            net, data = trainable, TensorData(x, y)
        else:
            net, data = model, TensorData(x, y)
        params = [p for p in net.parameters() if p.requires_grad]
        trainer = Trainer(net, data, None, optimizer=make_optimizer(cfg.optimizer)(params), budget=budget,
                          device="cpu", seed=seed + u, progress=False, batch_size=cfg.batch_size, task=task,
                          model_name=model_name, label=_label(cfg),
                          out_dir=None if out_dir is None else f"{out_dir}/update-{u + 1}")
        record = trainer.fit(cfg.epochs)
        cpu_s = time.process_time() - cpu0
        model.eval()
        user_m = evaluate(model, user_test, nn.functional.cross_entropy, torch.device("cpu"))
        global_m = evaluate(model, global_test, nn.functional.cross_entropy, torch.device("cpu"))
        fill_j = fill_flops * table.pj_per_flop("float32") * 1e-12
        cost = record.cost
        measured = cost.get("energy_source") != "model"
        res = {
            "update": u + 1, "samples": len(x), "user_samples": int((ids >= 0).sum()),
            "global_samples": int((ids < 0).sum()),
            "user_accuracy": user_m["accuracy"], "global_accuracy": global_m["accuracy"],
            "time_s": cost["train_s"] + fill_s, "train_s": cost["train_s"], "cache_fill_s": fill_s,
            "cpu_s": cpu_s,
            "flops": cost["flops"] + fill_flops, "cache_fill_flops": fill_flops,
            # A measured reading (rapl/nvml) cannot cover the fill, done outside the Trainer: then the
            # modelled figure is the one that covers the whole update.
            "energy_j": cost["energy_model_j"] + fill_j if measured else cost["energy_j"] + fill_j,
            "energy_source": "model",
            "energy_measured_train_j": cost["energy_j"] if measured else None,
            "cache_bytes": cache.bytes if cache else 0, "cache_entries": len(cache) if cache else 0,
            "cache_evictions": cache.evictions if cache else 0,
            "trunk_samples": cache.trunk_samples if cache else None,
            "stopped_by": record.stopped_by, "contended": cost.get("contended"), "record": record,
        }
        record.method_metrics.update({f"incremental/{k}": v for k, v in res.items() if k != "record"})
        if out_dir is not None:
            record.save(f"{out_dir}/update-{u + 1}")
        results.append(res)
        if on_update is not None:
            on_update(res)
    return results


def _label(cfg: IncrementalConfig) -> str:
    parts = ["last-layer" if cfg.last_layer else "full"]
    if cfg.cache_mb:
        parts.append(f"cache={cfg.cache_mb:g}MB/{cfg.cache_dtype}")
    if cfg.mix:
        parts.append(f"mix={cfg.mix:g}")
    return "incremental:" + "+".join(parts)
