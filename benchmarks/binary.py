"""Binary weights on mnist5k through `haet bench`: float vs BinaryConnect vs the exact penalty at
several ρ, 3 seeds; accuracy, and the step from which all weights are exactly binary.

    python benchmarks/binary.py [--seeds 3] [--epochs 10] [--rhos 3e-4,1e-3,3e-3] [--growth 2] [--out runs/bench-binary]

Runs `haet.bench.run_bench` (the same code as `haet bench`, seeds interleaved: every entry for
seed 0, then seed 1, ...), prints its table, then per entry from the records: final accuracy of
the binary network per seed, `binary_penalty/first_all_binary_step` (— when the penalty had not
made every weight binary by the end, in which case the remaining ones were projected to ±α before
the final evaluation: `snapped_fraction`), and train time relative to float.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
from pathlib import Path

import torch

from haet.bench import run_bench
from haet.core.record import RunRecord, hardware_info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--rhos", default="3e-4,1e-3,3e-3")
    ap.add_argument("--growth", default="2")  # ρ ×2 per epoch: all-binary within 10 epochs for these ρ
    ap.add_argument("--out", default="runs/bench-binary")
    args = ap.parse_args()
    hw = hardware_info(torch.device("cpu"))
    print(f"# benchmarks/binary.py, {datetime.date.today().isoformat()}, {hw.get('cpu')}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    entries = ["baseline", "binary_connect"] + [f"binary_penalty:rho={r},rho_growth={args.growth}"
                                                for r in args.rhos.split(",")]
    out = Path(args.out)
    result = run_bench("mnist5k", entries, args.seeds, args.epochs, out)
    print((out / "report.md").read_text())
    records: dict[str, list[RunRecord]] = {e: [] for e in entries}
    for r in result["records"]:
        records.setdefault(r.label, []).append(r)
    base_s = statistics.median(r.cost["train_s"] for r in records["baseline"])
    print(f"mnist5k, mnist5k-cnn, {args.epochs} epochs, {args.seeds} seeds; {len(result.get('failed', []))} failed runs\n")
    print("| entry | accuracy per seed | median | first all-binary step per seed | snapped fraction per seed "
          "| train s × float |")
    print("|---|---|---|---|---|---|")
    for entry in entries:
        rs = sorted(records.get(entry, []), key=lambda r: r.seed)
        if not rs:
            continue
        accs = [r.metrics["accuracy"] for r in rs]
        name = rs[0].methods[0]["name"] if rs[0].methods else None
        first = [r.method_metrics.get(f"{name}/first_all_binary_step") for r in rs] if name else []
        snapped = [r.method_metrics.get(f"{name}/snapped_fraction") for r in rs] if name == "binary_penalty" else []
        ratio = statistics.median(r.cost["train_s"] for r in rs) / base_s
        print(f"| {entry} | {', '.join(f'{a:.3f}' for a in accs)} | {statistics.median(accs):.3f} | "
              f"{', '.join('—' if f is None else str(f) for f in first) or '–'} | "
              f"{', '.join(f'{s:.4f}' for s in snapped) or '–'} | {ratio:.2f} |")
    print(f"\nsteps per epoch: {rs[0].steps // rs[0].epochs}")


if __name__ == "__main__":
    main()
