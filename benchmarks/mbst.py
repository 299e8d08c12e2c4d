"""Memory-bounded sparse training against dense training on mnist5k-cnn under 2, 1 and 0.5 MiB.

    flock /tmp/haet-cpu.lock python benchmarks/mbst.py [--seeds 2] [--epochs 3] [--steps N] [--out runs/bench-mbst]

Runs `haet.bench.run_bench` (the engine of `haet bench`: an untimed warm-up of every entry, then
each seed) for the baseline and `mbst:memory_mb=M` for each bound, and prints per entry: the plan
(micro-batch, sparsity), the bound, the footprint mbst measured at every step (state from the live
tensors + the live peak saved for backward), the workspace it reserved, the memory meter's own
breakdown (parameters + gradients + optimizer state + activations of its measured steps), the
dense footprint, accuracy (mean over seeds) and training time (median over seeds), with ratios
against dense. The machine is shared: the thread count and the load average before and after are
printed with the date, the CPU and the git revision.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from haet.bench import run_bench
from haet.core.record import hardware_info

BOUNDS_MB = (2.0, 1.0, 0.5)


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", default="runs/bench-mbst")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="stop every run after this many steps (a loaded machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    hw = hardware_info(torch.device("cpu"))
    load = os.getloadavg()
    print(f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, cpu {hw['cpu']}, "
          f"torch threads {torch.get_num_threads()}, torch {hw['torch']}, git {git_rev()}")
    print(f"load average before: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} cores"
          + ("  (machine loaded: times are inflated and noisy)" if load[0] > (os.cpu_count() or 1) / 2 else ""),
          flush=True)
    labels = [f"mbst:memory_mb={mb:g}" for mb in BOUNDS_MB]
    records: dict[str, list] = {}

    def on_run(label, seed, record, err):
        if err is not None:
            sys.exit(f"{label} seed {seed} failed: {err}")
        records.setdefault(label, []).append(record)
        print(f"  ran {label} seed {seed}: accuracy {record.metrics['accuracy']:.4f}, "
              f"train {record.cost['train_s']:.1f} s", flush=True)

    print(f"$ haet bench --task mnist5k --methods baseline,{','.join(labels)} --seeds {args.seeds} "
          f"--epochs {args.epochs}" + (f" --budget steps={args.steps}" if args.steps else ""), flush=True)
    run_bench("mnist5k", ["baseline", *labels], args.seeds, args.epochs, Path(args.out), on_run=on_run,
              budget={"steps": args.steps} if args.steps else None)
    load = os.getloadavg()
    print(f"load average after: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")

    base = records["baseline"]
    base_acc = statistics.mean(r.metrics["accuracy"] for r in base)
    base_s = statistics.median(r.cost["train_s"] for r in base)
    mem = base[0].cost["memory_bytes"]
    dense_meter = mem["params"] + mem["grads"] + mem["optimizer"] + mem["activations"]
    print(f"\ndense: accuracy {base_acc:.4f}, train {base_s:.1f} s (median), memory meter "
          f"{dense_meter} B (params+grads+optimizer+activations, batch 64)")
    print(f"{'bound':>8s} {'micro':>5s} {'sparsity':>8s} {'measured':>9s} {'+work':>8s} {'meter':>9s} {'held':>5s} "
          f"{'accuracy':>8s} {'Δ pt':>6s} {'train s':>7s} {'× dense':>7s}")
    for label in labels:
        rs = records[label]
        m = [r.method_metrics for r in rs]
        bound = m[0]["mbst/bound_bytes"]
        measured = max(x["mbst/footprint_bytes"] for x in m)
        work = m[0]["mbst/workspace_bytes"]
        meter = max(sum(r.cost["memory_bytes"][k] for k in ("params", "grads", "optimizer", "activations"))
                    for r in rs)
        held = measured + work <= bound and meter <= bound and \
            all(h["mbst/footprint_bytes"] + work <= bound for r in rs for h in r.history)
        acc = statistics.mean(r.metrics["accuracy"] for r in rs)
        train_s = statistics.median(r.cost["train_s"] for r in rs)
        print(f"{bound:8d} {m[0]['mbst/micro_batch']:5d} {m[0]['mbst/sparsity']:8.3f} {measured:9d} {work:8d} "
              f"{meter:9d} {str(held):>5s} {acc:8.4f} {100 * (acc - base_acc):+6.2f} {train_s:7.1f} "
              f"{train_s / base_s:7.2f}")
    print(f"dense footprint (state + saved for backward + workspace, batch 64): "
          f"{records[labels[0]][0].method_metrics['mbst/dense_footprint_bytes']} B")


if __name__ == "__main__":
    main()
