"""Memory-bounded sparse training against dense training on mnist5k: accuracy, footprint, time.

    flock /tmp/haet-cpu.lock python benchmarks/mbst.py [--seeds 3] [--epochs 8] [--out runs/bench-mbst]

Part 1 drives `haet bench` (baseline, then MBST at 80% and 90% sparsity for each scheme, the bound
for each computed with `bound_for_sparsity` on the DESIGN default model and optimizer) and prints
its table, then per MBST entry: the sparsity reached, the bound, the peak footprint measured over
every step of every seed and whether it stayed under the bound, the dense training state of the
same layers, and accuracy against dense (target: within 1.5 points at 90%, unstructured).
Part 2 times one training step (forward, backward, Adam) of each variant interleaved, after a
warm-up, and counts its FLOPs: block and channel layers compute only the kept blocks/channels;
unstructured sparsity computes the dense kernel here (its saving on zero-skipping hardware is an
estimate, `mbst/sparse_hw_flops_saved_estimate`). Medians over repeats; ratios are MBST / dense.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from haet.core.record import hardware_info
from haet.methods.mbst import MIB, bound_for_sparsity, plan_sparsity, sparsify_
from haet.models import build_model

SCHEMES = ("unstructured", "block", "channel")
SPARSITIES = (0.8, 0.9)


def fresh_model():
    torch.manual_seed(0)
    model = build_model("mnist5k-cnn", (1, 28, 28), 10)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)   # DESIGN's optimizer (the Trainer default)


def entries() -> list[tuple[str, str, float]]:
    out = []
    for scheme in SCHEMES:
        for sparsity in SPARSITIES:
            model, opt = fresh_model()
            mb = bound_for_sparsity(model, sparsity, scheme, optimizer=opt)
            mb = math.floor(mb * 1e6) / 1e6     # rounded down: the plan then keeps at most the target share
            out.append((f"mbst:memory_mb={mb:.6f},scheme={scheme}", scheme, sparsity))
    return out


def run_bench(args, runs) -> None:
    methods = ",".join(["baseline"] + [label for label, _, _ in runs])
    cmd = [sys.executable, "-m", "haet", "bench", "--task", "mnist5k", "--methods", methods, "--seeds",
           str(args.seeds), "--epochs", str(args.epochs), "--out", args.out, "--overwrite"]
    print("$ haet bench --task mnist5k --methods baseline,mbst:... --seeds", args.seeds, "--epochs", args.epochs)
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    print(result.stdout)
    if result.returncode != 0:
        sys.exit(f"haet bench failed with exit code {result.returncode}")
    records = {}
    for path in sorted(Path(args.out, "runs").rglob("record.json")):
        r = json.loads(path.read_text())
        records.setdefault(r.get("label") or "baseline", []).append(r)
    base = records["baseline"]
    base_acc = statistics.mean(r["metrics"]["accuracy"] for r in base)
    base_s = statistics.median(r["cost"]["train_s"] for r in base)
    mem = base[0]["cost"]["memory_bytes"]
    dense_state = mem["params"] + mem["grads"] + mem["optimizer"]   # every layer of this model is sparsified
    print(f"dense: accuracy {base_acc:.4f}, train {base_s:.2f} s, training state of the layers {dense_state} B")
    print(f"{'scheme':12s} {'target':>6s} {'sparsity':>8s} {'bound B':>8s} {'peak B':>8s} {'held':>5s} "
          f"{'vs dense':>8s} {'accuracy':>16s} {'Δ pt':>6s} {'train s':>7s} {'ratio':>5s}")
    for label, scheme, target in runs:
        rs = records[label]
        mm = [r["method_metrics"] for r in rs]
        bound = mm[0]["mbst/bound_bytes"]
        peak = max(m["mbst/peak_footprint_bytes"] for m in mm)
        held = all(m["mbst/peak_footprint_bytes"] <= bound for m in mm) and \
            all(h["mbst/footprint_bytes"] <= bound for r in rs for h in r["history"])
        accs = [r["metrics"]["accuracy"] for r in rs]
        acc = statistics.mean(accs)
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        train_s = statistics.median(r["cost"]["train_s"] for r in rs)
        print(f"{scheme:12s} {target:6.0%} {mm[0]['mbst/sparsity']:8.3f} {bound:8d} {peak:8d} {str(held):>5s} "
              f"{peak / dense_state:8.3f} {acc:.4f} ± {spread:.4f} {100 * (acc - base_acc):+6.2f} "
              f"{train_s:7.2f} {train_s / base_s:5.2f}")


def step_timing(args, runs) -> None:
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    variants = {"dense": fresh_model()}
    for label, scheme, target in runs:
        model, opt = fresh_model()
        mb = float(label.split("memory_mb=")[1].split(",")[0])
        sparsify_(model, plan_sparsity(model, mb, scheme, optimizer=opt), optimizer=opt)
        variants[f"{scheme} {target:.0%}"] = (model, opt)

    def step(model, opt):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    flops = {}
    for name, (model, opt) in variants.items():
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(model(x), y).backward()
        opt.zero_grad()
        flops[name] = counter.get_total_flops()
        for _ in range(10):              # warm-up
            step(model, opt)
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (model, opt) in variants.items():   # interleaved
            start = time.perf_counter()
            for _ in range(10):
                step(model, opt)
            times[name].append((time.perf_counter() - start) / 10 * 1e3)
    base_t, base_f = statistics.median(times["dense"]), flops["dense"]
    print(f"\none training step, batch 64, median of {args.repeats} x 10 steps (interleaved):")
    print(f"{'variant':18s} {'ms/step':>8s} {'ratio':>6s} {'FLOPs/step':>12s} {'ratio':>6s}")
    for name in variants:
        t = statistics.median(times[name])
        print(f"{name:18s} {t:8.2f} {t / base_t:6.2f} {flops[name]:12.3e} {flops[name] / base_f:6.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--out", default="runs/bench-mbst")
    p.add_argument("--skip-bench", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(2)
    hw = hardware_info(torch.device("cpu"))
    print(f"date {datetime.date.today().isoformat()}, cpu {hw['cpu']}, {hw['threads']} threads, torch {hw['torch']}")
    runs = entries()
    for label, scheme, target in runs:
        print(f"{scheme} {target:.0%}: {label} ({float(label.split('=')[1].split(',')[0]) * MIB:.0f} B)")
    if not args.skip_bench:
        run_bench(args, runs)
    step_timing(args, runs)


if __name__ == "__main__":
    main()
