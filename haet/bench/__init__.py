"""Runs from a configuration: one (`prepare` + `execute`) or a grid of them (`run_bench`).

`prepare` checks and builds everything a run needs (task data, model, methods, budget) before
anything is written, so bad input costs nothing. `run_bench` runs the baseline and each listed
method for each seed, one fresh model and method instance per run, in ``OUT/runs/<label>/seed<k>``,
then writes the report (`haet.report.build_report`).
"""

from __future__ import annotations

import json
import re
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
    resolve_device(config.device)
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
    trainer = Trainer(model, a["train"], a["test"], loss_fn=task.loss_fn, eval_fn=task.eval_fn,
                      methods=methods, budget=a["budget"], device=c.device,
                      seed=c.seed, progress=progress, batch_size=c.batch_size, out_dir=out_dir,
                      checkpoint=checkpoint, task=task.name, model_name=a["model_name"], label=c.methods)
    if out_dir is not None and trainer.rank == 0 and not resume:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(asdict(c), indent=2) + "\n")
    return trainer.fit(c.epochs, resume_from=out_dir if resume else None)


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
              batch_size: int = 64, warmup_steps: int = 10) -> dict:
    """Run every entry for seeds 0..seeds-1 (after `warmup_steps` untimed steps of each) and write
    the report; returns `build_report`'s dict
    plus ``failed`` (the (label, seed) pairs whose training raised) and ``interrupted`` (Ctrl-C
    stopped the bench after the run it interrupted)."""
    from ..report import build_report

    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"seeds must be a positive integer, got {seeds!r}")
    configs = [RunConfig(task=task, model=model, methods=e, seed=s, epochs=epochs, budget=budget or {},
                         device=device, data_dir=data_dir, batch_size=batch_size)
               for s in range(seeds) for e in entries]
    for c in configs[:len(entries)]:
        prepare(c)  # every entry is checked before the first run starts
    if warmup_steps:
        # Untimed warm-up of every entry (first-use costs: lazy imports, allocator growth, kernel
        # selection), so that the first measured run is not charged for them.
        for c in configs[:len(entries)]:
            execute(prepare(replace(c, budget={**c.budget, "steps": warmup_steps})), None, progress=False)
    failed, interrupted = [], False
    for c in configs:
        run = prepare(c)
        run_out = out / "runs" / run_dir_name(c.methods) / f"seed{c.seed}"
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
