"""``haet incremental``: a pre-trained model updated on one user's data (MoIL).

    haet incremental --task mnist5k --shift rotate --updates 5 [--last-layer] [--split N|NAME]
                     [--cache-mb 16] [--cache-dtype float32|bfloat16|float16] [--mix 0.1]
                     [--epochs 3] [--model-dir DIR] [--budget time=10s] --seed S --out DIR

The task's training set is cut in two: a global set (the first 3/4), on which the model is
pre-trained (or `--model-dir`, a saved haet model), and a pool from which the user's shifted data
is made (`--shift`). Writes DIR/update-U/record.json per update, DIR/record.json (the summary,
``incremental/...``), DIR/incremental.png and DIR/pretrained/ (the starting model).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

HELP = "on-device incremental training on a user's data (MoIL: last layer, feature cache, global mixing)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--task", default="mnist5k", help="an image task from `haet tasks` (default mnist5k)")
    p.add_argument("--model", help="model from `haet models` (default: the task's); last-layer training needs a "
                                   "sequential one")
    p.add_argument("--model-dir", help="start from this saved haet model instead of pre-training one")
    p.add_argument("--pretrain-epochs", type=int, default=3, help="epochs of pre-training on the global set")
    p.add_argument("--shift", default="rotate", help="the user's shift: rotate, classes, noise, style")
    p.add_argument("--user", type=int, default=0, help="user number (seeds the shift)")
    p.add_argument("--updates", type=int, default=5, help="updates, each with 1/U more of the user's data")
    p.add_argument("--epochs", type=int, default=3, help="epochs per update")
    p.add_argument("--last-layer", action="store_true", help="train only the head; the trunk is frozen")
    p.add_argument("--split", help="where the head starts: a layer index or name (default: the last layer "
                                   "with weights)")
    p.add_argument("--cache-mb", type=float, default=0.0, help="cache the frozen trunk's outputs in at most this "
                                                               "many MiB (needs --last-layer; 0: off)")
    p.add_argument("--cache-dtype", default="float32", help="cached features stored as float32, bfloat16, float16")
    p.add_argument("--mix", type=float, default=0.0, help="fraction of each update's training set replayed from a "
                                                          "fixed global sample (0: off)")
    p.add_argument("--optimizer", default="adam:lr=1e-3", help="optimizer, e.g. adam:lr=1e-3, sgd:lr=0.1")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--budget", help="limits per update, e.g. time=10s,energy=1J,steps=100")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory for records, the plot and the pre-trained model")
    p.add_argument("--quiet", action="store_true")


def run(args) -> int:
    import torch
    from rich.console import Console

    from ..core.budget import Budget
    from ..core.errors import ConfigError
    from ..core.saving import load_model, save_model
    from ..core.trainer import Trainer
    from ..data.loader import TensorData
    from ..data.tasks import check_model_for_task, get_task
    from ..models import build_model
    from .moil import IncrementalConfig, run_updates, split_model
    from .report import summary_record, write_plot
    from .shifts import SHIFTS, user_data

    if args.shift not in SHIFTS:
        raise ConfigError(f"unknown --shift {args.shift!r}; choose one of: {', '.join(SHIFTS)}")
    split = args.split
    cfg = IncrementalConfig(updates=args.updates, epochs=args.epochs, last_layer=args.last_layer, split=split,
                            cache_mb=args.cache_mb, cache_dtype=args.cache_dtype, mix=args.mix,
                            batch_size=args.batch_size, optimizer=args.optimizer)
    if args.pretrain_epochs < 1:
        raise ConfigError(f"--pretrain-epochs must be at least 1, got {args.pretrain_epochs}")
    budget = Budget.parse(args.budget) if args.budget else None
    task = get_task(args.task)
    if len(task.input_shape) != 3:
        raise ConfigError(f"--task {args.task!r} is not an image task; incremental shifts need images (mnist5k, digits)")
    model_name = check_model_for_task(task, args.model)
    out = Path(args.out)
    if (out / "record.json").exists():
        raise ConfigError(f"{out} already holds a record.json; choose another --out")
    console = Console(stderr=True, quiet=args.quiet)
    torch.manual_seed(args.seed)
    train, test = task.load(args.seed, None)
    n_global = len(train) * 3 // 4
    global_train = TensorData(train.x[:n_global].float(), train.y[:n_global])
    global_test = TensorData(test.x.float(), test.y)
    (ux, uy), (vx, vy) = user_data(args.shift, train.x[n_global:].float(), train.y[n_global:], args.user)
    model = load_model(args.model_dir) if args.model_dir else build_model(model_name, task.input_shape,
                                                                          task.num_classes)
    if cfg.last_layer:
        split_model(model, cfg.split)  # a bad --split fails here, before anything is written
    if not args.model_dir:
        with console.status(f"pre-training {model_name} on the global set ({n_global} samples)"):
            Trainer(model, global_train, None, device="cpu", seed=args.seed, progress=False,
                    task=task.name, model_name=model_name).fit(args.pretrain_epochs)
        save_model(out / "pretrained", model, task=task.name, model_name=model_name,
                   input_shape=task.input_shape, num_classes=task.num_classes, seed=args.seed, label="pretrained")
    start = copy.deepcopy(model)

    from rich.progress import Progress

    with Progress(console=console, transient=True) as bar:
        job = bar.add_task("updates", total=cfg.updates)

        def on_update(r: dict) -> None:
            bar.advance(job)
            console.print(f"update {r['update']}: user {r['user_accuracy']:.4f}  global {r['global_accuracy']:.4f}  "
                          f"{r['time_s']:.3f} s  {r['flops']:.3e} FLOPs  {r['energy_j']:.3e} J ({r['energy_source']})"
                          f"  cache {r['cache_bytes'] / 2**20:.2f} MiB", markup=False)

        results = run_updates(model, global_train, global_test, TensorData(ux, uy), TensorData(vx, vy), cfg,
                              seed=args.seed, budget=budget, on_update=on_update, out_dir=out, task=task.name,
                              model_name=model_name)
    record = summary_record(start, results, global_test, TensorData(vx, vy), cfg, task.name, model_name, args)
    record.save(out)
    plot = write_plot(results, out / "incremental.png", record.method_metrics)
    print(f"user accuracy {record.metrics['user_accuracy']:.4f}, global accuracy "
          f"{record.metrics['global_accuracy']:.4f}, {record.cost['time_s']:.2f} s over {cfg.updates} updates")
    print(f"record: {out / 'record.json'}")
    print(f"plot: {plot}")
    return 0
