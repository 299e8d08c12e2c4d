"""Binary weights on mnist5k through `haet bench`: float vs BinaryConnect vs the exact penalty
(proximal step after the optimizer) at several ρ schedules, seeds interleaved; medians.

    flock /tmp/haet-cpu.lock python benchmarks/binary.py [--seeds 3] [--epochs 10] [--out runs/bench-binary]

Runs `haet.bench.run_bench` (the code of `haet bench`: every entry for seed 0, then seed 1, ...,
each after an untimed warm-up) on mnist5k-cnn with Adam (lr 1e-3), then prints per entry: final
accuracy of the binary network per seed and the median, the gap to BinaryConnect's median,
`binary_penalty/first_all_binary_step` (the step from which the penalty alone had made every
selected weight exactly ±α; — if it never did, in which case the rest were projected before the
final evaluation: `snapped_fraction`), and median train time relative to float. Target: exactly
binary at the end and within 1 point of BinaryConnect.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
from pathlib import Path

import torch

from haet.bench import run_bench
from haet.core.record import cpu_name

PENALTIES = ("rho=0.005,rho_growth=3", "rho=0.002,rho_growth=3.5", "rho=0.02,rho_growth=2.5", "rho=0.05,rho_growth=2")


def header(script: str) -> None:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"# {script}  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  cpu: {cpu_name()}  "
          f"threads: {torch.get_num_threads()}  torch {torch.__version__}  git {rev or '?'}  load avg (1/5/15 min): {load}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--out", default="runs/bench-binary")
    args = ap.parse_args()
    header("benchmarks/binary.py")
    entries = ["baseline", "binary_connect"] + [f"binary_penalty:{p}" for p in PENALTIES]
    result = run_bench("mnist5k", entries, args.seeds, args.epochs, Path(args.out))
    by_label: dict[str, list] = {e: [] for e in entries}
    for r in result["records"]:
        by_label.setdefault(r.label, []).append(r)
    base_s = statistics.median(r.cost["train_s"] for r in by_label["baseline"])
    bc_acc = statistics.median(r.metrics["accuracy"] for r in by_label["binary_connect"])
    print(f"# mnist5k, mnist5k-cnn, Adam lr 1e-3, {args.epochs} epochs, seeds 0..{args.seeds - 1}, "
          f"{len(result.get('failed', []))} failed runs; load avg now: {os.getloadavg()[0]:.1f}")
    print("| entry | accuracy per seed | median | vs BinaryConnect, pt | first all-binary step per seed "
          "| snapped fraction per seed | train s × float |")
    print("|---|---|---|---|---|---|---|")
    met = []
    for entry in entries:
        rs = sorted(by_label.get(entry, []), key=lambda r: r.seed)
        if not rs:
            continue
        accs = [r.metrics["accuracy"] for r in rs]
        acc = statistics.median(accs)
        name = entry.split(":")[0]
        first = [r.method_metrics.get(f"{name}/first_all_binary_step") for r in rs] if name != "baseline" else []
        snapped = [r.method_metrics.get(f"{name}/snapped_fraction") for r in rs] if name == "binary_penalty" else []
        gap = 100 * (acc - bc_acc)
        if name == "binary_penalty" and gap >= -1.0 and all(s == 0.0 for s in snapped):
            met.append(entry)
        ratio = statistics.median(r.cost["train_s"] for r in rs) / base_s
        print(f"| {entry} | {', '.join(f'{a:.3f}' for a in accs)} | {acc:.3f} | "
              f"{'–' if name == 'baseline' else f'{gap:+.1f}'} | {', '.join('—' if f is None else str(f) for f in first) or '–'} | "
              f"{', '.join(f'{s:.4f}' for s in snapped) or '–'} | {ratio:.2f} |")
    steps = rs[0].steps // max(rs[0].epochs, 1)
    print(f"# steps per epoch: {steps}; target (exactly binary by the penalty, ≤ 1 pt below BinaryConnect): "
          f"{'met by ' + ', '.join(met) if met else 'missed'}")


if __name__ == "__main__":
    main()
