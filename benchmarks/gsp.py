"""Grouped sparse projection against dense training on mnist5k, and the projection's cost by size.

    flock /tmp/haet-cpu.lock python benchmarks/gsp.py [--seeds 3] [--epochs 8] [--out runs/bench-gsp]

Part 1 drives `haet bench` (baseline, gsp at target 0.8 and 0.9: filters of each layer projected
after every step and before each evaluation) and prints its table, then per layer the mean Hoyer
sparsity of the filters and the fraction of exact zeros left by the projection's threshold, and
the accuracy against dense (mean over seeds).
Part 2 times `grouped_sparse_projection` on random matrices of 10^5 to 1.6x10^7 entries
(interleaved, after a warm-up; median of repeats) and prints time per entry and the ratio of times
against the ratio of sizes: linear time means the two ratios agree (up to cache effects).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from haet.core.record import hardware_info
from haet.methods.gsp import grouped_sparse_projection, hoyer_sparsity

TARGETS = (0.8, 0.9)
LAYERS = {"0": "conv1 16x(1x3x3)", "3": "conv2 32x(16x3x3)", "7": "linear 10x1568"}


def run_bench(args) -> None:
    labels = [f"gsp:target={t}" for t in TARGETS]
    cmd = [sys.executable, "-m", "haet", "bench", "--task", "mnist5k", "--methods", ",".join(["baseline", *labels]),
           "--seeds", str(args.seeds), "--epochs", str(args.epochs), "--out", args.out, "--overwrite"]
    print(f"$ haet bench --task mnist5k --methods baseline,{','.join(labels)} --seeds {args.seeds} "
          f"--epochs {args.epochs}")
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    print(result.stdout)
    if result.returncode != 0:
        sys.exit(f"haet bench failed with exit code {result.returncode}")
    records: dict[str, list] = {}
    for path in sorted(Path(args.out, "runs").rglob("record.json")):
        r = json.loads(path.read_text())
        records.setdefault(r.get("label") or "baseline", []).append(r)
    base_acc = statistics.mean(r["metrics"]["accuracy"] for r in records["baseline"])
    print(f"dense accuracy {base_acc:.4f}")
    print(f"{'run':18s} {'layer':20s} {'Hoyer':>6s} {'zeros':>6s}")
    for label in labels:
        rs = records[label]
        for key, name in LAYERS.items():
            hoyer = statistics.mean(r["method_metrics"][f"gsp/{key}/hoyer"] for r in rs)
            zeros = statistics.mean(r["method_metrics"][f"gsp/{key}/zero_fraction"] for r in rs)
            print(f"{label:18s} {name:20s} {hoyer:6.3f} {zeros:6.3f}")
        zeros_all = [r["method_metrics"]["gsp/zero_fraction"] for r in rs]
        acc = statistics.mean(r["metrics"]["accuracy"] for r in rs)
        print(f"{label:18s} {'all weights':20s} {'':6s} {statistics.mean(zeros_all):6.3f}   accuracy {acc:.4f} "
              f"({100 * (acc - base_acc):+.2f} pt vs dense)")


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
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default="runs/bench-gsp")
    p.add_argument("--skip-bench", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(2)
    hw = hardware_info(torch.device("cpu"))
    print(f"date {datetime.date.today().isoformat()}, cpu {hw['cpu']}, {hw['threads']} threads, torch {hw['torch']}")
    if not args.skip_bench:
        run_bench(args)
    projection_timing(args)


if __name__ == "__main__":
    main()
