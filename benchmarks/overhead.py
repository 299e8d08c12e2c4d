"""Trainer overhead against a hand-written PyTorch loop on the mnist5k default.

Both train the DESIGN.md default (mnist5k-cnn, Adam 1e-3, batch 64) from the same initial weights
on the same data order (haet's per-epoch permutation) for the same epochs, without evaluation.
The Trainer runs with all its default meters (time, memory, FLOPs, energy) and no progress bar.
Runs are interleaved (plain, trainer, plain, trainer, ...) after one warm-up of each; the script
prints each repeat, the medians and the ratio Trainer / plain (target: <= 1.05).

    python benchmarks/overhead.py [--repeats 7] [--epochs 3]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch
from torch import nn

import haet
from haet.core.record import cpu_name
from haet.data import get_task
from haet.data.loader import epoch_generator
from haet.models import build_model


def plain_loop(model, train, epochs: int, seed: int) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_all, y_all = train.x, train.y
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(x_all), generator=epoch_generator(seed, epoch))
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            loss = nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return time.perf_counter() - start


def trainer_run(model, train, epochs: int, seed: int) -> float:
    start = time.perf_counter()
    haet.Trainer(model, train, None, progress=False, device="cpu", seed=seed).fit(epochs=epochs)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    train, _ = get_task("mnist5k").load(0, None)
    torch.manual_seed(0)
    init = build_model("mnist5k-cnn", (1, 28, 28), 10).state_dict()

    def fresh():
        m = build_model("mnist5k-cnn", (1, 28, 28), 10)
        m.load_state_dict(init)
        return m

    print(f"haet {haet.__version__} overhead benchmark, {datetime.date.today()}, {cpu_name()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}")
    print(f"mnist5k-cnn, Adam 1e-3, batch 64, {args.epochs} epochs per run, no evaluation; "
          f"1 warm-up + {args.repeats} interleaved repeats")
    plain_loop(fresh(), train, 1, 0)
    trainer_run(fresh(), train, 1, 0)
    times = {"plain": [], "trainer": []}
    for r in range(args.repeats):
        times["plain"].append(plain_loop(fresh(), train, args.epochs, 0))
        times["trainer"].append(trainer_run(fresh(), train, args.epochs, 0))
        print(f"  repeat {r + 1}: plain {times['plain'][-1]:.3f} s   trainer {times['trainer'][-1]:.3f} s")
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = [t / p for p, t in zip(times["plain"], times["trainer"])]
    print(f"median plain loop : {med['plain']:.3f} s ({med['plain'] / args.epochs:.3f} s/epoch)")
    print(f"median Trainer    : {med['trainer']:.3f} s ({med['trainer'] / args.epochs:.3f} s/epoch)")
    print(f"ratio Trainer / plain: {med['trainer'] / med['plain']:.3f} (median of per-repeat ratios "
          f"{statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}); target <= 1.05")


if __name__ == "__main__":
    main()
