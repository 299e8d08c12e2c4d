"""Optimizer fusion against the standard loop: median step time and peak memory, interleaved.

Models (mnist5k batches of 64, Adam lr 1e-3):
- mlp: 784-2048-2048-2048-10 (10.0 M parameters; the optimizer step is a real share of the step)
- cnn: the mnist5k default (DESIGN.md), 20,490 parameters

Variants, each on its own copy of the same initial weights and the same batches:
- adam:            standard loop, torch.optim.Adam() (on CPU its default is the per-parameter loop)
- adam_fused:      standard loop, torch.optim.Adam(fused=True) (what a CPU user would pick)
- fusion_backward: haet.methods.fusion.fuse_optimizer(model, Adam(), "backward")
- fusion_forward:  haet.methods.fusion.fuse_optimizer(model, Adam(), "forward")

Each variant lives in its own process (so no variant inherits another's allocator history) and
the processes are commanded in interleaved rounds: after `--steps` warm-up steps, `--rounds`
rounds in which every variant runs `--steps` steps, in a rotated order, one process at a time.
Printed: per-step medians over rounds, their spread (max - min), ratios to `adam` and to
`adam_fused`, the largest parameter difference from each after all steps (fusion must not change
the maths), and each process's peak memory (VmHWM on CPU; torch.cuda.max_memory_allocated on
CUDA). With `--allocator-tuned` the timing is repeated with glibc told to keep freed memory
(MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ raised), to show what the allocator accounts for.

    python benchmarks/fusion.py [--device cpu|cuda] [--rounds 15] [--steps 10] [--allocator-tuned]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
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


def worker(model_name: str, variant: str, device: torch.device, warmup: int) -> None:
    """A child process holding one variant; it obeys `run N`, `finish PATH` lines on stdin."""
    runner = Runner(variant, model_name, device, batches(device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runner.steps(warmup)  # allocations, optimizer state, kernels
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, arg = line.split()
        if cmd == "run":
            start = time.perf_counter()
            runner.steps(int(arg))
            print(time.perf_counter() - start, flush=True)
        else:  # finish: save the parameters, report this process's peak memory
            torch.save(runner.params(), arg)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) / 2**20
            else:
                with open("/proc/self/status") as f:
                    peak = next(int(v.split()[1]) for v in f if v.startswith("VmHWM")) / 1024
            print(peak, flush=True)
            return


def time_variants(model_name: str, args, env: dict | None = None) -> dict:
    """Each variant in its own process (its own allocator history), commanded in interleaved rounds."""
    procs = {v: subprocess.Popen([sys.executable, __file__, "--device", args.device, "--_worker",
                                  f"{model_name}:{v}:{args.steps}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, env={**os.environ, **(env or {})}) for v in VARIANTS}

    def ask(v: str, line: str) -> float:
        procs[v].stdin.write(line + "\n")
        procs[v].stdin.flush()
        return float(procs[v].stdout.readline())

    for v in VARIANTS:
        assert procs[v].stdout.readline().strip() == "ready"
    per_step = {v: [] for v in VARIANTS}
    for k in range(args.rounds):
        for v in VARIANTS[k % len(VARIANTS):] + VARIANTS[:k % len(VARIANTS)]:
            per_step[v].append(ask(v, f"run {args.steps}") / args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        peaks = {v: ask(v, f"finish {tmp}/{v}.pt") for v in VARIANTS}
        params = {v: torch.load(f"{tmp}/{v}.pt") for v in VARIANTS}
    for p in procs.values():
        p.wait()
    return {v: {"median_ms": 1e3 * statistics.median(per_step[v]),
                "spread_ms": 1e3 * (max(per_step[v]) - min(per_step[v])), "peak_mib": peaks[v],
                "diff_adam": float((params[v] - params["adam"]).abs().max()),
                "diff_fused": float((params[v] - params["adam_fused"]).abs().max())} for v in VARIANTS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--allocator-tuned", action="store_true")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args._worker:
        model_name, variant, warmup = args._worker.split(":")
        worker(model_name, variant, device, int(warmup))
        return

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(f"date {datetime.date.today().isoformat()}  machine {cpu_name()} ({os.cpu_count()} cores)"
          f"{'  GPU ' + gpu if gpu else ''}  torch {torch.__version__}  threads {torch.get_num_threads()}"
          f"  python {platform.python_version()}")
    print(f"each variant in its own process; {args.rounds} interleaved rounds x {args.steps} steps after "
          f"{args.steps} warm-up steps; batch {BATCH}; Adam lr 1e-3")
    tuned_env = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**31)}
    peak_label = "peak MiB (CUDA alloc)" if device.type == "cuda" else "peak RSS MiB"
    for model_name in args.models.split(","):
        timing = {"default allocator": time_variants(model_name, args)}
        if args.allocator_tuned and device.type == "cpu":
            timing["glibc keeps freed memory (MALLOC_MMAP/TRIM_THRESHOLD_ raised)"] = \
                time_variants(model_name, args, tuned_env)
        n_params = sum(p.numel() for p in build(model_name).parameters())
        print(f"\n== {model_name}: {n_params:,} parameters ({4 * n_params / 2**20:.1f} MiB float32) ==")
        for label, res in timing.items():
            base, fused = res["adam"]["median_ms"], res["adam_fused"]["median_ms"]
            print(f"-- {label}")
            print(f"{'variant':<16} {'ms/step':>8} {'spread':>7} {'vs adam':>8} {'vs fused':>9} "
                  f"{'max|dp| adam':>13} {'max|dp| fused':>14} {peak_label:>21}")
            for v in VARIANTS:
                r = res[v]
                print(f"{v:<16} {r['median_ms']:8.2f} {r['spread_ms']:7.2f} {r['median_ms'] / base:8.3f} "
                      f"{r['median_ms'] / fused:9.3f} {r['diff_adam']:13.1e} {r['diff_fused']:14.1e} "
                      f"{r['peak_mib']:21.1f}")


if __name__ == "__main__":
    main()
