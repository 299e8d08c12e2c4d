"""Input and kernel downsampling against the baseline on a global-pooling CNN, through `haet bench`.

    python benchmarks/downsample.py [--epochs 10] [--seeds 3] [--entries baseline,downsample] [--out DIR]

One `haet bench` run on mnist5k with resnet8 (16-32-64 channels, global average pooling): the
baseline and `downsample` (every 2nd batch at half resolution, 3×3 kernels area-pooled to 2×2),
seeds 0..N-1, the same epochs. Entries run one after another within each seed (interleaved); an
untimed one-epoch run warms the process up first. Train time is the Trainer's (evaluation
excluded). Ratios are per seed (method / baseline of the same seed), then the median; the test
error's relative increase is taken between the mean errors over seeds.

Targets (issue #3): ≥ 20% less train time at ≤ 3% relative test-error increase (the paper: 23% at
≤ 2.9% on CIFAR-10 ResNets).
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
from haet.core.record import hardware_info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--entries", default="baseline,downsample")
    p.add_argument("--out", default=None, help="bench output directory (default: a temporary one)")
    args = p.parse_args()
    entries = args.entries.split(";") if ";" in args.entries else args.entries.split(",")
    hw = hardware_info(torch.device("cpu"))
    print(f"# benchmarks/downsample.py, {datetime.date.today().isoformat()}, {hw['cpu']}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}")
    print(f"# haet bench --task mnist5k --model resnet8 --methods {','.join(entries)} "
          f"--seeds {args.seeds} --epochs {args.epochs}")
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-downsample-"))
    result = run_bench("mnist5k", entries, args.seeds, args.epochs, out, model="resnet8")
    runs = {(r.method_label, r.seed): r for r in result["records"]}  # run_bench warmed every entry up

    print("\n| entry | accuracy (per seed) | test error (mean) | relative error change | train s (median) "
          "| × baseline (median) | FLOPs × baseline | low-res steps |")
    print("|---|---|---|---|---|---|---|---|")
    base_err = statistics.fmean(1 - runs["baseline", s].metrics["accuracy"] for s in range(args.seeds))
    summary = {}
    for e in entries:
        rs = [runs[e, s] for s in range(args.seeds)]
        base = [runs["baseline", s] for s in range(args.seeds)]
        accs = [r.metrics["accuracy"] for r in rs]
        err = statistics.fmean(1 - a for a in accs)
        rel = (err - base_err) / base_err
        ratio = statistics.median(a.cost["train_s"] / b.cost["train_s"] for a, b in zip(rs, base))
        flops = statistics.median(a.cost["flops"] / b.cost["flops"] for a, b in zip(rs, base))
        summary[e] = (rel, ratio)
        print(f"| {e} | {', '.join(f'{a:.3f}' for a in accs)} | {err:.4f} | {100 * rel:+.1f}% | "
              f"{statistics.median(r.cost['train_s'] for r in rs):.2f} | {ratio:.3f} | {flops:.3f} | "
              f"{rs[0].method_metrics.get('downsample/downsampled_steps', 0)} |")
    for e in entries:
        if e == "baseline":
            continue
        rel, ratio = summary[e]
        print(f"\n{e}: train time {100 * (1 - ratio):.1f}% less than the baseline (target ≥ 20%: "
              f"{'met' if ratio <= 0.8 else 'MISSED'}), test error {100 * rel:+.1f}% relative "
              f"(target ≤ +3%: {'met' if rel <= 0.03 else 'MISSED'})")
    if result.get("failed"):
        print(f"FAILED runs: {result['failed']}")


if __name__ == "__main__":
    main()
