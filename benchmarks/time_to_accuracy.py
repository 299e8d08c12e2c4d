"""Time to accuracy on mnist5k: the plain PyTorch loop of DESIGN.md's default against `--recipe fast`.

    python benchmarks/time_to_accuracy.py [--seeds 5] [--max-s 60] [--eval-every 10] [--threads 1]

For each seed, interleaved (plain, then fast, same data): training seconds (evaluation excluded,
wall clock of the steps) until the first evaluation at >= 95% and >= 97% test accuracy, and the
best accuracy of the evaluations within 10 s of training. Both evaluate the 1,000 test images
every `--eval-every` optimizer steps (the DAWNBench/MLPerf convention for time to accuracy). The
plain loop is a literal PyTorch loop (mnist5k-cnn, Adam 1e-3, batch 64); the fast recipe runs
through haet's Trainer (`haet.recipes.fast`: its overhead is counted). One untimed warm-up step
of each first. Printed: per-seed figures, medians and the ratio plain / fast of time to 95%.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _common import header  # noqa: E402
from haet import Trainer, seed_everything  # noqa: E402
from haet.core.optim import make_optimizer  # noqa: E402
from haet.core.options import TrainOptions  # noqa: E402
from haet.data.tasks import get_task  # noqa: E402
from haet.models import build_model  # noqa: E402
from haet.recipes import fast  # noqa: E402

TARGETS = (0.95, 0.97)


def _accuracy(model, test) -> float:
    model.eval()
    with torch.no_grad():
        acc = float((model(test.x).argmax(1) == test.y).float().mean())
    model.train()
    return acc


def plain(train, test, seed: int, max_s: float, every: int) -> list[tuple[float, float]]:
    """The plain loop: (train seconds, accuracy) at every evaluation."""
    seed_everything(seed)
    model = build_model("mnist5k-cnn", (1, 28, 28), 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    points, t, step = [], 0.0, 0
    while t < max_s:
        perm = torch.randperm(len(train), generator=g)
        for i in range(0, len(train), 64):
            t0 = time.perf_counter()
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            t += time.perf_counter() - t0
            step += 1
            if step % every == 0:
                points.append((t, _accuracy(model, test)))
                if points[-1][1] >= TARGETS[-1] or t >= max_s:
                    return points
    return points


def recipe(train, test, seed: int, max_s: float, every: int) -> list[tuple[float, float]]:
    """`haet.recipes.fast` through the Trainer, stopped at the last target or `max_s`."""
    r = fast("mnist5k")
    seed_everything(seed)
    model = r.build_model((1, 28, 28), 10)
    trainer = Trainer(model, train, test, optimizer=make_optimizer(r.optimizer), methods=r.build_methods(),
                      scheduler=r.schedule(), batch_size=r.batch_size, seed=seed, progress=False,
                      until={"accuracy": TARGETS[-1]}, options=TrainOptions(eval_every=every),
                      budget=__import__("haet").Budget(time_s=max_s))
    record = trainer.fit(epochs=r.epochs)
    return [(line["train_s"], line["accuracy"]) for line in record.history if "accuracy" in line]


def summary(points: list[tuple[float, float]]) -> dict:
    out = {f"t{int(tg * 100)}": next((t for t, a in points if a >= tg), None) for tg in TARGETS}
    out["best10"] = max((a for t, a in points if t <= 10.0), default=None)
    return out


def _fmt(v, unit="s") -> str:
    return "not reached" if v is None else (f"{v:.2f} {unit}" if unit else f"{v:.4f}")


def _median(values: list) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if len(got) == len(values) and got else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--max-s", type=float, default=60.0, help="training seconds before a run gives up")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    print(header("benchmarks/time_to_accuracy.py", args.threads))
    train, test = get_task("mnist5k").load(0, None)
    plain(train, test, 0, 1e-9, 1)
    recipe(train, test, 0, 1e-9, 1)  # warm-up: one step each
    rows: dict[str, list[dict]] = {"plain": [], "fast": []}
    for seed in range(args.seeds):
        for name, fn in (("plain", plain), ("fast", recipe)):
            s = summary(fn(train, test, seed, args.max_s, args.eval_every))
            rows[name].append(s)
            print(f"seed {seed} {name:5}: to 95% {_fmt(s['t95'])}, to 97% {_fmt(s['t97'])}, "
                  f"best in 10 s {_fmt(s['best10'], '')}", flush=True)
    print("\n| run | median time to 95% | median time to 97% | median best accuracy in 10 s |\n|---|---|---|---|")
    med = {}
    for name, rs in rows.items():
        med[name] = {k: _median([r[k] for r in rs]) for k in ("t95", "t97", "best10")}
        print(f"| {name} | {_fmt(med[name]['t95'])} | {_fmt(med[name]['t97'])} | {_fmt(med[name]['best10'], '')} |")
    a, b = med["plain"]["t95"], med["fast"]["t95"]
    if a and b:
        print(f"\nratio plain / fast, time to 95%: {a / b:.2f}×")
    elif b:  # the plain loop missed 95% in some runs: its time is at least --max-s there
        bound = statistics.median([r["t95"] or args.max_s for r in rows["plain"]])
        print(f"\nratio plain / fast, time to 95%: at least {bound / b:.2f}× (the plain loop did not reach 95% "
              f"within {args.max_s:g} s in {sum(r['t95'] is None for r in rows['plain'])} of {args.seeds} runs)")
    else:
        print("\nratio: not computable (the fast recipe did not reach 95% within --max-s)")
    print(f"(target: 3×; {args.seeds} seeds, interleaved, {args.threads} thread(s); "
          "times are training seconds, evaluation excluded)")


if __name__ == "__main__":
    main()
