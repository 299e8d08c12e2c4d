"""Grouped sparse projection against magnitude pruning at the same zeros, and the projection's cost by size.

    flock /tmp/haet-cpu.lock python benchmarks/gsp.py [--models mnist5k-cnn,mlp,resnet8] [--targets 0.8,0.9]
                                                      [--seeds 2] [--epochs 6]

Part 1, per model on mnist5k (Adam 1e-3, batch 64), per seed, interleaved in one process:
- dense: plain training;
- gsp:target=T: the paper's schedule (a projection after every step, a final projection at the
  start of the fine-tuning epochs, then fine-tuning with the zeros fixed; `finetune` 0.25 of the
  epochs, haet's defaults);
- magnitude: dense training for the same epochs before the fine-tuning phase, then each layer
  pruned to exactly as many zeros as gsp left in that layer (smallest |w|, torch.nn.utils.prune),
  then the same fine-tuning with the zeros fixed. Same zero fraction per layer, same step count:
  only the choice of the zeros differs.
It prints accuracy against the fraction of exact zeros (mean over seeds, per-seed values) and
the difference gsp − magnitude.
Part 2 times `grouped_sparse_projection` on random matrices of 10^5 to 1.6x10^7 entries
(interleaved, after a warm-up; median of repeats) and prints time per entry and the ratio of times
against the ratio of sizes: linear time means the two ratios agree (up to cache effects).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from torch import nn
from torch.nn.utils import prune

import haet
from haet.core.record import hardware_info
from haet.data import get_task
from haet.methods.gsp import GroupedSparseProjection, grouped_sparse_projection, hoyer_sparsity, sparse_layers
from haet.models import build_model


class MagnitudePrune(haet.Method):
    """At the start of epoch `at`, zero the `counts[name]` smallest-magnitude weights of each layer
    and keep them zero (torch's pruning reparametrization masks the weight and its gradient)."""

    name = "magnitude"

    def __init__(self, at: int, counts: dict[str, int]) -> None:
        super().__init__()
        self.at, self.counts = at, counts

    def epoch_start(self, state) -> None:
        if state.epoch == self.at:
            for name, module in sparse_layers(state.unwrapped_model):
                prune.l1_unstructured(module, "weight", amount=self.counts[name])
            state.model_version += 1

    def fit_end(self, state) -> None:
        for _, module in sparse_layers(state.unwrapped_model):
            if prune.is_pruned(module):
                prune.remove(module, "weight")  # exact zeros in a plain weight


def zeros_by_layer(model: nn.Module) -> dict[str, int]:
    return {name: int((m.weight == 0).sum()) for name, m in sparse_layers(model)}


def zero_fraction(model: nn.Module) -> float:
    layers = sparse_layers(model)
    return sum(int((m.weight == 0).sum()) for _, m in layers) / sum(m.weight.numel() for _, m in layers)


def train(model_name: str, seed: int, epochs: int, data, methods) -> tuple[float, nn.Module, float]:
    train_data, test_data = data
    haet.seed_everything(seed)
    model = build_model(model_name, (1, 28, 28), 10)
    record = haet.Trainer(model, train_data, test_data, methods=methods, seed=seed, progress=False).fit(epochs)
    return record.metrics["accuracy"], model, record.cost["train_s"]


def run_pruning(args) -> None:
    targets = [float(t) for t in args.targets.split(",")]
    tune = round(0.25 * args.epochs)
    freeze = args.epochs - tune + 1
    print(f"mnist5k, {args.epochs} epochs, gsp every step then {tune} fine-tuning epochs (from epoch {freeze}); "
          f"magnitude pruning at epoch {freeze} to gsp's per-layer zero counts, then the same fine-tuning")
    for model_name in args.models.split(","):
        rows: dict[str, list] = {}
        for seed in range(args.seeds):
            data = get_task("mnist5k").load(seed, None)
            acc, model, secs = train(model_name, seed, args.epochs, data, [])
            rows.setdefault("dense", []).append((acc, zero_fraction(model), None, secs))
            for t in targets:
                acc, model, secs = train(model_name, seed, args.epochs, data, [GroupedSparseProjection(target=t)])
                hoyer = float(torch.cat([hoyer_sparsity(m.weight.reshape(m.weight.shape[0], -1))
                                         for _, m in sparse_layers(model)]).mean())
                rows.setdefault(f"gsp:target={t}", []).append((acc, zero_fraction(model), hoyer, secs))
                counts = zeros_by_layer(model)
                acc, model, secs = train(model_name, seed, args.epochs, data, [MagnitudePrune(freeze, counts)])
                assert zeros_by_layer(model) == counts  # the same zeros per layer, exactly
                rows.setdefault(f"magnitude@{t}", []).append((acc, zero_fraction(model), None, secs))
        n = sum(m.weight.numel() for _, m in sparse_layers(build_model(model_name, (1, 28, 28), 10)))
        print(f"\n{model_name} ({n:,} prunable weights), {args.seeds} seeds")
        print("| run | accuracy (mean) | per seed | exact zeros | Hoyer | train s (median) | Δ vs dense, pt |")
        print("|---|---|---|---|---|---|---|")
        dense = statistics.fmean(r[0] for r in rows["dense"])
        for label, rs in rows.items():
            acc = statistics.fmean(r[0] for r in rs)
            hoyer = "" if rs[0][2] is None else f"{statistics.fmean(r[2] for r in rs):.3f}"
            print(f"| {label} | {acc:.4f} | {', '.join(f'{r[0]:.3f}' for r in rs)} | "
                  f"{statistics.fmean(r[1] for r in rs):.3f} | {hoyer} | {statistics.median(r[3] for r in rs):.2f} | "
                  f"{100 * (acc - dense):+.2f} |")
        for t in targets:
            g = statistics.fmean(r[0] for r in rows[f"gsp:target={t}"])
            m = statistics.fmean(r[0] for r in rows[f"magnitude@{t}"])
            print(f"{model_name} target {t}: gsp {g:.4f} vs magnitude {m:.4f} at "
                  f"{statistics.fmean(r[1] for r in rows[f'gsp:target={t}']):.3f} zeros: {100 * (g - m):+.2f} pt; "
                  f"vs dense {100 * (g - dense):+.2f} pt")


def projection_timing(args) -> None:
    g = torch.Generator().manual_seed(0)
    sizes = [(100, 1000), (1000, 1000), (4000, 1000), (4000, 4000)]
    inputs = {s: torch.randn(*s, generator=g) for s in sizes}
    evaluations = {}
    for s, x in inputs.items():          # warm-up, and the count of passes over the data
        _, info = grouped_sparse_projection(x, 0.8, return_info=True)
        evaluations[s] = info["evaluations"]
        assert abs(float(hoyer_sparsity(_).mean()) - 0.8) < 1e-4
    times = {s: [] for s in sizes}
    for _ in range(args.repeats):
        for s, x in inputs.items():
            start = time.perf_counter()
            grouped_sparse_projection(x, 0.8)
            times[s].append(time.perf_counter() - start)
    first = sizes[0]
    t0, n0 = statistics.median(times[first]), first[0] * first[1]
    print(f"\nprojection to average Hoyer sparsity 0.8, median of {args.repeats} (interleaved):")
    print(f"{'vectors x length':>18s} {'entries':>10s} {'evals of g':>10s} {'ms':>9s} {'ns/entry':>9s} "
          f"{'size ratio':>10s} {'time ratio':>10s}")
    for s in sizes:
        t, n = statistics.median(times[s]), s[0] * s[1]
        print(f"{f'{s[0]} x {s[1]}':>18s} {n:10d} {evaluations[s]:10d} {1e3 * t:9.2f} {1e9 * t / n:9.2f} "
              f"{n / n0:10.1f} {t / t0:10.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mnist5k-cnn,mlp,resnet8")
    p.add_argument("--targets", default="0.8,0.9")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-pruning", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    args = p.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # a long run on a shared machine: show each line as it comes
    torch.set_num_threads(args.threads)
    hw = hardware_info(torch.device("cpu"))
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# benchmarks/gsp.py, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {hw['cpu']}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}, "
          f"git {rev or 'unknown'}, load average {load} at start (shared machine: times are indicative)")
    if not args.skip_pruning:
        run_pruning(args)
    if not args.skip_timing:
        projection_timing(args)
    print(f"# load average {', '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()
