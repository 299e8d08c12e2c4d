"""Zero-shot federated learning with new classes vs FedAvg, with and without heterogeneous widths.

    python benchmarks/federated.py [--tasks mnist5k,mnist1d] [--seeds 3] [--rounds 10] [--clients 6]
                                   [--new-classes 2] [--jsonl runs/bench-federated.jsonl]
    python benchmarks/federated.py --table-from runs/a.jsonl runs/b.jsonl   # the table of saved runs

Same split, same seed, same local training for both strategies (in-process backend; the Flower
backend computes the same numbers, see tests/federated/test_flower.py). Seeds run in the outer
loop with FedAvg and zero-shot interleaved, so a run stopped early still compares like with like.
Prints, per task and model set: global, seen-class and new-class test accuracy (median over
seeds and each seed), the zero-shot − FedAvg difference in points, bytes per round up and down,
and client compute time. Wall-clock figures were taken on a shared, loaded machine (the load
average is printed): read them as relative, not absolute. The paper's target: +4 pt global accuracy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import time

import torch

from haet.core.record import hardware_info
from haet.federated import FedConfig, run_local


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="mnist5k,mnist1d")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--new-classes", type=int, default=2)
    ap.add_argument("--jsonl", default=None, help="append one line per run here as it finishes")
    ap.add_argument("--table-from", nargs="+", metavar="JSONL",
                    help="only print the table of runs saved with --jsonl (e.g. of a run stopped early)")
    args = ap.parse_args()
    if args.table_from:
        rows = [json.loads(line) for path in args.table_from for line in open(path) if line.strip()]
        args.tasks = ",".join(dict.fromkeys(r["task"] for r in rows))
        args.seeds = len({r["seed"] for r in rows})
        print_table(rows, args)
        return
    torch.set_num_threads(1)
    hw = hardware_info(torch.device("cpu"))
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# benchmarks/federated.py, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{hw.get('cpu')}, {os.cpu_count()} cores, {torch.get_num_threads()} thread, torch {torch.__version__}, "
          f"git {rev or '?'}")
    print(f"# load average at start (1/5/15 min): {_load()}", flush=True)
    run_local(FedConfig(task="digits", clients=2, rounds=1, new_classes=1, holders=1))  # untimed warm-up
    rows: list[dict] = []
    for seed in range(args.seeds):
        for task in args.tasks.split(","):
            for hetero in (False, True):
                for strategy in ("fedavg", "zeroshot"):
                    cfg = FedConfig(task=task, clients=args.clients, rounds=args.rounds,
                                    new_classes=args.new_classes, strategy=strategy, heterogeneous=hetero, seed=seed)
                    start = time.perf_counter()
                    res = run_local(cfg)
                    row = {"task": task, "hetero": hetero, "strategy": strategy, "seed": seed,
                           **{k: res.final[k] for k in ("accuracy", "accuracy_seen", "accuracy_new")},
                           "bytes_up": statistics.mean(r["bytes_up"] for r in res.rounds),
                           "bytes_down": statistics.mean(r["bytes_down"] for r in res.rounds),
                           "client_s": sum(c["train_s"] + c["impression_s"] for c in res.clients.values()),
                           "wall_s": time.perf_counter() - start, "load1": os.getloadavg()[0]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if args.jsonl:
                        with open(args.jsonl, "a") as f:
                            f.write(json.dumps(row) + "\n")
    print(f"# load average at end (1/5/15 min): {_load()}\n")
    print_table(rows, args)


def print_table(rows: list[dict], args) -> None:
    print(f"{args.clients} clients, {args.rounds} rounds, {args.new_classes} new classes (2 holders each), "
          "Dirichlet(0.5) seen-class split; accuracy in %, median over seeds [per seed]\n")
    print("| task | models | strategy | seeds | global | seen | new | zero-shot − FedAvg (pt) | MB up/round "
          "| MB down/round | client s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for task in args.tasks.split(","):
        for hetero in (False, True):
            base = {r["seed"]: r for r in rows if (r["task"], r["hetero"], r["strategy"]) == (task, hetero, "fedavg")}
            for strategy in ("fedavg", "zeroshot"):
                rs = [r for r in rows if (r["task"], r["hetero"], r["strategy"]) == (task, hetero, strategy)]
                if not rs:
                    continue
                delta = "–" if strategy == "fedavg" else _cell(
                    [r["accuracy"] - base[r["seed"]]["accuracy"] for r in rs if r["seed"] in base], signed=True)
                print(f"| {task} | {'widths 1, ½, ¼' if hetero else 'width 1'} | {strategy} | {len(rs)} "
                      f"| {_cell([r['accuracy'] for r in rs])} | {_cell([r['accuracy_seen'] for r in rs])} "
                      f"| {_cell([r['accuracy_new'] for r in rs])} | {delta} "
                      f"| {statistics.mean(r['bytes_up'] for r in rs) / 1e6:.2f} "
                      f"| {statistics.mean(r['bytes_down'] for r in rs) / 1e6:.2f} "
                      f"| {statistics.median(r['client_s'] for r in rs):.0f} |")


def _cell(values: list[float], signed: bool = False) -> str:
    fmt = "+.1f" if signed else ".1f"
    return f"{100 * statistics.median(values):{fmt}} [" + ", ".join(f"{100 * v:{fmt}}" for v in values) + "]"


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
