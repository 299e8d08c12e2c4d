"""The ``haet`` command: a thin layer over the library.

    haet tasks
    haet methods [NAME]
    haet train --task T [--model M] [--method NAME[:k=v,k=v]]... [--epochs N] [--budget ...]
               [--until accuracy=0.95] [--precision fp32|bf16|fp16] [--optimizer NAME:k=v]
               [--schedule NAME:k=v] [--accumulate N] [--clip-grad X] [--eval-every N]
               [--seed S] [--device auto|cpu|cuda] [--out DIR] [--overwrite] [--checkpoint]
               [--resume DIR] [--save-model] [--log tensorboard|mlflow] [--threads N] [--quiet] [--data-dir DIR]
    haet bench --task T --methods baseline,NAME[:k=v],... [--seeds N] [--epochs N] [--budget ...]
               [--until ...] [--threads N] [--add] --out DIR
    haet report DIR... [--out DIR]
    haet eval DIR [--task T]

Exit codes: 0 success; 2 bad input (one line on stderr naming the valid choices, nothing
written); 1 a failure during training (the record of what ran is still written), an interrupt,
or a loss that became non-finite.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import warnings
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .core.budget import Budget
from .core.distributed import env_world, shutdown
from .core.errors import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2

#: Subcommands that live in their own modules: name -> module exposing HELP, add_arguments(parser), run(args).
COMMANDS: dict[str, str] = {
    "search": "haet.search.cli",
    "challenge": "haet.challenge.cli",
    "rl": "haet.rl.cli",
    "federated": "haet.federated.cli",
    "incremental": "haet.incremental.cli",
    "fewshot": "haet.incremental.fewshot_cli",
}

# Wide tables when writing to a file or a pipe (CI logs, `make run | tee`); the terminal's width otherwise.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


BUDGET_HELP = ("limits: time=60s,energy=200J,steps=1000,flops=1e12,mem=512MB (time: training seconds; "
               "steps: optimizer steps; mem: MiB added by training, i.e. peak minus the resident size at "
               "start on CPU, the allocator's peak on CUDA)")


def _training_options(p) -> None:
    p.add_argument("--until", metavar="METRIC=VALUE",
                   help="stop at the first evaluation that meets it: accuracy=0.95 (>=), loss=0.1 (<= for loss-like "
                        "names), or explicit accuracy>=0.9; records cost.time_to_target_s")
    p.add_argument("--eval-every", type=int, metavar="N", help="evaluate every N optimizer steps (default: per epoch)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="autocast for forward and loss (bf16: CPU and CUDA; fp16: CUDA, with a gradient scaler); "
                        "weights stay fp32 (default fp32)")
    p.add_argument("--optimizer", metavar="NAME:k=v",
                   help="sgd:lr=0.1,momentum=0.9,nesterov=true | adam:lr=1e-3 | adamw:lr=1e-3,weight_decay=0.01 "
                        "(default adam:lr=1e-3)")
    p.add_argument("--schedule", metavar="NAME:k=v",
                   help="onecycle:max_lr=0.01 | cosine:min_lr=0,warmup_steps=0 (per step) | step:step_size=1,gamma=0.1 "
                        "(per epoch)")
    p.add_argument("--accumulate", type=int, metavar="N", help="micro-batches per optimizer step (default 1)")
    p.add_argument("--clip-grad", type=float, metavar="X", help="clip the gradients' global L2 norm to X")


def _training_config(args) -> dict:
    """RunConfig fields of the training options given on the command line."""
    out = {"precision": args.precision or "fp32", "optimizer": args.optimizer, "schedule": args.schedule,
           "accumulate": 1 if args.accumulate is None else args.accumulate, "clip_grad": args.clip_grad,
           "until": args.until, "eval_every": args.eval_every, "threads": args.threads}
    return out


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input in one line and exits 2."""

    def error(self, message: str):
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="haet", description="Hardware-Aware Efficient Training: train cheaper, measure honestly.")
    p.add_argument("--version", action="version", version=f"haet {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("tasks", help="list tasks")
    m = sub.add_parser("methods", help="list methods: name, one line, paper; NAME: its parameters")
    m.add_argument("name", nargs="?", help="a method: its parameters, types, defaults, ranges")

    t = sub.add_parser("train", help="train one model and write its record")
    t.add_argument("--task", help="a task from `haet tasks` (default mnist5k)")
    t.add_argument("--model", metavar="NAME[:k=v,k=v]",
                   help="a model the task accepts, with its parameters (srvae:layers=10) (default: the task's)")
    t.add_argument("--method", action="append", default=[], metavar="NAME[:k=v,k=v]",
                   help="a method and its parameters; repeat to combine methods")
    t.add_argument("--recipe", help="fast or baseline: the recipe's model, optimizer, one-cycle schedule, methods, "
                   "batch size, epochs and precision, each unless given explicitly (see haet challenge)")
    t.add_argument("--epochs", type=int, help="epochs to train (default 5; with --resume, the total)")
    t.add_argument("--budget", help=BUDGET_HELP)
    _training_options(t)
    t.add_argument("--seed", type=int, help="seed of weights, data split and order (default 0)")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto: CUDA when available")
    t.add_argument("--batch-size", type=int, help="samples per batch (default 64)")
    t.add_argument("--data-dir", help="directory of a task's files (cifar10)")
    t.add_argument("--out", help="directory for record.json, metrics.jsonl (default runs/train/<task>-<time>)")
    t.add_argument("--overwrite", action="store_true", help="replace the outputs of a previous run in --out")
    t.add_argument("--checkpoint", action="store_true", help="save checkpoint.pt at each epoch end")
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint")
    t.add_argument("--save-model", action="store_true",
                   help="write the trained model to OUT/model.safetensors (+ model.json); `haet eval OUT` reads it")
    t.add_argument("--log", action="append", default=[], choices=["tensorboard", "mlflow"],
                   help="also log to TensorBoard (OUT/tensorboard) or MLflow (local store OUT/mlflow.db); repeatable")
    t.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--quiet", action="store_true", help="no progress bar or summary; print the record path")

    b = sub.add_parser("bench", help="run the baseline and methods over seeds; write a report")
    b.add_argument("--task", default="mnist5k", help="a task from `haet tasks`")
    b.add_argument("--model", metavar="NAME[:k=v,k=v]",
                   help="a model the task accepts, with its parameters (srvae:layers=10) (default: the task's)")
    b.add_argument("--methods", required=True,
                   help="comma-separated: baseline,NAME[:k=v,k=v],...; join methods with + ; `all` = every method "
                        "that fits the model (the others are listed as skipped)")
    b.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (default 1)")
    b.add_argument("--epochs", type=int, default=5, help="epochs per run (default 5)")
    b.add_argument("--budget", help=BUDGET_HELP.replace("limits", "limits per run"))
    _training_options(b)
    b.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    b.add_argument("--batch-size", type=int, default=64, help="samples per batch (default 64)")
    b.add_argument("--data-dir", help="directory of a task's files (cifar10)")
    b.add_argument("--threads", type=int,
                   help="torch CPU threads for every run, recorded (default: half the cores, 1 to 4; 1 on 2 cores)")
    b.add_argument("--out", required=True, help="directory for runs/, results.csv, report.md, pareto.png")
    b.add_argument("--overwrite", action="store_true", help="replace a previous bench in --out")
    b.add_argument("--add", action="store_true",
                   help="add these runs to the bench in --out (another task or model gets its own report section)")
    b.add_argument("--quiet", action="store_true", help="print only the paths written")

    r = sub.add_parser("report", help="rebuild results.csv, report.md, pareto.png from records")
    r.add_argument("dirs", nargs="+", help="directories searched for record.json")
    r.add_argument("--out", help="where to write (default: the first directory)")

    e = sub.add_parser("eval", help="evaluate a saved model (train --save-model) on a task's test split")
    e.add_argument("dir", help="a run directory holding model.safetensors and model.json")
    e.add_argument("--task", help="the task to evaluate on (default: the one it was trained on)")
    e.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    e.add_argument("--data-dir", help="directory of a task's files (cifar10)")

    for name, module in COMMANDS.items():
        mod = importlib.import_module(module)
        mod.add_arguments(sub.add_parser(name, help=mod.HELP))
    return p


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """On the command line a warning is one line, like an error (no source location)."""
    return f"haet: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning
    try:
        args = build_parser().parse_args(argv)
        builtin = {"tasks": cmd_tasks, "methods": cmd_methods, "train": cmd_train, "bench": cmd_bench,
                   "report": cmd_report, "eval": cmd_eval}
        if args.command in builtin:
            return builtin[args.command](args)
        return importlib.import_module(COMMANDS[args.command]).run(args)
    except ConfigError as e:
        print(f"haet: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("haet: interrupted", file=sys.stderr)
        return EXIT_FAILED
    finally:
        shutdown()  # under torchrun: leave the process group in the main flow, not at interpreter exit


# -- listings ----------------------------------------------------------------------------------
def cmd_tasks(args) -> int:
    from .data.tasks import TASKS

    table = Table(title="haet tasks")
    for col in ("task", "description", "default model", "models", "data"):
        table.add_column(col)
    for t in TASKS.values():
        table.add_row(t.name, t.summary, t.default_model, ", ".join(t.models),
                      t.source + (" (--data-dir)" if t.needs_data_dir else ""))
    out.print(table)
    return EXIT_OK


def cmd_methods(args) -> int:
    from .methods import get_method_class, registry

    if args.name:
        return _describe_method(get_method_class(args.name))
    reg = registry()
    table = Table(title="haet methods (haet methods NAME: its parameters)")
    for col in ("method", "what it does", "paper", "owns"):
        table.add_column(col)
    table.add_row("baseline", "no method (bench --methods only)", "–", "–")
    for name, cls in reg.items():
        table.add_row(name, cls.summary, cls.paper, ", ".join(sorted(cls.owns)) or "–")
    out.print(table)
    return EXIT_OK


def _describe_method(cls) -> int:
    from .core.describe import describe

    out.print(f"[bold]{cls.name}[/bold]: {cls.summary}")
    out.print(f"paper: {cls.paper or '–'}")
    out.print(f"owns: {', '.join(sorted(cls.owns)) or '–'}")
    if cls.config_class is None:
        out.print("no parameters")
        return EXIT_OK
    table = Table(title=f"parameters ({cls.name}:k=v,k=v)")
    for col in ("parameter", "type", "default", "allowed", "meaning"):
        table.add_column(col, overflow="fold")
    for p in describe(cls.config_class):
        table.add_row(p["name"], p["type"], repr(p["default"]) if isinstance(p["default"], str) else str(p["default"]),
                      p["range"] or "–", p["help"] or "–")
    out.print(table)
    return EXIT_OK


# -- train -------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from .bench import OUTPUT_FILES, RunConfig, RunFailed, check_out_dir, clear_outputs, execute, prepare
    from .core.files import FolderLock

    if args.resume:
        resume_dir = Path(args.resume)
        links = [f for f in OUTPUT_FILES if (resume_dir / f).is_symlink()]
        if links:
            raise ConfigError(f"--resume {resume_dir}: {', '.join(links)} is a symbolic link; haet never reads or "
                              "writes a run's files through links")
        if not (resume_dir / "config.json").is_file():
            raise ConfigError(f"--resume {resume_dir}: no config.json there (not a haet train --checkpoint run)")
        config = RunConfig.from_json(resume_dir / "config.json")
        for name, given, saved in (("task", args.task, config.task), ("model", args.model, config.model),
                                   ("seed", args.seed, config.seed), ("batch size", args.batch_size, config.batch_size)):
            if given is not None and given != saved:
                raise ConfigError(f"--resume: the run in {resume_dir} has {name} {saved!r}, not {given!r}")
        if args.method and "+".join(args.method) != config.methods:
            raise ConfigError(f"--resume: the run in {resume_dir} has methods {config.methods!r}")
        if args.out and Path(args.out).resolve() != resume_dir.resolve():
            raise ConfigError(f"--resume continues in {resume_dir}; --out {args.out} is another folder (drop --out)")
        if args.overwrite:
            raise ConfigError("--resume continues a run; --overwrite would discard it (drop one of them)")
        planned = config.epochs
        if args.epochs is not None:
            config.epochs = args.epochs
        if args.budget:
            config.budget = Budget.parse(args.budget).to_dict()  # the user's new limit applies to the resumed run
        if args.data_dir:
            config.data_dir = args.data_dir
        out_dir, checkpoint = resume_dir, True
        from .core import checkpoint as ckpt

        trained = ckpt.load(resume_dir, epochs=config.epochs)["epoch"]  # a clear error now if missing, unsafe or ahead
        notes = resume_notes(config.methods, trained, planned, config.epochs)
    else:
        if args.method and "baseline" in args.method:
            raise ConfigError("'baseline' means no method: for train, omit --method")
        options = _training_config(args)
        recipe = _recipe_defaults(args.recipe, args.task or "mnist5k", options, explicit_precision=args.precision)
        config = RunConfig(task=args.task or "mnist5k", model=args.model or recipe.get("model"),
                           methods="+".join(args.method) or recipe.get("methods", "baseline"),
                           seed=0 if args.seed is None else args.seed,
                           epochs=args.epochs if args.epochs is not None else recipe.get("epochs", 5),
                           budget=Budget.parse(args.budget).to_dict() if args.budget else {},
                           device=args.device or "auto", data_dir=args.data_dir,
                           batch_size=args.batch_size if args.batch_size is not None else recipe.get("batch_size", 64),
                           save_model=args.save_model, log=list(dict.fromkeys(args.log)), **options)
        notes = {}
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out_dir = Path(args.out) if args.out else Path("runs/train") / f"{config.task}-{stamp}"
        checkpoint = args.checkpoint
    if args.device and args.resume:
        config.device = args.device
    run = prepare(config)
    check_out_dir(out_dir, args.overwrite or bool(args.resume))  # a file, an unwritable folder: exit 2 now
    # Only one run writes into a folder at a time (under torchrun, rank 0 writes and holds it).
    lock = FolderLock(out_dir) if env_world()[0] == 0 else None
    new_folder, refused = not out_dir.exists(), False
    try:
        if lock is not None:
            lock.acquire()
        if not args.resume:
            check_out_dir(out_dir, args.overwrite)  # again, now that no other run can write there
            if args.overwrite:
                clear_outputs(out_dir)
        record = execute(run, out_dir, progress=not args.quiet, checkpoint=checkpoint, resume=bool(args.resume),
                         notes=notes)
    except RunFailed as e:
        written = f"record written to {e.record_path}" if e.record_path else "no record could be written"
        if e.disk_full:
            print(f"haet: training failed: no space left on device; partial files were removed, the last good "
                  f"checkpoint (if any) is kept; {written}", file=sys.stderr)
        else:
            print(f"haet: training failed: {e}; {written}", file=sys.stderr)
        return EXIT_FAILED
    except ConfigError:
        refused = True
        raise
    finally:
        if lock is not None:
            lock.release()
        if refused and new_folder:  # bad input found when training started: the folder made for it goes again
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only when empty
    if env_world()[0] != 0:
        return EXIT_OK  # under torchrun only rank 0 reports
    if args.quiet:
        print(out_dir / "record.json")
    else:
        _print_summary(record, out_dir)
    if record.stopped_by in ("interrupt", "terminated", "nonfinite_loss"):
        print(f"haet: run stopped: {record.stopped_by}; record written to {out_dir / 'record.json'}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


#: Methods whose schedule depends on the total epoch count: resumed to another total, the run
#: differs from an uninterrupted one (said in the record and the method's card).
EPOCH_SCHEDULED = {"mbst": "its sparsity schedule ends at update_end x the total epochs"}


def resume_notes(methods: str, trained: int, planned: int, total: int) -> dict:
    """What the record says about a resumed run: where it resumed, and when the total changed,
    which methods' schedules therefore differ from an uninterrupted run."""
    notes = {"resume/from_epoch": trained, "resume/planned_epochs": planned, "resume/epochs": total}
    if total != planned:
        for name in dict.fromkeys(e.split(":", 1)[0] for e in methods.split("+")):
            if name in EPOCH_SCHEDULED:
                notes[f"{name}/resume_note"] = (f"resumed to {total} epochs from a run planned for {planned}: "
                                                f"{EPOCH_SCHEDULED[name]}, so this run is not identical to an "
                                                "uninterrupted one")
    return notes


def _recipe_defaults(name: str | None, task: str, options: dict, *, explicit_precision: str | None) -> dict:
    """RunConfig fields a recipe sets (`options` gets its optimizer, schedule and precision unless
    they were given on the command line)."""
    if not name:
        return {}
    from .recipes import get_recipe

    r = get_recipe(name, task)
    if r.augment or r.tta_flip:
        warnings.warn(f"recipe {name} on {task}: its augmentation and test-time flips run in `haet challenge`, "
                      "not in `haet train`", stacklevel=2)
    options["optimizer"] = options["optimizer"] or r.optimizer
    if r.max_lr is not None:
        options["schedule"] = options["schedule"] or f"onecycle:max_lr={r.max_lr},pct_start=0.25"
    if explicit_precision is None:
        options["precision"] = r.precision
    return {"model": r.model_name, "methods": r.methods, "epochs": r.epochs, "batch_size": r.batch_size}


def _print_summary(record, out_dir: Path) -> None:
    c = record.cost
    table = Table(title=f"haet train: {record.task} / {record.model} / {record.method_label} / seed {record.seed}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    mem = c.get("memory_bytes", {})
    m = record.metrics
    if "nll" in m and "accuracy" not in m:  # a generative task: likelihoods in nats per image
        rows = [(f"test NLL (importance-weighted, K = {m.get('iw_samples')})", _f(m.get("nll"), ".3f", " nats")),
                ("test negative ELBO", _f(m.get("neg_elbo"), ".3f", " nats")),
                ("test bits/dim", _f(m.get("bits_per_dim"), ".4f")),
                ("test KL / active units", f"{_f(m.get('kl'), '.2f', ' nats')} / {m.get('active_units', '–')}")]
    else:
        rows = [("test accuracy", _f(m.get("accuracy"), ".4f")), ("test loss", _f(m.get("loss"), ".4f"))]
    rows += [
        ("model parameters", f"{c['model_params']:,}" if isinstance(c.get("model_params"), int) else "–"),
        ("epochs / steps", f"{record.epochs} / {record.steps}"),
        ("stopped by", record.stopped_by),
        ("evaluated at step", _last_eval_step(record)),
        ("train time", _f(c.get("train_s"), ".2f", " s")),
        ("wall time", _f(c.get("wall_s"), ".2f", " s")),
        ("peak memory", _f(c.get("peak_mem_mb"), ".1f", " MiB")),
        ("params / grads / optimizer / activations",
         " / ".join(_bytes(mem.get(k)) for k in ("params", "grads", "optimizer", "activations"))),
        ("peak memory added by training", _f(c.get("peak_mem_added_mb"), ".1f", " MiB")),
        ("training FLOPs", _f(c.get("flops"), ".3g")
         + (f" ({', '.join(sorted(c['flops_by_dtype']))})" if c.get("flops_by_dtype") else "")),
        ("MFU", _f(c.get("mfu"), ".1%")),
        (f"energy ({c.get('energy_source')})", _f(c.get("energy_j"), ".4g", " J")),
    ]
    if c.get("target"):
        rows.append((f"time to {c['target']}", _f(c.get("time_to_target_s"), ".2f", " s")
                     if c.get("time_to_target_s") is not None else "not reached"))
    if "cpu_s" in c:
        share = c.get("cpu_per_thread")
        rows.append(("CPU time / threads", f"{c['cpu_s']:.2f} s / {c.get('threads')}"
                     + (f" ({share:.2f} per thread-second)" if share is not None else "")))
        rows.append(("timing", "[yellow]CONTENDED: times not reliable[/yellow]" if c.get("contended") else "uncontended"))
    for k, v in record.method_metrics.items():
        rows.append((k, _f(v, ".4g") if isinstance(v, float) else str(v)))
    for k, v in rows:
        table.add_row(k, v)
    out.print(table)
    if c.get("energy_source") == "model":
        out.print("[dim]energy is estimated by haet's energy model (FLOPs and bytes moved at 45 nm), not measured[/dim]")
    out.print(f"record: {out_dir / 'record.json'}")
    if (out_dir / "samples.png").is_file() and "nll" in record.metrics:
        out.print(f"samples: {out_dir / 'samples.png'}")


def _last_eval_step(record) -> str:
    """The step the reported metrics come from (after Ctrl-C, the last evaluation before it)."""
    evaluated = [h.get("step") for h in record.history if any(k not in ("epoch", "step", "train_loss", "train_s",
                                                                           "mid_epoch") for k in h)]
    if record.stopped_by not in ("interrupt", "error") and record.metrics:
        return str(record.steps)
    if evaluated and evaluated[-1] is not None:
        return f"{evaluated[-1]} (last evaluation; stopped at {record.steps})"
    return "–"


def _f(v, spec: str, unit: str = "") -> str:
    return "–" if v is None else f"{v:{spec}}{unit}"


def _bytes(n) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# -- bench and report --------------------------------------------------------------------------
def cmd_bench(args) -> int:
    from .bench import REPORT_FILES, RunConfig, bench_run_dirs, check_out_dir, clear_outputs, prepare, run_bench
    from .core.files import FolderLock
    from .methods import split_entries

    from .bench import check_other_task, default_threads

    entries = split_entries(args.methods)
    budget = Budget.parse(args.budget).to_dict() if args.budget else {}
    out_dir = Path(args.out)
    if not args.overwrite:
        check_other_task(out_dir, args.task, args.model, args.add)
    if args.add and args.overwrite:
        raise ConfigError("--add and --overwrite contradict each other: add to the bench in --out, or replace it")
    options = _training_config(args)
    options["threads"] = default_threads() if args.threads is None else args.threads
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {args.seeds}")
    run_dirs = bench_run_dirs(out_dir, entries, args.seeds)
    if not args.add:  # with --add, the new runs go under runs/<task>/<model>/ (run_bench checks them)
        check_out_dir(out_dir, args.overwrite, files=REPORT_FILES, run_dirs=run_dirs)
    total = len(entries) * args.seeds
    progress = Progress(TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.description}"), console=err, disable=args.quiet)

    def on_run(label, seed, record, error):
        if error is not None:
            progress.console.print(f"[red]{label} seed {seed}: failed: {type(error).__name__}: {error}")
        elif not args.quiet:
            c = record.cost
            target = "" if not c.get("target") else (
                f", {c['target']} after {c['time_to_target_s']:.2f} s" if c.get("time_to_target_s") is not None
                else f", {c['target']} not reached")
            progress.console.print(f"{label} seed {seed}: accuracy {_f(record.metrics.get('accuracy'), '.4f')}, "
                                   f"train {c.get('train_s', 0):.2f} s, {record.stopped_by}{target}"
                                   + (" [yellow]⚠ contended[/yellow]" if c.get("contended") else ""))
        progress.update(task, advance=1, description=f"last: {label} seed {seed}")

    # Every entry is checked before anything runs or is cleared: bad input costs nothing.
    for e in entries:
        prepare(RunConfig(task=args.task, model=args.model, methods=e, epochs=args.epochs, budget=budget,
                          device=args.device, data_dir=args.data_dir, batch_size=args.batch_size, **options))
    entries, skipped = _drop_unfit(args, entries, budget, options)
    if not args.quiet:
        err.print(f"bench: {options['threads']} torch thread(s) per run (--threads), recorded in each record")
    with FolderLock(out_dir), progress:  # the bench's own lock (in run_bench) is the same, re-entered
        if not args.add:
            check_out_dir(out_dir, args.overwrite, files=REPORT_FILES, run_dirs=run_dirs)  # no other run writes there now
        if args.overwrite:
            clear_outputs(out_dir, REPORT_FILES)
        task = progress.add_task("", total=total)
        result = run_bench(args.task, entries, args.seeds, args.epochs, out_dir, model=args.model, budget=budget,
                           device=args.device, data_dir=args.data_dir, on_run=on_run, batch_size=args.batch_size,
                           options=options, add=args.add)
    if not args.quiet and result["summaries"]:
        _print_comparison(result["summaries"])
    for key in ("report", "pareto", "results"):
        if result[key] is not None:
            print(f"{key}: {result[key]}")
    for label, reason in skipped:
        print(f"skipped {label}: {reason}")
    if result["interrupted"]:
        print(f"haet: bench interrupted ({result['stopped_by']}); the report covers the runs that ran, each with its "
              "record", file=sys.stderr)
        return EXIT_FAILED
    if result["failed"]:
        print(f"haet: {len(result['failed'])} run(s) failed: "
              + ", ".join(f"{label} seed {s}" for label, s in result["failed"]), file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _drop_unfit(args, entries: list[str], budget: dict, options: dict) -> tuple[list[str], list[tuple[str, str]]]:
    """With ``--methods all``: the methods that cannot take the model are skipped, with the reason."""
    from .bench import RunConfig, unfit_reason
    from .methods import registry

    if "all" not in (s.strip() for s in args.methods.split(",")):
        return entries, []
    kept, skipped = [], []
    for e in entries:
        reason = None
        if e in registry():  # expanded from `all` (or named bare): check that it fits
            reason = unfit_reason(RunConfig(task=args.task, model=args.model, methods=e, epochs=args.epochs,
                                            budget=budget, device=args.device, data_dir=args.data_dir,
                                            batch_size=args.batch_size, **options))
        if reason is None:
            kept.append(e)
        else:
            skipped.append((e, reason))
            if not args.quiet:
                err.print(f"[yellow]skipped {e}: {reason}")
    return kept, skipped


def _print_comparison(summaries) -> None:
    """One table per (task, model): runs of different tasks or models are never averaged together."""
    from .report import cell, visible

    sections = list(dict.fromkeys((s.task, s.model) for s in summaries))
    targets = any(s.targets for s in summaries)
    for task, model in sections:
        where = f"{task} / {model}: " if task or model else ""
        table = Table(title=f"haet bench: {where}mean ± std over seeds (ratio to baseline)")
        table.add_column("method")
        table.add_column("runs", justify="right")
        section = [s for s in summaries if (s.task, s.model) == (task, model)]
        shown = visible(section)
        for _, heading, unit, _ in shown:
            table.add_column(f"{heading} ({unit})" if unit else heading, justify="right")
        if targets:
            table.add_column("time to target", justify="right")
        table.add_column("energy source")
        contended = any(s.contended for s in summaries)
        if contended:
            table.add_column("timing")
        for s in section:
            mark = [f"[yellow]⚠ {s.contended}/{s.runs} contended[/yellow]" if s.contended else "ok"] if contended else []
            table.add_row(s.method, str(s.runs), *(cell(s, k) for k, *_ in shown),
                          *([s.targets or "–"] if targets else []), s.energy_source, *mark)
        out.print(table)
    if any(s.contended for s in summaries):
        err.print("[yellow]haet: some runs were timed on a contended machine (⚠): their times are not reliable")


def cmd_report(args) -> int:
    from .report import build_report

    result = build_report(args.dirs, Path(args.out) if args.out else None)
    _print_comparison(result["summaries"])
    for key in ("report", "pareto", "results"):
        print(f"{key}: {result[key]}")
    return EXIT_OK


# -- eval --------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    import torch

    from .core.evaluation import evaluate
    from .core.saving import load_model, read_meta
    from .core.trainer import resolve_device
    from .data.tasks import check_model_for_task, get_task
    from .models import MODELS

    meta = read_meta(args.dir)
    name = args.task or meta["task"]
    if not name:
        raise ConfigError(f"{args.dir}: the saved model names no task; pass --task")
    task = get_task(name)
    if meta["model"] and meta["model"].partition(":")[0] in MODELS:
        check_model_for_task(task, meta["model"])  # a VAE on a classification task, say: one clear line
    device = resolve_device(args.device)
    model = load_model(args.dir, device=device)
    _, test = task.load(meta["seed"], args.data_dir)  # the test split the model was trained against
    try:
        if task.eval_fn is not None:
            metrics = task.eval_fn(model, test, device)
        else:
            metrics = evaluate(model, test, task.loss_fn or torch.nn.functional.cross_entropy, device)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"the model in {args.dir} (trained on {meta['task']}) does not take {task.name}'s "
                          f"inputs: {str(err).splitlines()[0]}") from None
    table = Table(title=f"haet eval: {args.dir} on {task.name} (test split of seed {meta['seed']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, _f(v, ".4f") if isinstance(v, float) else str(v))
    out.print(table)
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
