"""On-device training: MoIL's three optimizations against full fine-tuning, and few labels.

    python benchmarks/incremental.py [--updates 5] [--repeats 3] [--shift rotate] [--fewshot-unlabelled 500]

Incremental (mnist5k, mnist5k-cnn pre-trained on the global 3/4 of the training set, user data =
the other 1/4 under --shift): the same U updates (3 epochs each, Adam 1e-3) run as
full fine-tuning, last-layer, last-layer + feature cache, last-layer + cache + global mixing
(mix 0.1). Time per update = training time + cache fill (median over updates and repeats), wall and
CPU seconds of this process; ratios use CPU seconds, since the machine is shared. Accuracies
after the last update (deterministic seeds).
Few labels: prototype (random-init trunk, and the pre-trained trunk) and FixMatch-like (from
scratch, --fewshot-unlabelled unlabelled samples, --fewshot-epochs epochs) at 1, 5, 10 labels per class.
Energy is the FLOP model (source: model), never a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import copy
import statistics
import tempfile
import warnings

import torch

from haet.cli import main as haet_main
from haet.core.record import RunRecord
from haet.core.saving import save_model
from haet.core.trainer import Trainer
from haet.data.loader import TensorData
from haet.data.tasks import get_task
from haet.incremental import IncrementalConfig, run_updates
from haet.incremental.shifts import user_data
from haet.models import build_model

from _common import header

CONFIGS = {
    "full fine-tuning": dict(),
    "last layer": dict(last_layer=True),
    "last layer + cache": dict(last_layer=True, cache_mb=16),
    "all three (+ mix 0.1)": dict(last_layer=True, cache_mb=16, mix=0.1),
}


def incremental(args) -> str:
    task = get_task("mnist5k")
    train, test = task.load(0, None)
    n = len(train) * 3 // 4
    g, gt = TensorData(train.x[:n].float(), train.y[:n]), TensorData(test.x.float(), test.y)
    (ux, uy), (vx, vy) = user_data(args.shift, train.x[n:].float(), train.y[n:], 0)
    u, ut = TensorData(ux, uy), TensorData(vx, vy)
    torch.manual_seed(0)
    model = build_model("mnist5k-cnn", task.input_shape, task.num_classes)
    Trainer(model, g, None, device="cpu", seed=0, progress=False).fit(3)
    run_updates(copy.deepcopy(model), g, gt, u, ut, IncrementalConfig(updates=1, epochs=1))  # warm-up
    rows = {}
    for name, kw in CONFIGS.items():
        times, cpu, res = [], [], None
        for _ in range(args.repeats):
            res = run_updates(copy.deepcopy(model), g, gt, u, ut, IncrementalConfig(updates=args.updates, **kw))
            times += [r["time_s"] for r in res]
            cpu += [r["cpu_s"] for r in res]
        rows[name] = dict(t=statistics.median(times), cpu=statistics.median(cpu), user=res[-1]["user_accuracy"],
                          glob=res[-1]["global_accuracy"], flops=statistics.median(r["flops"] for r in res),
                          energy=statistics.median(r["energy_j"] for r in res), cache=res[-1]["cache_bytes"])
        print(f"  done: {name}", flush=True)
    model.eval()
    from haet.core.evaluation import evaluate
    before_u = evaluate(model, ut, torch.nn.functional.cross_entropy, torch.device("cpu"))["accuracy"]
    before_g = evaluate(model, gt, torch.nn.functional.cross_entropy, torch.device("cpu"))["accuracy"]
    base = rows["full fine-tuning"]
    lines = [f"## incremental: mnist5k, shift {args.shift}, {args.updates} updates x 3 epochs, {args.repeats} repeats; "
             f"pre-trained model: user {before_u:.3f}, global {before_g:.3f}",
             f"{'configuration':<24}{'s/update':>10}{'speed-up':>10}{'cpu-s/upd':>10}{'FLOPs/upd':>11}"
             f"{'J/upd (model)':>14}{'user acc':>10}{'global acc':>11}{'cache MiB':>10}"]
    for name, r in rows.items():
        lines.append(f"{name:<24}{r['t']:>10.3f}{base['t'] / r['t']:>9.1f}x{r['cpu']:>10.3f}{r['flops']:>11.2e}"
                     f"{r['energy']:>14.2e}{r['user']:>10.3f}{r['glob']:>11.3f}{r['cache'] / 2**20:>10.2f}")
    # Shares and the target on CPU seconds (fill + training, this process only): wall time on a
    # machine shared with other jobs moves by several times between runs.
    saved = base["cpu"] - rows["last layer + cache"]["cpu"]
    ll = base["cpu"] - rows["last layer"]["cpu"]
    lines.append(f"share of the CPU-time saving (full -> last layer + cache, {saved:.3f} cpu-s/update): last layer "
                 f"{100 * ll / saved:.0f}%, cache {100 * (saved - ll) / saved:.0f}%; mixing costs "
                 f"{rows['all three (+ mix 0.1)']['cpu'] - rows['last layer + cache']['cpu']:+.3f} cpu-s/update")
    for name in ("last layer + cache", "all three (+ mix 0.1)"):
        best = rows[name]
        lines.append(f"target >= 20x at <= 1 pt lower user and global accuracy, {name}: {base['cpu'] / best['cpu']:.1f}x "
                     f"CPU time ({base['t'] / best['t']:.1f}x wall), user {100 * (best['user'] - base['user']):+.1f} pt, "
                     f"global {100 * (best['glob'] - base['glob']):+.1f} pt")
    return "\n".join(lines), model


def fewshot(args, pretrained) -> str:
    lines = [f"## few labels: mnist5k test accuracy; FixMatch-like from scratch on {args.fewshot_unlabelled} "
             f"unlabelled samples, {args.fewshot_epochs} epochs, threshold 0.95; "
             "prototype time = computing the prototypes",
             f"{'method':<34}{'k':>4}{'accuracy':>10}{'time s':>9}{'J (model)':>11}"]
    with tempfile.TemporaryDirectory() as tmp:
        save_model(f"{tmp}/pre", pretrained, task="mnist5k", model_name="mnist5k-cnn", input_shape=(1, 28, 28),
                   num_classes=10)
        runs = [("prototype (random-init trunk)", ["--method", "prototype"]),
                ("prototype (pre-trained trunk)", ["--method", "prototype", "--model-dir", f"{tmp}/pre"]),
                ("fixmatch-like (from scratch)", ["--method", "fixmatch", "--unlabelled",
                                                 str(args.fewshot_unlabelled)] + ["--epochs", str(args.fewshot_epochs)])]
        for name, extra in runs:
            for k in (1, 5, 10):
                out = f"{tmp}/{len(lines)}"
                with contextlib.redirect_stdout(io.StringIO()):
                    assert haet_main(["fewshot", "--labels-per-class", str(k), *extra, "--out", out, "--quiet"]) == 0
                mm = RunRecord.load(out).method_metrics
                lines.append(f"{name:<34}{k:>4}{mm['fewshot/accuracy']:>10.3f}{mm['fewshot/time_s']:>9.2f}"
                             f"{mm['fewshot/energy_j']:>11.2e}")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--updates", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shift", default="rotate")
    p.add_argument("--fewshot-unlabelled", type=int, default=500)
    p.add_argument("--fewshot-epochs", type=int, default=10)
    args = p.parse_args()
    warnings.simplefilter("ignore")  # the contention warning repeats per run; the header states the load
    print(header("benchmarks/incremental.py", threads=1))
    text, model = incremental(args)
    print(text, flush=True)
    print(fewshot(args, model))
    print(header("benchmarks/incremental.py (end)", threads=1).split(", load")[1].join(["# load", ""]))
