"""Momentum SGD on stochastic bit streams (sc_sgd) against float momentum SGD on mnist5k.

Every run trains the DESIGN.md default (mnist5k-cnn, batch 64) with the same schedule: `--epochs`
epochs at a constant learning rate `--lr` and momentum 0.9, seeds 0..`--seeds`-1 (the seed fixes
the data split, the initial weights, the data order and the bit streams). The float baseline is
torch.optim.SGD(lr, momentum=0.9); sc_sgd runs with several stream lengths and encodings.
Runs are interleaved (each seed runs every variant in turn). Printed: each run's accuracy, then
per variant the mean ± std accuracy and its gap to float in points, the modelled energy of one
parameter update (source: model, haet/methods/_sc_ops.py) against float32 and 16-bit fixed-point
multiply-accumulate updaters, and training seconds (the simulation's CPU cost, not the circuit's).

    python benchmarks/sc_sgd.py [--seeds 3] [--epochs 5] [--lr 0.05]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics

import torch

import haet
from haet.core.record import cpu_name
from haet.data import get_task
from haet.methods._sc_ops import hardware_model
from haet.methods.sc_sgd import StochasticMomentumSGD
from haet.models import build_model

VARIANTS = {  # label -> sc_sgd parameters (None: float momentum SGD)
    "float SGD": None,
    "sc L=1": dict(stream_bits=1),
    "sc L=2": dict(stream_bits=2),
    "sc L=4 (default)": dict(stream_bits=4),
    "sc L=16": dict(stream_bits=16),
    "sc L=4 bernoulli": dict(stream_bits=4, encoding="bernoulli"),
    "sc L=4 tensor scale": dict(stream_bits=4, scale="tensor"),
}


def run(label: str, seed: int, epochs: int, lr: float, momentum: float):
    train, test = get_task("mnist5k").load(seed, None)
    haet.seed_everything(seed)
    model = build_model("mnist5k-cnn", (1, 28, 28), 10)
    params = VARIANTS[label]
    methods = [] if params is None else [StochasticMomentumSGD(lr=lr, momentum=momentum, **params)]
    return haet.Trainer(model, train, test, optimizer=lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum),
                        methods=methods, progress=False, seed=seed, device="cpu").fit(epochs=epochs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9)
    args = ap.parse_args()
    print(f"date {datetime.date.today().isoformat()}  machine {cpu_name()} ({os.cpu_count()} cores)  "
          f"torch {torch.__version__}  threads {torch.get_num_threads()}")
    print(f"mnist5k, mnist5k-cnn, batch 64, {args.epochs} epochs, lr {args.lr} constant, momentum {args.momentum}, "
          f"seeds 0..{args.seeds - 1}, runs interleaved")
    acc = {label: [] for label in VARIANTS}
    secs = {label: [] for label in VARIANTS}
    for seed in range(args.seeds):
        for label in VARIANTS:
            record = run(label, seed, args.epochs, args.lr, args.momentum)
            acc[label].append(record.metrics["accuracy"])
            secs[label].append(record.cost["train_s"])
            print(f"  seed {seed}  {label:<20} accuracy {record.metrics['accuracy']:.4f}  "
                  f"train {record.cost['train_s']:.1f} s", flush=True)

    base = statistics.fmean(acc["float SGD"])
    float_pj = hardware_model(1)["float32"]["energy_pj"]
    fixed_pj = hardware_model(1)["fixed16"]["energy_pj"]
    print(f"\nenergy per parameter update (source: model): float32 MAC updater {float_pj:.2f} pJ, "
          f"16-bit fixed-point MAC updater {fixed_pj:.2f} pJ")
    print(f"{'variant':<20} {'accuracy':>16} {'vs float':>9} {'pJ/update':>10} {'vs float32':>11} "
          f"{'vs fixed16':>11} {'cycles':>7} {'train s':>8}")
    for label, params in VARIANTS.items():
        mean, std = statistics.fmean(acc[label]), statistics.stdev(acc[label]) if len(acc[label]) > 1 else 0.0
        if params is None:
            pj, cycles = float_pj, 1
        else:
            hw = hardware_model(params["stream_bits"])["stochastic"]
            pj, cycles = hw["energy_pj"], hw["cycles"]
        print(f"{label:<20} {mean:.4f} ± {std:.4f} {100 * (mean - base):+8.2f}pt {pj:10.2f} {pj / float_pj:10.3f}x "
              f"{pj / fixed_pj:10.3f}x {cycles:7d} {statistics.fmean(secs[label]):8.1f}")


if __name__ == "__main__":
    main()
