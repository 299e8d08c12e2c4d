"""ActorQ: int8 / fp16 / fp32 actors against each other, from one inference to the whole run.

    python benchmarks/rl.py [--widths 256,1024,2048] [--e2e-widths 2048] [--seeds 3] [--skip-e2e | --e2e-only]

Three parts, each interleaving the precisions (int8, fp16, fp32 in turn) after an untimed warm-up:
1. Actor inference: one batch-1 forward of a depth-3 MLP policy on CartPole states, one thread,
   at each width; median microseconds per call over repeats, and the ratio to fp32.
2. Actor env steps per second in process: `Actor.collect` with epsilon 0 (every step runs the
   policy), one thread; the step time split into inference and environment.
3. End to end on Ray (2 actors, each one thread): DQN on CartPole until the int8 or fp32 actors'
   greedy evaluation reaches a mean return of 195 over 20 episodes (`--until return=195`), the
   same seed for both precisions; time to target, env steps/s, and the breakdown of where the
   time goes (actor inference and env time summed over actors; learner, broadcast, quantize).
   The paper's setting is the 2048x3 policy; its fp32 learner step costs are printed first so the
   reader can see what a run at that width costs on this machine.
The machine may be shared: the load average is printed before and after; read ratios, not times.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time

import numpy as np
import torch

from haet.core.budget import Budget
from haet.core.record import cpu_name
from haet.rl import RLConfig, Until, encode_weights, load_weights, make_policy, quantize_policy, train
from haet.rl.actor import Actor
from haet.rl.learners import DQNLearner

PRECISIONS = ("int8", "fp16", "fp32")


def header() -> None:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, machine {cpu_name()} "
          f"({os.cpu_count()} cores), python {platform.python_version()}, torch {torch.__version__}, git {rev}")
    load()


def load() -> None:
    one, five, fifteen = os.getloadavg()
    busy = one > (os.cpu_count() or 1)
    print(f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} on {os.cpu_count()} cores"
          + ("  <- LOADED: other work shares the cores; times are slow and noisy, ratios less so" if busy else ""))


def inference(widths: list[int], calls: int, repeats: int) -> None:
    torch.set_num_threads(1)
    print(f"\n1. actor inference, batch 1, depth 3, {torch.get_num_threads()} thread: median us per call "
          f"({repeats} repeats of {calls} calls)")
    print(f"{'width':>6} {'int8 us':>9} {'fp16 us':>9} {'fp32 us':>9} {'fp32/int8':>10} {'fp32/fp16':>10}")
    rng = np.random.default_rng(0)
    states = [torch.as_tensor(rng.normal(0, 0.5, (1, 4)), dtype=torch.float32) for _ in range(calls)]
    for width in widths:
        torch.manual_seed(0)
        policy = make_policy(4, 2, width, 3)
        copies = {}
        for p in PRECISIONS:
            copies[p] = quantize_policy(make_policy(4, 2, width, 3), p)
            load_weights(copies[p], encode_weights(policy, p))
        times = {p: [] for p in PRECISIONS}
        with torch.no_grad():
            for p in PRECISIONS:  # warm-up
                for s in states[:20]:
                    copies[p](s)
            for _ in range(repeats):
                for p in PRECISIONS:
                    t = time.perf_counter()
                    for s in states:
                        copies[p](s)
                    times[p].append((time.perf_counter() - t) / calls * 1e6)
        med = {p: statistics.median(v) for p, v in times.items()}
        print(f"{width:>6} {med['int8']:>9.1f} {med['fp16']:>9.1f} {med['fp32']:>9.1f} "
              f"{med['fp32'] / med['int8']:>9.2f}x {med['fp32'] / med['fp16']:>9.2f}x")


def actor_steps(widths: list[int], steps: int, repeats: int) -> None:
    torch.set_num_threads(1)
    print(f"\n2. actor env steps/s in process (CartPole, epsilon 0, {steps} steps x {repeats} repeats, 1 thread)")
    print(f"{'width':>6} {'precision':>9} {'steps/s':>9} {'inference':>10} {'env':>6} {'ratio to fp32':>14}")
    for width in widths:
        torch.manual_seed(0)
        payloads = {p: encode_weights(make_policy(4, 2, width, 3), p) for p in PRECISIONS}
        actors = {p: Actor("CartPole-v1", p, width, 3, seed=0, index=0) for p in PRECISIONS}
        for p in PRECISIONS:
            actors[p].set_weights(payloads[p])
            actors[p].collect(50, 0.0)  # warm-up
        rates = {p: [] for p in PRECISIONS}
        split = {p: [0.0, 0.0] for p in PRECISIONS}
        for _ in range(repeats):
            for p in PRECISIONS:
                t = time.perf_counter()
                r = actors[p].collect(steps, 0.0)
                rates[p].append(steps / (time.perf_counter() - t))
                split[p][0] += r["inference_s"]
                split[p][1] += r["env_s"]
        for p in PRECISIONS:
            total = sum(split[p])
            print(f"{width:>6} {p:>9} {statistics.median(rates[p]):>9.0f} {split[p][0] / total:>9.0%} "
                  f"{split[p][1] / total:>6.0%} {statistics.median(rates[p]) / statistics.median(rates['fp32']):>13.2f}x")


def learner_cost(widths: list[int]) -> None:
    threads = torch.get_num_threads()
    print(f"\n   fp32 learner step (DQN, batch 64, depth 3, {threads} thread(s)): median ms over 5 steps after 2 warm-up")
    rng = np.random.default_rng(0)
    batch = {"obs": rng.normal(size=(64, 4)).astype(np.float32), "next_obs": rng.normal(size=(64, 4)).astype(np.float32),
             "action": rng.integers(0, 2, 64), "reward": np.ones(64, np.float32), "done": np.zeros(64, np.float32)}
    for width in widths:
        learner = DQNLearner(4, 2, width, 3, lr=1e-3, gamma=0.99, tau=0.01, device=torch.device("cpu"))
        times = []
        for i in range(7):
            t = time.perf_counter()
            learner.update(batch)
            if i >= 2:
                times.append(time.perf_counter() - t)
        print(f"   width {width:>5}: {statistics.median(times) * 1e3:8.1f} ms per learner step")


def ray_throughput(width: int, seconds: float, repeats: int) -> None:
    """Env steps/s of the whole acting pipeline on Ray (2 actors, transitions into the learner's
    buffer) with the learner idle (learning_starts = buffer size), int8 and fp32 interleaved."""
    import ray

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    temp = tempfile.mkdtemp(prefix="haet-ray-bench-")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, logging_level="ERROR", log_to_driver=False)
    print(f"\n2b. end-to-end env steps/s on Ray, 2 actors (1 thread each), policy {width}x3, no learning, "
          f"{seconds:.0f} s per run, {repeats} repeat(s), epsilon 0.05 (95% of steps run the policy)")
    rates = {"int8": [], "fp32": []}
    try:
        for _ in range(repeats):
            for p in ("int8", "fp32"):
                config = RLConfig(env="CartPole-v1", backend="ray", actors=2, actor_precision=p, policy_width=width,
                                  policy_depth=3, seed=0, learning_starts=50_000, explore_steps=1, eval_every=10**9)
                r = train(config, budget=Budget(time_s=seconds))
                rates[p].append(r.method_metrics["rl/actor_steps_per_s"])
                mm = r.method_metrics
                print(f"   {p}: {mm['rl/actor_steps_per_s']:.0f} env steps/s (inference {mm['rl/inference_s']:.1f} s, "
                      f"env {mm['rl/env_s']:.1f} s summed over actors)")
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    print(f"   median int8 / fp32: {statistics.median(rates['int8']) / statistics.median(rates['fp32']):.2f}x")


def end_to_end(width: int, seeds: int, budget_s: float) -> None:
    import ray

    print(f"\n3. end to end on Ray: DQN CartPole to mean return 195, 2 actors (1 thread each), policy {width}x3, "
          f"learner threads {RLConfig().learner_threads}, replay ratio {RLConfig().updates_per_step:g}, "
          f"budget {budget_s:.0f} s per run")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    temp = tempfile.mkdtemp(prefix="haet-ray-bench-")
    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, logging_level="ERROR", log_to_driver=False)
    print(f"   ray.init: {time.perf_counter() - t:.1f} s (not counted in the runs)")
    keys = ("inference_s", "env_s", "quantize_s", "broadcast_s", "learner_s", "wait_s", "eval_s")
    print(f"   {'seed':>4} {'actors':>6} {'stopped by':>13} {'to 195 s':>9} {'env st':>7} {'env st/s':>9} "
          + " ".join(f"{k:>12}" for k in keys))
    results = {"int8": [], "fp32": []}
    try:
        for seed in range(seeds):
            for p in ("int8", "fp32"):
                config = RLConfig(env="CartPole-v1", backend="ray", actors=2, actor_precision=p, policy_width=width,
                                  policy_depth=3, seed=seed, eval_every=2000, actor_timeout_s=600)
                r = train(config, budget=Budget(time_s=budget_s), until=Until(195.0))
                mm = r.method_metrics
                tt = r.cost["time_to_target_s"]
                results[p].append(tt)
                print(f"   {seed:>4} {p:>6} {r.stopped_by:>13} {'-' if tt is None else f'{tt:.1f}':>9} "
                      f"{mm['rl/env_steps']:>7} {mm['rl/actor_steps_per_s']:>9.0f} "
                      + " ".join(f"{mm['rl/' + k]:>12.2f}" for k in keys) + (f"  {r.error}" if r.error else ""))
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    both = [(a, b) for a, b in zip(results["int8"], results["fp32"]) if a is not None and b is not None]
    if both:
        ratios = [b / a for a, b in both]
        print(f"   time to 195, fp32 / int8 per seed: {', '.join(f'{x:.2f}x' for x in ratios)}; "
              f"median {statistics.median(ratios):.2f}x ({len(both)} seed(s) where both reached it)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="256,1024,2048")
    ap.add_argument("--e2e-widths", default="2048", help="policy widths of the end-to-end runs (the paper: 2048)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=600.0, help="time budget of each end-to-end run")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--e2e-only", action="store_true", help="run part 3 only")
    ap.add_argument("--ray-throughput-only", action="store_true", help="run part 2b only")
    ap.add_argument("--ray-repeats", type=int, default=3, help="repeats of part 2b (30 s per precision each)")
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    header()
    if args.ray_throughput_only:
        ray_throughput(2048, 30.0, args.ray_repeats)
        load()
        return
    if not args.e2e_only:
        inference(widths, args.calls, args.repeats)
        actor_steps([w for w in widths if w in (256, 2048)] or widths, 500, 3)
        learner_cost(widths)
        ray_throughput(2048, 30.0, args.ray_repeats)
    if not args.skip_e2e:
        for w in (int(x) for x in args.e2e_widths.split(",")):
            end_to_end(w, args.seeds, args.budget_s)
    print()
    load()


if __name__ == "__main__":
    main()
