"""Optimizer fusion against the standard loop: median step time and peak memory, interleaved.

Models (mnist5k batches of 64, Adam lr 1e-3):
- mlp: 784-2048-2048-2048-10 (10.0 M parameters; the optimizer step is a real share of the step)
- cnn: the mnist5k default (DESIGN.md), 20,490 parameters

Variants, each on its own copy of the same initial weights and the same batches:
- adam:            standard loop, torch.optim.Adam() (on CPU its default is the per-parameter loop)
- adam_fused:      standard loop, torch.optim.Adam(fused=True) (what a CPU user would pick)
- fusion_backward: haet.methods.fusion.fuse_optimizer(model, Adam(), "backward")
- fusion_forward:  haet.methods.fusion.fuse_optimizer(model, Adam(), "forward")

Timing: a warm-up of each variant, then `--rounds` rounds; in each round every variant runs
`--steps` steps, in a rotated order. Per-step medians over rounds and ratios are printed, and the
largest parameter difference from `adam` after all steps (fusion must not change the maths).
Peak memory: each variant alone in a fresh process (`--steps` steps after one warm-up step):
the process's peak resident set on CPU (VmHWM), torch.cuda.max_memory_allocated on CUDA.
With `--allocator-tuned` the timing also runs in a process where glibc keeps freed memory
(MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ raised), to show what the allocator accounts for.

    python benchmarks/fusion.py [--device cpu|cuda] [--rounds 15] [--steps 10] [--allocator-tuned]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from haet.core.record import cpu_name
from haet.data import get_task
from haet.methods.fusion import fuse_optimizer
from haet.models import build_model

VARIANTS = ("adam", "adam_fused", "fusion_backward", "fusion_forward")
BATCH = 64


def build(model_name: str) -> nn.Module:
    torch.manual_seed(0)
    if model_name == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
            nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))
    return build_model("mnist5k-cnn", (1, 28, 28), 10)


def batches(device: torch.device):
    train, _ = get_task("mnist5k").load(0, None)
    x, y = train.x.to(device), train.y.to(device)
    n = len(x) // BATCH
    return [(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]) for i in range(n)]


class Runner:
    """One variant: a model, an optimizer (or fused handle) and a position in the batch list."""

    def __init__(self, variant: str, model_name: str, device: torch.device, data: list) -> None:
        self.model = build(model_name).to(device)
        self.data, self.pos, self.device = data, 0, device
        opt = torch.optim.Adam(self.model.parameters(), lr=1e-3, fused=True if variant == "adam_fused" else None)
        self.opt = fuse_optimizer(self.model, opt, variant.split("_")[1]) if variant.startswith("fusion") else opt

    def steps(self, n: int) -> None:
        for _ in range(n):
            x, y = self.data[self.pos % len(self.data)]
            self.pos += 1
            loss = nn.functional.cross_entropy(self.model(x), y)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad()
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def params(self) -> torch.Tensor:
        if hasattr(self.opt, "flush"):
            self.opt.flush()
        return torch.cat([p.detach().flatten().cpu() for p in self.model.parameters()])


def time_variants(model_name: str, device: torch.device, rounds: int, steps: int) -> dict:
    data = batches(device)
    runners = {v: Runner(v, model_name, device, data) for v in VARIANTS}
    for r in runners.values():
        r.steps(steps)  # warm-up: allocations, optimizer state, kernels
    per_step = {v: [] for v in VARIANTS}
    for k in range(rounds):
        order = VARIANTS[k % len(VARIANTS):] + VARIANTS[:k % len(VARIANTS)]
        for v in order:
            start = time.perf_counter()
            runners[v].steps(steps)
            per_step[v].append((time.perf_counter() - start) / steps)
    ref = runners["adam"].params()
    return {v: {"median_ms": 1e3 * statistics.median(per_step[v]),
                "spread_ms": 1e3 * (max(per_step[v]) - min(per_step[v])),
                "max_abs_diff": float((runners[v].params() - ref).abs().max())} for v in VARIANTS}


def peak_memory(variant: str, model_name: str, device: torch.device, steps: int) -> float:
    """Peak MiB of one variant alone: VmHWM of this (fresh) process on CPU, max allocated on CUDA."""
    runner = Runner(variant, model_name, device, batches(device))
    if device.type == "cuda":
        runner.steps(1)
        torch.cuda.reset_peak_memory_stats(device)
        runner.steps(steps)
        return torch.cuda.max_memory_allocated(device) / 2**20
    runner.steps(1)
    runner.steps(steps)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def in_subprocess(args: list[str], env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--allocator-tuned", action="store_true")
    ap.add_argument("--_time", help=argparse.SUPPRESS)
    ap.add_argument("--_memory", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args._time:  # child: timing of one model
        print(json.dumps(time_variants(args._time, device, args.rounds, args.steps)))
        return
    if args._memory:  # child: peak memory of one variant
        model_name, variant = args._memory.split(":")
        print(json.dumps({"peak_mib": peak_memory(variant, model_name, device, args.steps)}))
        return

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(f"date {datetime.date.today().isoformat()}  machine {cpu_name()} ({os.cpu_count()} cores)"
          f"{'  GPU ' + gpu if gpu else ''}  torch {torch.__version__}  threads {torch.get_num_threads()}"
          f"  python {platform.python_version()}")
    print(f"{args.rounds} rounds x {args.steps} steps per variant, interleaved; batch {BATCH}; Adam lr 1e-3")
    common = ["--device", args.device, "--rounds", str(args.rounds), "--steps", str(args.steps)]
    tuned_env = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**31)}
    for model_name in args.models.split(","):
        timing = {"default allocator": in_subprocess(common + ["--_time", model_name])}
        if args.allocator_tuned and device.type == "cpu":
            timing["glibc keeps freed memory"] = in_subprocess(common + ["--_time", model_name], tuned_env)
        peaks = {v: in_subprocess(common + ["--_memory", f"{model_name}:{v}"])["peak_mib"] for v in VARIANTS}
        n_params = sum(p.numel() for p in build(model_name).parameters())
        print(f"\n== {model_name}: {n_params:,} parameters ({4 * n_params / 2**20:.1f} MiB float32) ==")
        peak_label = "peak MiB (CUDA alloc)" if device.type == "cuda" else "peak RSS MiB"
        for label, res in timing.items():
            base, fused = res["adam"]["median_ms"], res["adam_fused"]["median_ms"]
            print(f"-- {label}")
            print(f"{'variant':<16} {'ms/step':>8} {'spread':>7} {'vs adam':>8} {'vs fused':>9} "
                  f"{'max|dp|':>9} {peak_label:>21}")
            for v in VARIANTS:
                r = res[v]
                print(f"{v:<16} {r['median_ms']:8.2f} {r['spread_ms']:7.2f} {r['median_ms'] / base:8.3f} "
                      f"{r['median_ms'] / fused:9.3f} {r['max_abs_diff']:9.1e} {peaks[v]:21.1f}")


if __name__ == "__main__":
    main()
