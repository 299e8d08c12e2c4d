"""``haet fewshot``: learning from k labelled examples per class, the rest unlabelled.

    haet fewshot --task mnist5k --labels-per-class 1|5|10 --method prototype|fixmatch
                 [--model-dir DIR] [--epochs 5] [--threshold 0.95] [--budget time=60s] --seed S --out DIR

prototype: nearest class mean of embeddings from a frozen trunk (the trunk of --model-dir, e.g. the
DIR/pretrained model `haet incremental` writes; default: the task's model, randomly initialised).
fixmatch: the whole model trained with pseudo-labels and weak/strong consistency, in the Trainer.
Writes DIR/record.json (``fewshot/...``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

HELP = "few labels: prototype classifier or FixMatch-like semi-supervised training"
METHODS = ("prototype", "fixmatch")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--task", default="mnist5k", help="an image task from `haet tasks` (default mnist5k)")
    p.add_argument("--model", help="model from `haet models` (default: the task's)")
    p.add_argument("--model-dir", help="a saved haet model: the trunk (prototype) or the starting weights (fixmatch)")
    p.add_argument("--labels-per-class", type=int, default=5, help="labelled examples per class (e.g. 1, 5, 10)")
    p.add_argument("--method", default="prototype", help="prototype or fixmatch")
    p.add_argument("--epochs", type=int, default=5, help="fixmatch: epochs over the training set")
    p.add_argument("--unlabelled", type=int, default=0, help="fixmatch: use at most N unlabelled samples (0: all)")
    p.add_argument("--threshold", type=float, default=0.95, help="fixmatch: confidence to take a pseudo-label")
    p.add_argument("--optimizer", default="adam:lr=1e-3", help="fixmatch: optimizer")
    p.add_argument("--budget", help="fixmatch: limits, e.g. time=60s,energy=5J")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory for record.json")
    p.add_argument("--quiet", action="store_true")


def run(args) -> int:
    from ..core.budget import Budget
    from ..core.errors import ConfigError
    from ..data.tasks import check_model_for_task, get_task
    from .fewshot import FixMatchConfig

    if args.method not in METHODS:
        raise ConfigError(f"unknown --method {args.method!r}; choose one of: {', '.join(METHODS)}")
    if not 1 <= args.labels_per_class <= 1000:
        raise ConfigError(f"--labels-per-class must be an integer in [1, 1000], got {args.labels_per_class}")
    if args.unlabelled < 0:
        raise ConfigError(f"--unlabelled must be 0 (all) or a positive count, got {args.unlabelled}")
    if args.epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {args.epochs}")
    fm_cfg = FixMatchConfig(threshold=args.threshold)
    budget = Budget.parse(args.budget) if args.budget else None
    task = get_task(args.task)
    if len(task.input_shape) != 3:
        raise ConfigError(f"--task {args.task!r} is not an image task; choose mnist5k or digits")
    model_name = check_model_for_task(task, args.model)
    out = Path(args.out)
    if (out / "record.json").exists():
        raise ConfigError(f"{out} already holds a record.json; choose another --out")
    from ..core.optim import make_optimizer

    make_optimizer(args.optimizer)
    record = (_prototype if args.method == "prototype" else _fixmatch)(args, task, model_name, fm_cfg, budget)
    record.save(out)
    mm = record.method_metrics
    print(f"{args.method}, {args.labels_per_class} labels per class: accuracy {record.metrics['accuracy']:.4f}, "
          f"{mm['fewshot/time_s']:.2f} s, {mm['fewshot/energy_j']:.3e} J (model)")
    print(f"record: {out / 'record.json'}")
    return 0


def _model(args, task, model_name):
    import torch

    from ..core.saving import load_model
    from ..models import build_model

    torch.manual_seed(args.seed)
    return load_model(args.model_dir) if args.model_dir else build_model(model_name, task.input_shape, task.num_classes)


def _prototype(args, task, model_name, fm_cfg, budget):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .. import __version__
    from ..core.record import RunRecord, hardware_info
    from ..meters.hardware import HardwareTable
    from .fewshot import nearest_prototype, pick_labelled, prototypes
    from .moil import split_model

    train, test = task.load(args.seed, None)
    trunk, _ = split_model(_model(args, task, model_name))
    trunk.eval()
    lab = pick_labelled(train.y, args.labels_per_class, args.seed)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        trunk(train.x[:1].float())
    per_sample = float(counter.get_total_flops())
    started = time.perf_counter()
    with torch.no_grad():
        protos = prototypes(trunk(train.x[lab].float()).flatten(1), train.y[lab], task.num_classes)
    fit_s = time.perf_counter() - started
    with torch.no_grad():
        pred = nearest_prototype(trunk(test.x.float()).flatten(1), protos)
    accuracy = float((pred == test.y).float().mean())
    flops = per_sample * len(lab)
    energy = flops * HardwareTable.default().pj_per_flop("float32") * 1e-12
    return _record(args, task, model_name, accuracy, fit_s, flops, energy, len(lab), len(train) - len(lab), {},
                   RunRecord, hardware_info, __version__, stopped_by="done", steps=0, budget=budget)


def _fixmatch(args, task, model_name, fm_cfg, budget):
    import torch

    from .. import __version__
    from ..core.optim import make_optimizer
    from ..core.record import RunRecord, hardware_info
    from ..core.trainer import Trainer
    from ..data.loader import TensorData
    from .fewshot import FixMatchLoss, FixMatchModel, fixmatch_data, pick_labelled

    train, test = task.load(args.seed, None)
    lab = pick_labelled(train.y, args.labels_per_class, args.seed)
    if args.unlabelled:
        # keep the labelled samples and the first N others (the split is already a seeded shuffle)
        rest = torch.ones(len(train), dtype=torch.bool)
        rest[lab] = False
        keep = torch.cat([lab, torch.nonzero(rest).flatten()[:args.unlabelled]])
        train, lab = TensorData(train.x[keep], train.y[keep]), torch.arange(len(lab))
    x, y = fixmatch_data(train.x.float(), train.y, lab, fm_cfg.ratio)
    net = FixMatchModel(_model(args, task, model_name))
    loss = FixMatchLoss(fm_cfg)
    trainer = Trainer(net, TensorData(x, y), TensorData(test.x.float(), test.y), loss_fn=loss,
                      optimizer=make_optimizer(args.optimizer), budget=budget, device="cpu", seed=args.seed,
                      progress=not args.quiet, task=task.name, model_name=model_name, label="fewshot:fixmatch")
    rec = trainer.fit(args.epochs)
    extra = {"fewshot/threshold": fm_cfg.threshold,
             "fewshot/pseudo_label_rate": loss.pseudo_labelled / max(1, loss.unlabelled_seen)}
    out = _record(args, task, model_name, rec.metrics.get("accuracy", 0.0), rec.cost["train_s"], rec.cost["flops"],
                  rec.cost["energy_model_j"], len(lab), len(train) - len(lab), extra, RunRecord, hardware_info,
                  __version__, stopped_by=rec.stopped_by, steps=rec.steps, budget=budget)
    out.cost, out.history, out.epochs = rec.cost, rec.history, rec.epochs
    return out


def _record(args, task, model_name, accuracy, time_s, flops, energy, n_lab, n_unl, extra, RunRecord, hardware_info,
            version, *, stopped_by, steps, budget):
    import torch

    mm = {"fewshot/method": args.method, "fewshot/labels_per_class": args.labels_per_class,
          "fewshot/labelled": n_lab, "fewshot/unlabelled": n_unl, "fewshot/accuracy": accuracy,
          "fewshot/time_s": time_s, "fewshot/flops": flops, "fewshot/energy_j": energy,
          "fewshot/energy_source": "model", "fewshot/trunk": args.model_dir or "random-init", **extra}
    return RunRecord(task=task.name, model=model_name, label=f"fewshot:{args.method}", seed=args.seed, device="cpu",
                     hardware=hardware_info(torch.device("cpu")), steps=steps, stopped_by=stopped_by,
                     metrics={"accuracy": accuracy},
                     cost={"train_s": time_s, "flops": flops, "energy_j": energy, "energy_source": "model"},
                     method_metrics=mm, budget=budget.to_dict() if budget else {}, haet_version=version)
