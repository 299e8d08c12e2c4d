"""GradMax growth against training the full width from the start, through `haet bench`.

    python benchmarks/gradmax.py [--model mnist5k-cnn] [--seeds 3] [--epochs 8]

Runs, interleaved per seed (haet.bench.run_bench): the full-width baseline, and growth from 0.25×
to full width with init=gradmax, random and zeros (same schedule). Prints, per run kind, the
median over seeds of test accuracy, training seconds and training FLOPs (the growth passes
included), and the ratios to the baseline. Run it under `flock /tmp/haet-cpu.lock` on a shared
machine. The first run of each seed pays the warm-up; FLOPs are exact, times are ±15%.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from haet.bench import run_bench
from haet.core.record import cpu_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mnist5k-cnn", help="mnist5k-cnn (DESIGN default) or mlp")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--grow-every", type=int, default=50, help="steps between growth events (63 steps per epoch)")
    ap.add_argument("--grow-until", type=int, default=250, help="step of the last event (full width from then on)")
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary directory)")
    args = ap.parse_args()

    schedule = f"grow_every={args.grow_every},grow_until={args.grow_until}"
    entries = ["baseline"] + [f"gradmax:init={init},{schedule}" for init in ("gradmax", "random", "zeros")]
    print(f"# benchmarks/gradmax.py  {datetime.date.today().isoformat()}  cpu: {cpu_name()}  "
          f"threads: {torch.get_num_threads()}  torch {torch.__version__}  python {platform.python_version()}")
    print(f"# mnist5k, model {args.model}, {args.epochs} epochs, seeds 0..{args.seeds - 1}, start_width 0.25, "
          f"{schedule}; medians over seeds")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        result = run_bench("mnist5k", entries, args.seeds, args.epochs, out, model=args.model, device="cpu")
        records = result["records"]
    if result["failed"]:
        print(f"# failed runs: {result['failed']}")
    rows = {}
    for entry in entries:
        runs = [r for r in records if r.method_label == entry]
        rows[entry] = {
            "accuracy": statistics.median(r.metrics["accuracy"] for r in runs),
            "accuracies": [round(r.metrics["accuracy"], 3) for r in sorted(runs, key=lambda r: r.seed)],
            "train_s": statistics.median(r.cost["train_s"] for r in runs),
            "flops": statistics.median(r.cost["flops"] for r in runs),
            "growth_flops": statistics.median(r.method_metrics.get("gradmax/growth_flops", 0.0) for r in runs),
            "energy_j": statistics.median(r.cost["energy_j"] for r in runs),
            "source": runs[0].cost["energy_source"],
        }
    base = rows["baseline"]
    print(f"{'run':<14} {'accuracy':>8} {'per seed':<22} {'train s':>8} {'time ratio':>10} {'FLOPs':>10} "
          f"{'FLOPs ratio':>11} {'growth FLOPs':>12} {'energy J':>9}")
    for entry, row in rows.items():
        name = "full width" if entry == "baseline" else "grow " + entry.split("init=")[1].split(",")[0]
        print(f"{name:<14} {row['accuracy']:>8.4f} {str(row['accuracies']):<22} {row['train_s']:>8.2f} "
              f"{row['train_s'] / base['train_s']:>10.2f} {row['flops']:>10.3g} {row['flops'] / base['flops']:>11.3f} "
              f"{row['growth_flops']:>12.3g} {row['energy_j']:>9.3g}")
    print(f"# energy source: {base['source']} (haet's energy model, not a measurement)")


if __name__ == "__main__":
    main()
