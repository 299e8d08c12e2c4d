"""Runs from a configuration: one (`prepare` + `execute`) or a grid of them (`run_bench`).

`prepare` checks and builds everything a run needs (task data, model, methods, budget) before
anything is written, so bad input costs nothing. `run_bench` runs the baseline and each listed
method for each seed, one fresh model and method instance per run, in ``OUT/runs/<label>/seed<k>``,
then writes the report (`haet.report.build_report`).

Output folders may have been prepared by someone else: every write goes through
`haet.core.files` (no symlink followed), `check_out_dir` refuses what cannot be written before
anything is, and `clear_outputs` (``--overwrite``) removes only the files a haet run of that kind
writes and the run folders a bench made, never anything else.
"""

from __future__ import annotations

import errno
import json
import os
import re

import torch
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..core import files
from ..core.files import check_writable_path
from ..core.budget import Budget
from ..core.errors import ConfigError
from ..core.record import RunRecord
from ..core.trainer import Terminated, Trainer, on_sigterm, resolve_device, seed_everything
from ..data.tasks import check_model_for_task, get_task
from ..methods import parse_entry
from ..models import build_model

OUTPUT_FILES = ("record.json", "metrics.jsonl", "checkpoint.pt", "config.json", "samples.png")   # one run's folder
REPORT_FILES = ("results.csv", "report.md", "pareto.png")                          # a bench's or report's folder
STOPS = ("interrupt", "terminated")  # stop reasons that end a whole bench


class RunFailed(Exception):
    """Training raised after the run started. `error` is what it raised; `record_path` the
    record.json written for it, None when none could be (a full disk, for one)."""

    def __init__(self, error: BaseException, record_path: Path | None) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error, self.record_path = error, record_path

    @property
    def disk_full(self) -> bool:
        err: BaseException | None = self.error
        while err is not None:
            if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                return True
            err = err.__context__
        return False


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
        """The configuration saved in a run's config.json, its field types checked."""
        data = files.read_json(path, what="run configuration")
        if not isinstance(data, dict):
            raise ConfigError(f"{path} is not a valid run configuration: expected a JSON object")
        for key, kinds in _CONFIG_TYPES.items():
            if key in data and (not isinstance(data[key], kinds) or isinstance(data[key], bool)):
                names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
                raise ConfigError(f"{path} is not a valid run configuration: {key} must be {names}, "
                                  f"got {str(data[key])[:60]!r}")
        budget = data.get("budget", {})
        if not all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                   for k, v in budget.items()):
            raise ConfigError(f"{path} is not a valid run configuration: budget must map limits to numbers")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


_CONFIG_TYPES = {"task": (str,), "model": (str, type(None)), "methods": (str,), "seed": (int,), "epochs": (int,),
                 "budget": (dict,), "device": (str,), "data_dir": (str, type(None)), "batch_size": (int,)}


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
    if isinstance(config.batch_size, bool) or not isinstance(config.batch_size, int) or config.batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, got {config.batch_size!r}")
    from ..meters.hardware import HardwareTable

    HardwareTable.default()  # a bad HAET_HARDWARE table is bad input, found before anything runs
    key = (task.name, config.seed, config.data_dir)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()  # keep one data set in memory
        _DATA_CACHE[key] = task.load(config.seed, config.data_dir)
    train, test = _DATA_CACHE[key]
    return PreparedRun(config, {"train": train, "test": test, "task": task, "model_name": model_name,
                                "budget": budget})


def execute(run: PreparedRun, out_dir: Path | None, *, progress: bool = True, checkpoint: bool = False,
            resume: bool = False, notes: dict | None = None) -> RunRecord:
    """Build the model and methods (seeded) and train. A training error is raised as `RunFailed`
    after the record (with ``stopped_by: "error"``) is written, naming it (or None if it could not be).
    `notes` are added to the record's method_metrics (what a resume changed). A resumed run's
    config.json is rewritten with its new total epochs and budget."""
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
    write_config = out_dir is not None and trainer.rank == 0
    if write_config and not resume:
        files.write_text(out_dir / "config.json", json.dumps(asdict(c), indent=2) + "\n")
    try:
        record = trainer.fit(c.epochs, resume_from=out_dir if resume else None)
    except ConfigError:
        # Bad input found when training starts (a checkpoint that does not fit, a method refusing
        # the model at fit start): nothing stays written.
        if write_config and not resume:
            (out_dir / "config.json").unlink(missing_ok=True)
        raise
    except Exception as err:
        if write_config and resume:
            files.write_text(out_dir / "config.json", json.dumps(asdict(c), indent=2) + "\n")
        raise RunFailed(err, trainer.record_path) from err
    if write_config and resume:  # the run now aims at the new total and budget
        files.write_text(out_dir / "config.json", json.dumps(asdict(c), indent=2) + "\n")
    if notes:
        record.method_metrics.update(notes)
        if trainer.record_path is not None:
            record.save(out_dir)
    from ..generative import is_generative, save_samples

    if write_config and is_generative(trainer.state.unwrapped_model):
        save_samples(trainer.state.unwrapped_model, out_dir / "samples.png",
                     title=f"{task.name} / {a['model_name']}: samples, seed 0")
    return record




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


def check_out_dir(out: Path, overwrite: bool, files=OUTPUT_FILES, run_dirs=()) -> None:
    """Refuse (ConfigError, exit 2) an `out` that cannot be written or already holds haet output
    (unless overwriting), and run folders (`run_dirs`) that hold files haet did not write."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; choose a folder")
    existing_parent = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not os.access(existing_parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {existing_parent} is not writable; choose another --out")
    existing = [f for f in files if (out / f).exists() or (out / f).is_symlink()]
    for d in run_dirs:
        check_writable_path(d / "record.json", root=out)  # no folder on the way is a symlink
        held = [f for f in OUTPUT_FILES if (d / f).exists() or (d / f).is_symlink()]
        if held and not is_run_dir(d):
            raise ConfigError(f"{d} holds {', '.join(held)} that no haet run wrote; choose another --out")
        if held:
            existing.append(str(d.relative_to(out)) + "/")
    if existing and not overwrite:
        raise ConfigError(f"{out} already holds {', '.join(existing)}; pass --overwrite or choose another --out")


def is_run_dir(d: Path) -> bool:
    """A folder a haet run made: a real folder holding a valid record.json and a config.json."""
    if d.is_symlink() or not d.is_dir():
        return False
    if not all((d / f).is_file() and not (d / f).is_symlink() for f in ("record.json", "config.json")):
        return False
    try:
        RunRecord.load(d / "record.json")
    except ConfigError:
        return False
    return True


def clear_outputs(out: Path, files=OUTPUT_FILES) -> None:
    """Remove only haet's own outputs from `out` (used with --overwrite): the regular files named
    in `files`; with the report's files, also the run folders a bench made (``runs/<label>/seed<k>``
    and ``runs/<label>/warmup``, recognized by their record) and nothing else."""
    out = Path(out)
    for f in files:
        _unlink_regular(out / f)
    if tuple(files) != tuple(REPORT_FILES):
        return
    runs = out / "runs"
    if runs.is_symlink() or not runs.is_dir():
        return
    for label in sorted(runs.iterdir()):
        if label.is_symlink() or not label.is_dir():
            continue
        for d in sorted(label.iterdir()):
            if re.fullmatch(r"seed\d+|warmup", d.name) and is_run_dir(d):
                for f in OUTPUT_FILES:
                    _unlink_regular(d / f)
                _rmdir_if_empty(d)
        _rmdir_if_empty(label)
    _rmdir_if_empty(runs)


def bench_run_dirs(out: Path, entries: list[str], seeds: int) -> list[Path]:
    """The folders a bench of `entries` over `seeds` seeds writes its runs into."""
    return [Path(out) / "runs" / run_dir_name(e) / name for e in entries
            for name in [f"seed{s}" for s in range(seeds)] + ["warmup"]]


def _unlink_regular(path: Path) -> None:
    if path.is_file() and not path.is_symlink():
        path.unlink()


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def run_dir_name(label: str) -> str:
    """A directory name for a method label: ``gradmatch:fraction=0.3`` -> ``gradmatch_fraction-0.3``."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", label.replace("=", "-")).strip("_") or "run"


def run_bench(task: str, entries: list[str], seeds: int, epochs: int, out: Path, *, model: str | None = None,
              budget: dict | None = None, device: str = "auto", data_dir: str | None = None,
              on_run: Callable[[str, int, RunRecord | None, Exception | None], None] | None = None,
              batch_size: int = 64, warmup_steps: int = 10, options: dict | None = None, add: bool = False) -> dict:
    """Run every entry for seeds 0..seeds-1 (after `warmup_steps` untimed steps of each) and write
    the report; returns `build_report`'s dict (its paths None when no run finished)
    plus ``failed`` (the (label, seed) pairs whose training raised), ``interrupted`` (Ctrl-C or
    SIGTERM stopped the bench, warm-up included; the interrupted run keeps its record) and
    ``stopped_by`` ("interrupt", "terminated" or None). `out` is locked for the bench's life.
    `options`: further `RunConfig` fields (precision, optimizer, schedule, accumulate, clip_grad,
    until, eval_every, threads). `add`: add these runs to the bench already in `out` (under
    ``runs/<task>/<model>/``; the report then covers every run there, a section per task and model)."""
    from ..report import build_report

    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"seeds must be a positive integer, got {seeds!r}")
    out = Path(out)
    configs = [RunConfig(task=task, model=model, methods=e, seed=s, epochs=epochs, budget=budget or {},
                         device=device, data_dir=data_dir, batch_size=batch_size, **(options or {}))
               for s in range(seeds) for e in entries]
    for c in configs[:len(entries)]:
        prepare(c)  # every entry is checked before the first run starts
    runs_root = out / "runs"
    if add:
        runs_root = runs_root / run_dir_name(task) / run_dir_name(prepare(configs[0]).trainer_args["model_name"])
        check_add(out, configs)
    failed, written, stopped_by = [], [], None
    with files.FolderLock(out):
        restore_sigterm = on_sigterm()
        try:
            if warmup_steps:
                # Untimed warm-up of every entry (first-use costs: lazy imports, allocator growth,
                # kernel selection), so that the first measured run is not charged for them.
                for c in configs[:len(entries)]:
                    warm = replace(c, budget={**c.budget, "steps": warmup_steps})
                    record = execute(prepare(warm), None, progress=False)
                    if record.stopped_by in STOPS:  # the bench stops; the warm-up run keeps its record
                        stopped_by = record.stopped_by
                        record.method_metrics["bench/warmup_steps"] = warmup_steps
                        written.append(_save_with_config(record, warm, runs_root / run_dir_name(c.methods) / "warmup"))
                        break
            for c in configs if stopped_by is None else ():
                run = prepare(c)
                run_out = runs_root / run_dir_name(c.methods) / f"seed{c.seed}"
                files.check_writable_path(run_out / "record.json", root=out)  # checked again: it may have changed
                try:
                    record, err = execute(run, run_out, progress=False), None
                except RunFailed as e:  # the record says what failed; the other runs go on
                    record, err = None, e.error
                    failed.append((c.methods, c.seed))
                    if e.record_path is not None:
                        written.append(e.record_path)
                if record is not None:
                    written.append(run_out / "record.json")
                if on_run is not None:
                    on_run(c.methods, c.seed, record, err)
                if record is not None and record.stopped_by in STOPS:
                    stopped_by = record.stopped_by  # the bench stops; the report covers what ran
                    break
        except KeyboardInterrupt as stop:  # between runs: nothing was running to keep a record of
            stopped_by = "terminated" if isinstance(stop, Terminated) else "interrupt"
        finally:
            restore_sigterm()
        if written:
            result = build_report([out / "runs"] if add else written, out)
        else:
            result = {"results": None, "report": None, "pareto": None, "summaries": [], "rows": [], "records": []}
    result["failed"], result["interrupted"], result["stopped_by"] = failed, stopped_by is not None, stopped_by
    return result


def _save_with_config(record: RunRecord, config: RunConfig, run_dir: Path) -> Path:
    files.write_text(run_dir / "config.json", json.dumps(asdict(config), indent=2) + "\n")
    return record.save(run_dir)
