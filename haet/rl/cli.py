"""``haet rl``: ActorQ, distributed RL with quantized actors and a full-precision learner.

    haet rl --env CartPole-v1 --algo dqn --actors 2 --actor-precision int8 [--policy-width 256]
            [--budget time=120s,steps=20000] [--until return=195] [--backend ray|local] --seed 0 --out DIR
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

from ..core.errors import ConfigError

HELP = "distributed RL (ActorQ): quantized actors, fp32 learner, on Ray or in one process"


def add_arguments(p) -> None:
    p.add_argument("--env", default="CartPole-v1", help="CartPole-v1, Acrobot-v1, MountainCar-v0 (dqn) or Pendulum-v1 (ddpg)")
    p.add_argument("--algo", help="dqn or ddpg (default: the one the env's actions take)")
    p.add_argument("--actors", type=int, default=2, help="actor processes (default 2)")
    p.add_argument("--actor-precision", default="int8", help="the actors' policy copy: int8 (default), fp16 or fp32")
    p.add_argument("--policy-width", type=int, default=256, help="units per hidden layer (default 256; the paper 2048)")
    p.add_argument("--policy-depth", type=int, default=3, help="hidden layers (default 3)")
    p.add_argument("--refresh-every", type=int, default=100, help="learner steps between weight broadcasts (default 100)")
    p.add_argument("--backend", default="ray", help="ray (default): actors are Ray processes; local: one process")
    p.add_argument("--device", default="auto", help="the learner's device: auto, cpu or cuda (actors use the CPU)")
    p.add_argument("--budget", help="limits: time=120s,steps=20000 (learner steps)")
    p.add_argument("--until", help="stop when an evaluation's mean return reaches it: return=195")
    p.add_argument("--set", action="append", default=[], metavar="K=V",
                   help="any other setting of haet.rl.RLConfig, e.g. --set lr=5e-4 (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="directory for record.json (default runs/rl/<env>-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace the record of a previous run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary; print the record path")


def run(args) -> int:
    try:
        import gymnasium  # noqa: F401
        import ray  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"haet rl needs the rl extra: pip install 'haet[rl]' ({e.name} is missing)") from None
    from ..core.budget import Budget
    from ..core.config import parse_params
    from .config import RLConfig, Until
    from .system import train

    raw = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"bad --set item {item!r}; use key=value")
        raw[key.strip().replace("-", "_")] = value.strip()
    given = {"env": args.env, "actors": args.actors, "actor_precision": args.actor_precision,
             "policy_width": args.policy_width, "policy_depth": args.policy_depth, "refresh_every": args.refresh_every,
             "backend": args.backend, "device": args.device, "seed": args.seed}
    if args.algo is not None:
        given["algo"] = args.algo
    clash = set(raw) & set(given)
    if clash:
        raise ConfigError(f"--set {', '.join(sorted(clash))}: use the option of that name instead")
    # --set values are typed by parsing them into a config; only the keys given are taken from it.
    parsed = parse_params(RLConfig, raw, owner="rl") if raw else None
    try:
        config = RLConfig(**{**{k: getattr(parsed, k) for k in raw}, **given})
    except TypeError as e:
        raise ConfigError(str(e)) from None
    budget = Budget.parse(args.budget) if args.budget else Budget()
    until = Until.parse(args.until) if args.until else None
    if set(budget.to_dict()) - {"time_s", "steps"}:
        raise ConfigError(f"haet rl takes budget time and steps only; got {args.budget!r}")
    if budget.is_empty() and until is None:
        raise ConfigError("give --budget (time=..., steps=...) or --until return=..., or the run never ends")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out) if args.out else Path("runs/rl") / f"{config.env}-{stamp}"
    _check_out(out_dir, args.overwrite)

    with _Progress(budget, until, enabled=not args.quiet) as progress:
        record = train(config, budget=budget, until=until, on_round=progress.update)
    path = _save(record, out_dir)
    if args.quiet:
        print(path)
    else:
        _summary(record, path)
    if record.stopped_by in ("error", "interrupt"):
        print(f"haet: run stopped: {record.stopped_by}: {record.error or ''}; record written to {path}".replace(": ;", ";"),
              file=sys.stderr)
        return 1
    return 0


def _check_out(out_dir: Path, overwrite: bool) -> None:
    if out_dir.is_symlink():
        raise ConfigError(f"--out {out_dir} is a symbolic link; give a real directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a directory")
    if (out_dir / "record.json").exists() and not overwrite:
        raise ConfigError(f"{out_dir} already holds record.json; pass --overwrite or choose another --out")


def _save(record, out_dir: Path) -> Path:
    target = out_dir / "record.json"
    if target.is_symlink():  # never write through a link planted while the run went on
        target.unlink()
    return record.save(out_dir)


class _Progress:
    """A rich status line: env and learner steps, the last evaluation, the budget left."""

    def __init__(self, budget, until, *, enabled: bool) -> None:
        self.budget, self.until, self.enabled = budget, until, enabled
        self._bar = None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            total = self.budget.steps if self.budget.steps is not None else self.budget.time_s
            self._by_steps = self.budget.steps is not None
            self._bar = Progress(TextColumn("[bold]rl"), BarColumn(), TextColumn("{task.fields[info]}"),
                                 TimeElapsedColumn(), console=Console(file=sys.stderr), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task("rl", total=total, info="starting actors")
        return self

    def update(self, p: dict) -> None:
        if self._bar is None:
            return
        ev = "–" if p["eval_return"] is None else f"{p['eval_return']:.1f}"
        tr = "–" if p["train_return"] is None else f"{p['train_return']:.1f}"
        target = f" / target {self.until.return_:g}" if self.until else ""
        info = f"env steps {p['env_steps']}  learner steps {p['learner_steps']}  eval return {ev}{target}  train return {tr}"
        done = p["learner_steps"] if self._by_steps else p["elapsed_s"]
        self._bar.update(self._task, completed=done, info=info)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def _summary(record, path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    mm, c = record.method_metrics, record.cost
    table = Table(title=f"haet rl: {record.task} / {record.model} / {record.method_label} / seed {record.seed}")
    table.add_column("quantity")
    table.add_column("value", justify="right")

    def f(v, spec=".4g", unit=""):
        return "–" if v is None else f"{v:{spec}}{unit}"

    rows = [("mean return (last evaluation)", f(record.metrics.get("return"), ".1f")),
            ("stopped by", record.stopped_by + (f" ({record.error})" if record.error else "")),
            ("time to target", f(c.get("time_to_target_s"), ".2f", " s")),
            ("env steps / learner steps", f"{mm['rl/env_steps']} / {mm['rl/learner_steps']}"),
            ("train time / wall time", f"{c['train_s']:.2f} s / {c['wall_s']:.2f} s"),
            ("env steps/s, learner steps/s", f"{f(mm['rl/actor_steps_per_s'], '.0f')}, {f(mm['rl/learner_steps_per_s'], '.0f')}")]
    for key in ("inference_s", "env_s", "quantize_s", "broadcast_s", "learner_s", "wait_s", "eval_s", "startup_s"):
        rows.append((f"rl/{key}", f(mm[f"rl/{key}"], ".3f", " s")))
    rows.append(("broadcasts, bytes sent", f"{mm['rl/broadcasts']}, {mm['rl/broadcast_bytes']:,}"))
    rows.append(("energy (model)", f(c.get("energy_j"), ".4g", " J")))
    for k, v in rows:
        table.add_row(k, v)
    out = Console(width=None if sys.stdout.isatty() else 160)
    out.print(table)
    out.print("[dim]actor times are summed over actors; energy is haet's model (45 nm op and DRAM energies), not measured[/dim]")
    out.print(f"record: {path}")
