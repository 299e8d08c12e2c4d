"""``haet search``: budgeted searches. ``qs``: the least-energy bit-width × width (QS-NAS).

    haet search qs --task mnist5k --target-accuracy 0.97 --bits 2,4,8 --scales 0.5,1,2
                   [--model mnist5k-cnn] [--accelerator zedboard|small-asic|FILE.toml]
                   [--epochs 3] [--seeds 1] [--max-trainings 8] --out DIR

Writes DIR/qs.json (every point: q, s, accuracy measured or predicted, energy, latency, verified),
DIR/report.md, DIR/qs.png (accuracy against energy per inference, Pareto front, chosen point),
DIR/record.json (the chosen point's accelerator estimate under ``accel/...``, the search's under
``qs/...``) and the record of every training under DIR/runs/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HELP = ("budgeted searches: qs (least-energy bit-width x width for a target accuracy), "
        "recipe (the best challenge recipe under a time budget, NOMAD or optuna)")

BITS = (1, 2, 3, 4, 5, 6, 7, 8, 32)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="search", required=True, parser_class=type(parser))
    q = sub.add_parser("qs", help="least-energy (bits, width scale) meeting a target accuracy, verified by training")
    q.add_argument("--task", default="mnist5k", help="a task from `haet tasks`")
    q.add_argument("--model", help="a model family whose widths scale: mnist5k-cnn or mlp (default: the task's)")
    q.add_argument("--target-accuracy", type=float, required=True, help="test accuracy to meet, in (0, 1)")
    q.add_argument("--bits", default="2,4,8", help="bit-widths of weights and activations: 1 (binary), 2-8, 32 (float)")
    q.add_argument("--scales", default="0.5,1,2", help="width scales, e.g. 0.5,1,2")
    q.add_argument("--accelerator", default="zedboard", help="zedboard, small-asic, or a TOML file")
    q.add_argument("--epochs", type=int, default=3, help="epochs per training (default 3)")
    q.add_argument("--seeds", type=int, default=1, help="seeds per point (default 1)")
    q.add_argument("--max-trainings", type=int, default=8, help="points the search may train (default 8)")
    q.add_argument("--out", required=True, help="directory for qs.json, report.md, qs.png, record.json, runs/")
    q.add_argument("--overwrite", action="store_true", help="replace a previous search in --out")
    q.add_argument("--quiet", action="store_true")
    r = sub.add_parser("recipe", help="the best recipe under a challenge time budget (NOMAD or optuna), scored on "
                                      "held-out training data, then re-run as a challenge")
    r.add_argument("--task", default="mnist5k", help="a classification task (see `haet challenge --help`)")
    r.add_argument("--recipe", default="fast", help="the recipe whose fields are searched (default fast)")
    r.add_argument("--time-budget", type=float, default=10.0, help="wall seconds per challenge run (default 10)")
    r.add_argument("--search-budget", default="20", help="evaluations (20) or wall time of the search (600s, 10m)")
    r.add_argument("--backend", default="nomad", help="nomad (PyNomadBBO) or optuna (TPE with pruning)")
    r.add_argument("--space", default="default", help="small, default or full (adds augmentation)")
    r.add_argument("--eval-runs", type=int, default=1, help="runs per evaluation, seeds 0..N-1 (default 1)")
    r.add_argument("--holdout", type=float, default=0.2, help="share of the training split scored (default 0.2)")
    r.add_argument("--runs", type=int, default=5, help="runs of the final challenge of the best recipe (default 5)")
    r.add_argument("--data-dir", help="files of tasks that need them")
    r.add_argument("--device", default="cpu")
    r.add_argument("--seed", type=int, default=0, help="the solver's seed")
    r.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    r.add_argument("--out", required=True, help="directory for search.json, best/ (the challenge), record.json")
    r.add_argument("--quiet", action="store_true")


def _numbers(text: str, kind: type, name: str, check) -> list:
    from ..core.errors import ConfigError

    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{name} must be comma-separated numbers, got {text!r}") from None
    bad = [v for v in values if not check(v)]
    if not values or bad:
        raise ConfigError(f"--{name}: bad value(s) {bad or text!r}")
    return sorted(set(values))


def run(args) -> int:
    if args.search == "qs":
        return run_qs(args)
    if args.search == "recipe":
        from .recipe_cli import run_recipe

        return run_recipe(args)
    return 2


def run_qs(args) -> int:
    from rich.console import Console

    from ..core.errors import ConfigError
    from ..data.tasks import check_model_for_task, get_task
    from ..hardware import get_accelerator
    from .qs import SCALABLE, grid_points, pareto, search

    console = Console(stderr=True, quiet=args.quiet)
    bits = _numbers(args.bits, int, "bits", lambda v: v in BITS)
    scales = _numbers(args.scales, float, "scales", lambda v: 0 < v <= 16)
    if not 0 < args.target_accuracy < 1:
        raise ConfigError(f"--target-accuracy must be in (0, 1), got {args.target_accuracy}")
    for name, v, lo in (("epochs", args.epochs, 1), ("seeds", args.seeds, 1), ("max-trainings", args.max_trainings, 1)):
        if v < lo:
            raise ConfigError(f"--{name} must be at least {lo}, got {v}")
    task = get_task(args.task)
    model_name = check_model_for_task(task, args.model)
    if model_name not in SCALABLE:
        raise ConfigError(f"model {model_name!r} has no width scale; choose one of: {', '.join(SCALABLE)}")
    accel = get_accelerator(args.accelerator)
    out = Path(args.out)
    existing = [f for f in ("qs.json", "record.json", "report.md") if (out / f).exists()]
    if existing and not args.overwrite:
        raise ConfigError(f"{out} already holds {', '.join(existing)}; pass --overwrite or choose another --out")
    grid = grid_points(accel, model_name, task.input_shape, task.num_classes, bits, scales)
    data = {seed: task.load(seed, None) for seed in range(args.seeds)}
    started = time.perf_counter()
    train_s = [0.0]

    def train(q: int, s: float) -> list[float]:
        accs = []
        for seed in range(args.seeds):
            record = _train_point(task, model_name, q, s, seed, args.epochs, data[seed],
                                  out / "runs" / f"q{q}-s{s:g}" / f"seed{seed}")
            train_s[0] += record.cost.get("train_s", 0.0)
            accs.append(record.metrics.get("accuracy", 0.0))
        return accs

    def on_point(p, why):
        console.print(f"q={p.bits:<2} s={p.scale:<4g} accuracy {p.accuracy:.4f}  energy/inference "
                      f"{p.energy_j:.3e} J ({accel.name} model)  [{why}]", markup=False)

    result = search(grid, train, args.target_accuracy, max_trainings=args.max_trainings, on_point=on_point)
    result["wall_s"], result["train_s"] = time.perf_counter() - started, train_s[0]
    paths = write_outputs(out, result, args, accel, task.name, model_name, pareto(result["points"]))
    chosen = result["chosen"]
    if chosen is None:
        best = result["best"]
        print(f"haet: no trained point met accuracy {args.target_accuracy}; the best was q={best.bits}, "
              f"s={best.scale:g} at {best.accuracy:.4f} (see {paths['report']})", file=sys.stderr)
    else:
        print(f"chosen: q={chosen.bits}, s={chosen.scale:g}, accuracy {chosen.accuracy:.4f}, "
              f"{chosen.energy_j:.3e} J per inference (model:{accel.name}), {result['trainings']} trainings")
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0 if chosen is not None else 1


def _train_point(task, model_name, q, s, seed, epochs, split, out_dir):
    import haet
    from ..methods import parse_entry
    from .qs import scaled_model

    haet.seed_everything(seed)
    model = scaled_model(model_name, task.input_shape, task.num_classes, s)
    entry = "baseline" if q == 32 else "binary_connect" if q == 1 else f"qat:bits_w={q},bits_a={q}"
    train, test = split
    trainer = haet.Trainer(model, train, test, methods=parse_entry(entry), seed=seed, progress=False,
                           loss_fn=task.loss_fn, eval_fn=task.eval_fn, out_dir=out_dir, task=task.name,
                           model_name=f"{model_name}x{s:g}", label=entry)
    return trainer.fit(epochs)


def write_outputs(out: Path, result: dict, args, accel, task: str, model: str, front) -> dict:
    from .. import __version__
    from ..core.record import RunRecord

    out.mkdir(parents=True, exist_ok=True)
    chosen = result["chosen"]
    points = sorted(result["points"], key=lambda p: (p.bits, p.scale))
    payload = {"task": task, "model": model, "target_accuracy": args.target_accuracy, "accelerator": accel.name,
               "energy_source": f"model:{accel.name}", "trainings": result["trainings"],
               "chosen": chosen.to_dict() if chosen else None, "points": [p.to_dict() for p in points]}
    (out / "qs.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [f"# QS search: {task} / {model}, target accuracy {args.target_accuracy}", "",
             f"Accelerator model `{accel.name}` ({accel.source}); energy per inference at batch 1 is modelled, "
             f"not measured. {result['trainings']} trainings of {args.epochs} epochs × {args.seeds} seed(s).", "",
             "| bits | scale | accuracy | predicted | energy/inference (J) | latency (s) | DRAM bytes | verified | Pareto |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        acc = "–" if p.accuracy is None else f"{p.accuracy:.4f}"
        pred = "–" if p.predicted is None or p.predicted != p.predicted else f"{p.predicted:.4f}"
        mark = " **chosen**" if p is chosen else ""
        lines.append(f"| {p.bits} | {p.scale:g} | {acc}{mark} | {pred} | {p.energy_j:.3e} | {p.latency_s:.3e} | "
                     f"{p.dram_bytes:.0f} | {'yes' if p.verified else ''} | {'yes' if p in front else ''} |")
    lines += ["", "![accuracy against energy per inference](qs.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    plot = _plot(out / "qs.png", points, front, chosen, args.target_accuracy, accel.name)
    metrics = {"qs/trainings": result["trainings"], "qs/search_train_s": result["train_s"],
               "qs/target_accuracy": args.target_accuracy, "qs/met": chosen is not None}
    if chosen is not None:
        metrics.update({"qs/bits": chosen.bits, "qs/scale": chosen.scale,
                        "accel/energy_per_inference_j": chosen.energy_j, "accel/latency_s": chosen.latency_s,
                        "accel/dram_bytes": chosen.dram_bytes, "accel/source": f"model:{accel.name}"})
    best = chosen or result["best"]
    record = RunRecord(task=task, model=model, label="search qs", seed=0, epochs=args.epochs,
                       stopped_by="target" if chosen else "budget:trainings",
                       metrics={"accuracy": best.accuracy} if best else {},
                       cost={"wall_s": result["wall_s"], "train_s": result["train_s"]},
                       method_metrics=metrics, haet_version=__version__)
    record.save(out)
    return {"report": out / "report.md", "plot": plot, "points": out / "qs.json", "record": out / "record.json"}


def _plot(path: Path, points, front, chosen, target: float, accel: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    trained = [p for p in points if p.accuracy is not None]
    for p in trained:
        ax.scatter(p.energy_j, p.accuracy, s=40, marker="o" if not p.verified else "s", color="tab:blue", zorder=3)
        ax.annotate(f"q{p.bits} s{p.scale:g}", (p.energy_j, p.accuracy), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    for p in points:
        if p.accuracy is None and p.predicted is not None and p.predicted == p.predicted:
            ax.scatter(p.energy_j, p.predicted, s=30, facecolors="none", edgecolors="gray", zorder=2)
    if len(front) > 1:
        ax.step([p.energy_j for p in front], [p.accuracy for p in front], where="post", color="tab:red",
                alpha=0.6, label="Pareto front")
    if chosen is not None:
        ax.scatter(chosen.energy_j, chosen.accuracy, s=160, marker="*", color="black", zorder=4, label="chosen")
    ax.axhline(target, color="gray", ls="--", lw=0.8, label=f"target {target}")
    ax.set_xscale("log")
    ax.set_xlabel(f"energy per inference (J, model:{accel})")
    ax.set_ylabel("test accuracy")
    ax.set_title("QS search: trained (filled; squares verified), predicted (hollow)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
