"""Runs from a configuration: one (`prepare` + `execute`) or a grid of them (`run_bench`).

`prepare` checks and builds everything a run needs (task data, model, methods, budget) before
anything is written, so bad input costs nothing. `run_bench` runs the baseline and each listed
method for each seed, one fresh model and method instance per run, in ``OUT/runs/<label>/seed<k>``,
then writes the report (`haet.report.build_report`).
"""

from __future__ import annotations

import json
import re

import torch
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..core.budget import Budget
from ..core.errors import ConfigError
from ..core.record import RunRecord
from ..core.trainer import Trainer, resolve_device, seed_everything
from ..data.tasks import check_model_for_task, get_task
from ..methods import parse_entry
from ..models import build_model

OUTPUT_FILES = ("record.json", "metrics.jsonl", "checkpoint.pt", "config.json")


@dataclass
class RunConfig:
    task: str = "mnist5k"
    model: str | None = None
    methods: str = "baseline"          # one bench entry: "baseline", "name:k=v", "a+b"
    seed: int = 0
    epochs: int = 5
    budget: dict = field(default_factory=dict)
    device: str = "auto"
    data_dir: str | None = None
    batch_size: int = 64
    precision: str = "fp32"            # fp32, bf16, fp16 (autocast for forward and loss)
    optimizer: str | None = None       # "sgd:lr=0.1,momentum=0.9"; None: the default Adam(lr=1e-3)
    schedule: str | None = None        # "onecycle:max_lr=0.1", "cosine", "step:step_size=2"
    accumulate: int = 1                # micro-batches per optimizer step
    clip_grad: float | None = None     # max global gradient norm
    until: str | None = None           # "accuracy=0.95": stop at the first evaluation that meets it
    eval_every: int | None = None      # evaluate every N optimizer steps (None: per epoch)
    save_model: bool = False           # write model.safetensors + model.json
    log: list = field(default_factory=list)  # "tensorboard", "mlflow"
    threads: int | None = None         # torch intra-op threads (None: leave torch's setting)

    @classmethod
    def from_json(cls, path: Path) -> "RunConfig":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read run configuration {path}: {err}") from None
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class PreparedRun:
    config: RunConfig
    trainer_args: dict


_DATA_CACHE: dict[tuple, tuple] = {}


def prepare(config: RunConfig) -> PreparedRun:
    """Validate `config` and load its data; raises ConfigError naming the bad value."""
    task = get_task(config.task)
    model_name = check_model_for_task(task, config.model)
    parse_entry(config.methods)  # validates the names and parameters now; fresh instances per run
    budget = Budget(**config.budget)
    device = resolve_device(config.device)
    _check_training_options(config, device)
    if isinstance(config.epochs, bool) or not isinstance(config.epochs, int) or config.epochs < 1:
        raise ConfigError(f"epochs must be a positive integer, got {config.epochs!r}")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {config.seed!r}")
    key = (task.name, config.seed, config.data_dir)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()  # keep one data set in memory
        _DATA_CACHE[key] = task.load(config.seed, config.data_dir)
    train, test = _DATA_CACHE[key]
    return PreparedRun(config, {"train": train, "test": test, "task": task, "model_name": model_name,
                                "budget": budget})


def execute(run: PreparedRun, out_dir: Path | None, *, progress: bool = True, checkpoint: bool = False,
            resume: bool = False) -> RunRecord:
    """Build the model and methods (seeded) and train. Re-raises training errors after the
    record (with ``stopped_by: "error"``) is written."""
    c, a = run.config, run.trainer_args
    seed_everything(c.seed)
    model = build_model(a["model_name"], a["task"].input_shape, a["task"].num_classes)
    methods = parse_entry(c.methods)
    task = a["task"]
    # Under torchrun, constructing the Trainer joins the process group: every rank has checked the
    # output directory before rank 0 writes anything into it.
    if c.threads is not None:
        torch.set_num_threads(c.threads)
    trainer = Trainer(model, a["train"], a["test"], loss_fn=task.loss_fn, eval_fn=task.eval_fn,
                      methods=methods, budget=a["budget"], device=c.device,
                      seed=c.seed, progress=progress, batch_size=c.batch_size, out_dir=out_dir,
                      checkpoint=checkpoint, task=task.name, model_name=a["model_name"], label=c.methods,
                      **training_options(c, out_dir))
    if out_dir is not None and trainer.rank == 0 and not resume:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(asdict(c), indent=2) + "\n")
    return trainer.fit(c.epochs, resume_from=out_dir if resume else None)


def _check_training_options(c: RunConfig, device) -> None:
    """The options added for training (precision, optimizer, schedule, ...), validated now."""
    from ..core.loggers import LOGGER_NAMES
    from ..core.optim import make_optimizer, make_schedule
    from ..core.options import Precision, TrainOptions, as_targets

    Precision(c.precision).check_device(device)
    if c.optimizer:
        make_optimizer(c.optimizer)
    if c.schedule:
        make_schedule(c.schedule)
    TrainOptions(accumulate=c.accumulate, clip_grad=c.clip_grad, eval_every=c.eval_every)
    as_targets(c.until)
    for name in c.log:
        if name not in LOGGER_NAMES:
            raise ConfigError(f"unknown logger {name!r}; choose one of: {', '.join(LOGGER_NAMES)}")
    if c.threads is not None and (isinstance(c.threads, bool) or not isinstance(c.threads, int) or c.threads < 1):
        raise ConfigError(f"threads must be a positive integer, got {c.threads!r}")


def training_options(c: RunConfig, out_dir: Path | None) -> dict:
    """Trainer keyword arguments for the training options of `c`."""
    from ..core.loggers import make_loggers
    from ..core.optim import make_optimizer, make_schedule
    from ..core.options import TrainOptions

    return {"precision": c.precision, "optimizer": make_optimizer(c.optimizer) if c.optimizer else None,
            "scheduler": make_schedule(c.schedule) if c.schedule else None, "until": c.until,
            "options": TrainOptions(accumulate=c.accumulate, clip_grad=c.clip_grad, eval_every=c.eval_every),
            "save_model": c.save_model and out_dir is not None,
            "loggers": make_loggers(c.log, out_dir, run_name=f"{c.task}/{c.methods}/seed{c.seed}") if out_dir else []}


def bench_tasks(out: Path) -> set[tuple]:
    """The (task, model, label) of every run already under ``out/runs``."""
    from ..report import find_records

    if not (out / "runs").is_dir():
        return set()
    try:
        return {(r.task, r.model, r.method_label) for _, r in find_records([out / "runs"])}
    except ConfigError:  # no records there
        return set()


def check_other_task(out: Path, task: str, model: str | None, add: bool) -> None:
    """Refuse to mix a bench of another task or model into `out` unless adding was asked for."""
    existing = {(t, m) for t, m, _ in bench_tasks(out)}
    mine = (task, check_model_for_task(get_task(task), model))
    others = sorted(f"{t} / {m}" for t, m in existing if (t, m) != mine)
    if others and not add:
        raise ConfigError(f"{out} holds runs of {', '.join(others)}; pass --add to add these {mine[0]} / {mine[1]} "
                          "runs to its report (a section per task and model), --overwrite to replace them, "
                          "or choose another --out")


def check_add(out: Path, configs: list[RunConfig]) -> None:
    """With --add: refuse runs that would repeat a (task, model, method) the bench already holds."""
    existing = bench_tasks(out)
    for c in configs:
        key = (c.task, prepare(c).trainer_args["model_name"], c.methods)
        if key in existing:
            raise ConfigError(f"{out} already holds {c.methods} runs of {c.task} / {key[1]}; choose another --out "
                              "or drop that method")


def unfit_reason(config: RunConfig) -> str | None:
    """Why `config`'s methods cannot take its model (None when they can): the reason a method
    refuses it, or the warning it gives when it would change nothing (no layer to act on)."""
    import warnings

    run = prepare(config)
    a = run.trainer_args
    methods = parse_entry(config.methods)
    if not methods:
        return None
    model = build_model(a["model_name"], a["task"].input_shape, a["task"].num_classes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer = Trainer(model, a["train"], a["test"], loss_fn=a["task"].loss_fn, methods=methods,
                              progress=False, device="cpu", seed=config.seed)
            trainer.state.epochs = config.epochs  # what fit would set: some checks depend on the run's length
            for m in methods:
                fit_start = getattr(m, "fit_start", None)
                if callable(fit_start):
                    fit_start(trainer.state)
        except ConfigError as err:
            return str(err)
    for w in caught:
        text = str(w.message)
        if any(text.startswith(f"{m.name}:") for m in methods):
            return text
    return None


def default_threads() -> int:
    """Threads a bench uses unless told: half the cores, 1 to 4. Leaving a core to the system and
    other work keeps timings stable; on a 2-core machine that is 1 thread."""
    import os

    return max(1, min(4, (os.cpu_count() or 2) // 2))


def check_out_dir(out: Path, overwrite: bool, files=OUTPUT_FILES) -> None:
    """Refuse (exit 2) to write into a directory that already holds haet output, unless overwriting."""
    existing = [f for f in files if (out / f).exists()]
    if out.is_dir() and (out / "runs").is_dir():
        existing.append("runs/")
    if existing and not overwrite:
        raise ConfigError(f"{out} already holds {', '.join(existing)}; pass --overwrite or choose another --out")


def clear_outputs(out: Path, files=OUTPUT_FILES) -> None:
    """Remove only haet's own files from `out` (used with --overwrite)."""
    import shutil

    for f in files + ("results.csv", "report.md", "pareto.png"):
        (out / f).unlink(missing_ok=True)
    if (out / "runs").is_dir():
        shutil.rmtree(out / "runs")


def run_dir_name(label: str) -> str:
    """A directory name for a method label: ``gradmatch:fraction=0.3`` -> ``gradmatch_fraction-0.3``."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", label.replace("=", "-")).strip("_") or "run"


def run_bench(task: str, entries: list[str], seeds: int, epochs: int, out: Path, *, model: str | None = None,
              budget: dict | None = None, device: str = "auto", data_dir: str | None = None,
              on_run: Callable[[str, int, RunRecord | None, Exception | None], None] | None = None,
              batch_size: int = 64, warmup_steps: int = 10, options: dict | None = None, add: bool = False) -> dict:
    """Run every entry for seeds 0..seeds-1 (after `warmup_steps` untimed steps of each) and write
    the report; returns `build_report`'s dict. `options`: further `RunConfig` fields (precision,
    optimizer, schedule, accumulate, clip_grad, until, eval_every, threads). `add`: add these runs
    to the bench already in `out` (under ``runs/<task>/<model>/``; the report gets a section per
    task and model)
    plus ``failed`` (the (label, seed) pairs whose training raised) and ``interrupted`` (Ctrl-C
    stopped the bench after the run it interrupted)."""
    from ..report import build_report

    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"seeds must be a positive integer, got {seeds!r}")
    configs = [RunConfig(task=task, model=model, methods=e, seed=s, epochs=epochs, budget=budget or {},
                         device=device, data_dir=data_dir, batch_size=batch_size, **(options or {}))
               for s in range(seeds) for e in entries]
    for c in configs[:len(entries)]:
        prepare(c)  # every entry is checked before the first run starts
    runs_root = out / "runs"
    if add:
        runs_root = runs_root / run_dir_name(task) / run_dir_name(prepare(configs[0]).trainer_args["model_name"])
        check_add(out, configs)
    if warmup_steps:
        # Untimed warm-up of every entry (first-use costs: lazy imports, allocator growth, kernel
        # selection), so that the first measured run is not charged for them.
        for c in configs[:len(entries)]:
            execute(prepare(replace(c, budget={**c.budget, "steps": warmup_steps})), None, progress=False)
    failed, interrupted = [], False
    for c in configs:
        run = prepare(c)
        run_out = runs_root / run_dir_name(c.methods) / f"seed{c.seed}"
        try:
            record, err = execute(run, run_out, progress=False), None
        except ConfigError:
            raise
        except Exception as e:  # the record says what failed; the other runs go on
            record, err = None, e
            failed.append((c.methods, c.seed))
        if on_run is not None:
            on_run(c.methods, c.seed, record, err)
        if record is not None and record.stopped_by == "interrupt":
            interrupted = True  # Ctrl-C stops the bench; the report covers what ran
            break
    result = build_report([out / "runs"], out)
    result["failed"], result["interrupted"] = failed, interrupted
    return result
