"""Tensor-train layers on the mnist5k MLP (784-512-512-10): training-state memory and accuracy
against the dense MLP over a few rank budgets, through `haet bench`.

    python benchmarks/tensor_train.py [--seeds 3] [--epochs 8] [--ranks 2,4,6,8]

Runs, interleaved per seed (haet.bench.run_bench): the dense MLP and tensor_train at each initial
rank (defaults otherwise: 3 cores, 8-bit cores, rank pruning at threshold 0.1, the classifier kept
dense), plus one rank-adaptive run starting at rank 12 with a high pruning threshold. Prints, per
run kind, the memory ratio of the converted layers' training state (parameters + gradients +
Adam's moments, dense / TT; the paper claims 292×), the final ranks, the median accuracy and its
drop against dense, and the whole model's training-state ratio from the memory meter. Target:
≥ 100× at ≤ 2 points of accuracy. Run it under `flock /tmp/haet-cpu.lock` on a shared machine.
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
from haet.core.record import RunRecord, cpu_name


def state_bytes(record: RunRecord) -> int:
    mem = record.cost["memory_bytes"]
    return mem["params"] + mem["grads"] + mem["optimizer"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--ranks", default="2,4,6,8", help="initial TT ranks, comma-separated")
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary directory)")
    args = ap.parse_args()

    entries = ["baseline"] + [f"tensor_train:rank={r}" for r in args.ranks.split(",")] \
        + ["tensor_train:rank=12,prune_threshold=0.3"]
    print(f"# benchmarks/tensor_train.py  {datetime.date.today().isoformat()}  cpu: {cpu_name()}  "
          f"threads: {torch.get_num_threads()}  torch {torch.__version__}  python {platform.python_version()}")
    print(f"# mnist5k, model mlp (784-512-512-10), {args.epochs} epochs, seeds 0..{args.seeds - 1}; "
          "medians over seeds")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        result = run_bench("mnist5k", entries, args.seeds, args.epochs, out, model="mlp", device="cpu")
        records = result["records"]
    if result["failed"]:
        print(f"# failed runs: {result['failed']}")
    base_runs = [r for r in records if r.method_label == "baseline"]
    base_acc = statistics.median(r.metrics["accuracy"] for r in base_runs)
    base_state = statistics.median(state_bytes(r) for r in base_runs)
    base_s = statistics.median(r.cost["train_s"] for r in base_runs)
    print(f"{'run':<34} {'TT memory ratio':>15} {'final ranks':<22} {'accuracy':>8} {'per seed':<22} "
          f"{'drop, pt':>8} {'model state ratio':>17} {'time ratio':>10}")
    met = []
    for entry in entries:
        runs = sorted((r for r in records if r.method_label == entry), key=lambda r: r.seed)
        acc = statistics.median(r.metrics["accuracy"] for r in runs)
        per_seed = [round(r.metrics["accuracy"], 3) for r in runs]
        seconds = statistics.median(r.cost["train_s"] for r in runs) / base_s
        whole = base_state / statistics.median(state_bytes(r) for r in runs)
        if entry == "baseline":
            print(f"{'dense MLP':<34} {1:>15} {'–':<22} {acc:>8.4f} {str(per_seed):<22} {0:>8.1f} {whole:>17.1f} "
                  f"{seconds:>10.2f}")
            continue
        ratio = statistics.median(r.method_metrics["tt/memory_ratio"] for r in runs)
        ranks = "; ".join("/".join(map(str, v)) for k, v in runs[0].method_metrics.items() if k.startswith("tt/ranks/"))
        drop = 100 * (base_acc - acc)
        if ratio >= 100 and drop <= 2:
            met.append(entry)
        print(f"{entry:<34} {ratio:>14.1f}× {ranks:<22} {acc:>8.4f} {str(per_seed):<22} {drop:>8.1f} {whole:>17.1f} "
              f"{seconds:>10.2f}")
    print(f"# target ≥ 100× at ≤ 2 points: {'met by ' + ', '.join(met) if met else 'missed'}")
    print("# final ranks: seed 0, per converted layer (784→512; 512→512), one number per internal edge")


if __name__ == "__main__":
    main()
