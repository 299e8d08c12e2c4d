"""QS-NAS on the accelerator model: the chosen (bits, width) against float32 and 8-bit at width 1.

    python benchmarks/qs.py [--tasks digits:mlp:0.95,mnist5k:mnist5k-cnn:0.95] [--epochs 3] [--accelerator zedboard]

For each task: runs the search (bits 2,4,8 x scales 0.25,0.5,1,2; at most 8 trainings), then trains
the two references at width 1 — float32 and 8-bit (qat) — and prints accuracy, energy per
inference (the accelerator *model*: source model:<preset>) and the ratios, with the number of
trainings the search needed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import haet
from haet.data.tasks import get_task
from haet.hardware import get_accelerator
from haet.methods import parse_entry
from haet.search.qs import grid_points, scaled_model, search

from _common import header


def train(task, model_name, q, s, epochs, seed=0):
    haet.seed_everything(seed)
    train_data, test = task.load(seed, None)
    entry = "baseline" if q == 32 else f"qat:bits_w={q},bits_a={q}"
    record = haet.Trainer(scaled_model(model_name, task.input_shape, task.num_classes, s), train_data, test,
                          methods=parse_entry(entry), seed=seed, progress=False).fit(epochs)
    return record.metrics["accuracy"], record.cost["train_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="digits:mlp:0.95,mnist5k:mnist5k-cnn:0.95")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--accelerator", default="zedboard")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    print(header("benchmarks/qs.py", args.threads))
    accel = get_accelerator(args.accelerator)
    for spec in args.tasks.split(","):
        task_name, model_name, target = spec.split(":")
        task, target = get_task(task_name), float(target)
        grid = grid_points(accel, model_name, task.input_shape, task.num_classes, [2, 4, 8], [0.25, 0.5, 1, 2])
        spent = []

        def run(q, s):
            acc, secs = train(task, model_name, q, s, args.epochs)
            spent.append(secs)
            return [acc]

        result = search(grid, run, target, max_trainings=8)
        energy = {(p.bits, p.scale): p.energy_j for p in grid_points(accel, model_name, task.input_shape,
                                                                     task.num_classes, [8, 32], [1])}
        refs = {q: train(task, model_name, q, 1, args.epochs)[0] for q in (32, 8)}
        print(f"\n## {task_name} / {model_name}, target {target}, {args.epochs} epochs, accelerator model:{accel.name}\n")
        print("| network | accuracy | energy/inference (J, model) | × float32 s=1 |")
        print("|---|---|---|---|")
        f32 = energy[32, 1]
        print(f"| float32, s=1 | {refs[32]:.4f} | {f32:.3e} | 1.00 |")
        print(f"| 8-bit, s=1 | {refs[8]:.4f} | {energy[8, 1]:.3e} | {energy[8, 1] / f32:.3f} |")
        c = result["chosen"]
        if c is None:
            b = result["best"]
            print(f"| search: target not met; best q={b.bits}, s={b.scale:g} | {b.accuracy:.4f} | {b.energy_j:.3e} | "
                  f"{b.energy_j / f32:.3f} |")
        else:
            print(f"| search: q={c.bits}, s={c.scale:g} | {c.accuracy:.4f} | {c.energy_j:.3e} | {c.energy_j / f32:.3f} |")
        print(f"\nsearch: {result['trainings']} trainings of {len(grid)} grid points, "
              f"{sum(spent):.1f} s of training (median {statistics.median(spent):.1f} s each)")
        for p in sorted(result["points"], key=lambda p: (p.bits, p.scale)):
            if p.accuracy is not None:
                print(f"  trained q={p.bits} s={p.scale:g}: {p.accuracy:.4f}{' (verified)' if p.verified else ''}")


if __name__ == "__main__":
    main()
