"""Mixed precision (bf16 autocast) against float32, and the contention detector on a loaded run.

    python benchmarks/precision.py [--seeds 3] [--epochs 2] [--threads 1] [--device cpu|cuda]
                                   [--skip-precision] [--skip-contention]

Part 1, precision: the mnist5k default CNN (DESIGN.md) and the mlp, trained fp32 then bf16 for each
seed (same initialization and data order), after an untimed warm-up of each. Printed: median
train time (the Trainer's, evaluation excluded), test accuracy, modelled energy (haet's energy
model, source "model": FLOPs by number format × energy per op + DRAM bytes × energy per byte; not
a measurement), and the ratios bf16 / fp32. Whether the CPU has native bf16 arithmetic
(avx512_bf16, amx_bf16 in /proc/cpuinfo) is printed, not assumed: without it autocast still
runs, in emulation.

Part 2, contention: the same short run alone, then with one busy process per core started
beside it (a deliberately loaded machine); printed: what the contention meter recorded for each
(CPU time, threads, CPU time per thread-second, load average, the verdict).
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import time
import warnings

import torch

import haet
from haet.core.record import hardware_info
from haet.data import get_task
from haet.models import build_model


def header(args) -> None:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    native = [f for f in ("avx512_bf16", "amx_bf16") if f" {f}" in flags]
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    load = os.getloadavg()
    hw = hardware_info(torch.device(args.device))
    print(f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; git {rev or '?'}; "
          f"{hw['cpu']} ({os.cpu_count()} cores){'; GPU ' + hw['gpu'] if hw['gpu'] else ''}; torch {torch.__version__}; "
          f"python {platform.python_version()}")
    print(f"threads {torch.get_num_threads()}; load average at start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
          f"on {os.cpu_count()} cores{' (LOADED: timings are not reliable)' if load[0] > (os.cpu_count() or 1) else ''}")
    print(f"native bf16 arithmetic on this CPU: {', '.join(native) or 'no (autocast emulates it)'}")


def train(model_name: str, precision: str, seed: int, epochs: int, data, device: str, steps: int | None = None):
    task = get_task("mnist5k")
    haet.seed_everything(seed)
    model = build_model(model_name, task.input_shape, task.num_classes)
    budget = haet.Budget(steps=steps) if steps else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the contention warning: its verdict is printed below
        return haet.Trainer(model, data[0], data[1], precision=precision, seed=seed, progress=False, device=device,
                            budget=budget).fit(epochs)


def precision_part(args, data) -> None:
    precisions = ["fp32", "bf16"] + (["fp16"] if args.device == "cuda" else [])
    for model_name in ("mnist5k-cnn", "mlp"):
        for p in precisions:  # untimed warm-up: first-use costs (kernels, allocator)
            train(model_name, p, 0, 1, data, args.device, steps=10)
        rows = {p: [] for p in precisions}
        for seed in range(args.seeds):
            for p in precisions:  # interleaved: a drift in machine load hits both alike
                r = train(model_name, p, seed, args.epochs, data, args.device)
                rows[p].append({"train_s": r.cost["train_s"], "accuracy": r.metrics["accuracy"],
                                "energy_j": r.cost["energy_model_j"], "contended": r.cost.get("contended"),
                                "dtypes": ",".join(sorted(r.cost["flops_by_dtype"]))})
        print(f"\n{model_name} on mnist5k, {args.epochs} epochs, {args.seeds} seeds, medians "
              f"(energy: haet's model, not measured)")
        print(f"{'precision':10} {'FLOPs as':10} {'train s':>9} {'accuracy':>9} {'energy J':>9} {'contended':>10}")
        base = {k: statistics.median(r[k] for r in rows["fp32"]) for k in ("train_s", "accuracy", "energy_j")}
        for p in precisions:
            med = {k: statistics.median(r[k] for r in rows[p]) for k in ("train_s", "accuracy", "energy_j")}
            contended = sum(bool(r["contended"]) for r in rows[p])
            print(f"{p:10} {rows[p][0]['dtypes']:10} {med['train_s']:9.2f} {med['accuracy']:9.4f} "
                  f"{med['energy_j']:9.4g} {contended:>4}/{len(rows[p])}")
            if p != "fp32":
                print(f"{'  ratio':10} {'':10} {med['train_s'] / base['train_s']:8.2f}× "
                      f"{(med['accuracy'] - base['accuracy']) * 100:+8.1f}pt {med['energy_j'] / base['energy_j']:8.2f}×")


def _spin(stop_at: float) -> None:
    x = 0
    while time.time() < stop_at:
        x += 1


def contention_part(args, data) -> None:
    print("\ncontention detector: the same run (mnist5k-cnn, fp32, 60 steps) alone, then beside one busy "
          "process per core")
    for label, busy in (("alone", 0), ("loaded", os.cpu_count() or 1)):
        procs = [mp.Process(target=_spin, args=(time.time() + 600,), daemon=True) for _ in range(busy)]
        for p in procs:
            p.start()
        try:
            time.sleep(2 if busy else 0)
            r = train("mnist5k-cnn", "fp32", 0, 1, data, args.device, steps=60)
        finally:
            for p in procs:
                p.terminate()
                p.join()
        c = r.cost
        share = c.get("cpu_per_thread")
        print(f"{label:7} busy processes {busy}: train {c['train_s']:.2f} s, wall {c['wall_s']:.2f} s, "
              f"cpu {c['cpu_s']:.2f} s, threads {c['threads']}, cpu per thread-second "
              f"{'–' if share is None else f'{share:.2f}'}, load {c['load_avg']['start']:.1f}→{c['load_avg']['end']:.1f} "
              f"on {c['cores']} cores: contended={c['contended']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-precision", action="store_true")
    ap.add_argument("--skip-contention", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    header(args)
    data = get_task("mnist5k").load(0, None)
    if not args.skip_precision:
        precision_part(args, data)
    if not args.skip_contention:
        contention_part(args, data)
    load = os.getloadavg()
    print(f"\nload average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")


if __name__ == "__main__":
    main()
