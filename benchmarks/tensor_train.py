"""Tensor-train layers on the mnist5k MLP (784-512-512-10): ranks that shrink under the per-slice
prior, training-state memory (converted layers and whole model) and accuracy against dense.

    flock /tmp/haet-cpu.lock python benchmarks/tensor_train.py [--seeds 3] [--epochs 8]

Runs `haet.bench.run_bench` (the code of `haet bench`, seeds interleaved, each run after an untimed
warm-up): the dense MLP; tensor_train from rank 16 with the default prior (prior_weight 2); and
fixed rank 4 (prior_weight=0) for reference (`--entries` for others). Both hidden Linears are
converted (3 cores, 8-bit fake-quantized cores in the forward), the classifier stays dense. Prints
per entry: initial → final ranks (seed 0, per layer and internal edge), the training-state ratio
dense / TT (parameters + gradients + Adam's moments, float32) of the converted layers and of the
whole model, accuracy (median, per seed), the drop against dense, and the time ratio.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

from haet.bench import run_bench
from haet.core.record import cpu_name

ENTRIES = "baseline,tensor_train,tensor_train:rank=4,prior_weight=0"


def header(script: str) -> None:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"# {script}  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  cpu: {cpu_name()}  "
          f"threads: {torch.get_num_threads()}  torch {torch.__version__}  git {rev or '?'}  load avg (1/5/15 min): {load}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--entries", default=ENTRIES, help="haet bench entries, comma-separated")
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary directory)")
    args = ap.parse_args()
    header("benchmarks/tensor_train.py")
    entries = _split(args.entries)

    def show(label, seed, record, error):  # one line per finished run, so a cut-short run still says something
        if record is not None:
            ranks = record.method_metrics.get("tensor_train/ranks", {})
            print(f"#   run {label} seed {seed}: accuracy {record.metrics['accuracy']:.4f}, train {record.cost['train_s']:.0f} s, "
                  f"final ranks {[v['final'] for v in ranks.values()]}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_bench("mnist5k", entries, args.seeds, args.epochs, args.out or Path(tmp), model="mlp",
                           device="cpu", on_run=show)
    records = result["records"]
    print(f"# mnist5k, model mlp (784-512-512-10), Adam lr 1e-3, {args.epochs} epochs, seeds 0..{args.seeds - 1}, "
          f"{len(result.get('failed', []))} failed runs; medians over seeds; load avg now: {os.getloadavg()[0]:.1f}")
    base = [r for r in records if r.method_label == "baseline"]
    base_acc = statistics.median(r.metrics["accuracy"] for r in base)
    base_s = statistics.median(r.cost["train_s"] for r in base)
    print("| entry | ranks, initial → final (seed 0; layers 1; 3) | memory ratio, converted layers | "
          "memory ratio, whole model | accuracy | per seed | drop, pt | time × dense |")
    print("|---|---|---|---|---|---|---|---|")
    for entry in entries:
        runs = sorted((r for r in records if r.method_label == entry), key=lambda r: r.seed)
        if not runs:
            continue
        acc = statistics.median(r.metrics["accuracy"] for r in runs)
        per_seed = ", ".join(f"{r.metrics['accuracy']:.3f}" for r in runs)
        seconds = statistics.median(r.cost["train_s"] for r in runs) / base_s
        if entry == "baseline":
            print(f"| dense MLP | – | 1 | 1 | {acc:.4f} | {per_seed} | 0.0 | 1.00 |")
            continue
        m = [r.method_metrics for r in runs]
        layers = statistics.median(x["tensor_train/memory_ratio_layers"] for x in m)
        whole = statistics.median(x["tensor_train/memory_ratio_model"] for x in m)
        ranks = "; ".join(f"{'/'.join(map(str, v['initial']))} → {'/'.join(map(str, v['final']))}"
                          for v in m[0]["tensor_train/ranks"].values())
        print(f"| {entry} | {ranks} | {layers:.1f}× | {whole:.1f}× | {acc:.4f} | {per_seed} | "
              f"{100 * (base_acc - acc):.1f} | {seconds:.2f} |")
    print("# memory ratio = training state (params + grads + Adam moments, all float32) of the dense counterpart / "
          "of the TT model, at the end of training")


def _split(text: str) -> list[str]:
    """Split a method list at commas that start a new entry (``key=value`` pairs stay with their entry)."""
    out: list[str] = []
    for part in text.split(","):
        if out and "=" in part and ":" not in part:
            out[-1] += "," + part
        else:
            out.append(part)
    return out


if __name__ == "__main__":
    main()
