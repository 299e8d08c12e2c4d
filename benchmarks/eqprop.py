"""Equilibrium propagation against backpropagation on the same architecture.

    python benchmarks/eqprop.py [--tasks digits,mnist5k] [--seeds 3] [--epochs 5] [--threads 1]

For each task and seed, interleaved: an MLP of the same sizes (input-256-classes, hard-sigmoid
units clamp(x, 0, 1), squared error on one-hot targets) trained by backpropagation; for
reference, the MLP a backprop user would train (ReLU, cross-entropy, Adam 1e-3); and the
EqProp network trained with the standard and the symmetric estimator (T1 = 20, T2 = 6, β = 0.1);
all with SGD lr 0.1, batch 32, through the haet Trainer. Prints per entry: median accuracy, train
time, FLOPs per step, activation bytes saved for backward, and the modelled training energy
(source: model — haet's 45 nm table; this CPU has no energy counter).
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch import nn

import haet
from haet.data.tasks import get_task
from haet.methods import parse_entry
from haet.models import build_model

from _common import header


def bp_mlp(n_in: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(n_in, 256), nn.Hardtanh(0.0, 1.0), nn.Linear(256, classes),
                         nn.Hardtanh(0.0, 1.0))


def mse_onehot(out, y, reduction="mean"):
    per = 0.5 * ((out - F.one_hot(y, out.shape[-1]).float()) ** 2).sum(-1)
    return per if reduction == "none" else per.mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="digits,mnist5k")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    print(header("benchmarks/eqprop.py", args.threads))
    entries = {"backprop": None, "backprop, ReLU + cross-entropy, Adam": "reference",
               "eqprop standard": "eqprop:t_free=20,t_nudge=6,nudge=standard",
               "eqprop symmetric": "eqprop:t_free=20,t_nudge=6,nudge=symmetric"}
    for task_name in args.tasks.split(","):
        task = get_task(task_name)
        n_in = int(torch.tensor(task.input_shape).prod())
        results: dict[str, list] = {k: [] for k in entries}
        for seed in range(args.seeds):
            train, test = task.load(seed, None)
            for label, spec in entries.items():
                haet.seed_everything(seed)
                if spec == "reference":  # what a backprop user would train: not the same units or loss
                    model = nn.Sequential(nn.Flatten(), nn.Linear(n_in, 256), nn.ReLU(), nn.Linear(256, task.num_classes))
                    record = haet.Trainer(model, train, test, seed=seed, batch_size=32, progress=False).fit(args.epochs)
                    results[label].append(record)
                    continue
                model = bp_mlp(n_in, task.num_classes) if spec is None else build_model("eqprop-mlp", task.input_shape,
                                                                                         task.num_classes)
                record = haet.Trainer(model, train, test, methods=parse_entry(spec) if spec else [],
                                      loss_fn=None if spec else mse_onehot, seed=seed, batch_size=32, progress=False,
                                      optimizer=lambda p: torch.optim.SGD(p, lr=0.1)).fit(args.epochs)
                results[label].append(record)
        print(f"\n## {task_name}: {n_in}-256-{task.num_classes}, {args.epochs} epochs, {args.seeds} seeds, "
              "SGD lr 0.1, batch 32 (medians over seeds)\n")
        print("| training | accuracy (per seed) | train s | × backprop | FLOPs/step | × backprop | "
              "activation bytes saved | energy J (model) |")
        print("|---|---|---|---|---|---|---|---|")
        base = results["backprop"]
        base_s = statistics.median(r.cost["train_s"] for r in base)
        base_f = statistics.median(r.cost["flops"] / r.steps for r in base)
        for label, rs in results.items():
            accs = [r.metrics["accuracy"] for r in rs]
            train_s = statistics.median(r.cost["train_s"] for r in rs)
            flops = statistics.median(r.cost["flops"] / r.steps for r in rs)
            print(f"| {label} | {statistics.median(accs):.3f} ({', '.join(f'{a:.3f}' for a in accs)}) | {train_s:.2f} | "
                  f"{train_s / base_s:.1f} | {flops:.3g} | {flops / base_f:.1f} | "
                  f"{max(r.cost['memory_bytes']['activations'] for r in rs)} | "
                  f"{statistics.median(r.cost['energy_j'] for r in rs):.3g} ({rs[0].cost['energy_source']}) |")


if __name__ == "__main__":
    main()
