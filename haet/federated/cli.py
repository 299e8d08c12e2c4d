"""``haet federated``: zero-shot federated learning with new classes, or FedAvg, locally or on Flower.

    haet federated --task mnist5k --clients 6 --rounds 10 --new-classes 2 [--heterogeneous]
                   [--strategy zeroshot|fedavg] [--backend flower|local] --seed S --out DIR

Writes ``DIR/record.json`` (metrics.accuracy: final global test accuracy; method_metrics
``federated/...``: seen- and new-class accuracy, bytes up/down per round, per-client time and
energy), ``DIR/rounds.jsonl`` (one line per round) and ``DIR/accuracy.png`` (accuracy per round).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..core.errors import ConfigError

HELP = "federated learning with new classes: zero-shot impressions or FedAvg, local or on Flower"


def add_arguments(p) -> None:
    p.add_argument("--task", default="mnist5k", help="mnist5k, digits or mnist1d (default mnist5k)")
    p.add_argument("--clients", type=int, default=6, help="number of clients (2-64, default 6)")
    p.add_argument("--rounds", type=int, default=10, help="federated rounds (default 10)")
    p.add_argument("--new-classes", type=int, default=2,
                   help="classes held by only two clients each, unknown to the server (0-5, default 2)")
    p.add_argument("--heterogeneous", action="store_true", help="clients at widths 1, 1/2, 1/4 of one model family")
    p.add_argument("--strategy", default="zeroshot", help="zeroshot (default) or fedavg")
    p.add_argument("--backend", default="local", help="local (one process, default) or flower (Flower on Ray)")
    p.add_argument("--local-epochs", type=int, default=1, help="local epochs per client per round (default 1)")
    p.add_argument("--iid", action="store_true", help="split every class evenly over clients")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the weights and the order (default 0)")
    p.add_argument("--out", required=True, help="directory for record.json and rounds.jsonl")
    p.add_argument("--overwrite", action="store_true", help="replace a previous record in --out")
    p.add_argument("--quiet", action="store_true", help="no progress or table; print the record path")
    p.add_argument("--verbose-flower", action="store_true", help="show Flower's and Ray's logs")


def run(args) -> int:
    from .config import BACKENDS, FedConfig

    if args.backend not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {args.backend!r}")
    config = FedConfig(task=args.task, clients=args.clients, rounds=args.rounds, new_classes=args.new_classes,
                       strategy=args.strategy, heterogeneous=args.heterogeneous, seed=args.seed, iid=args.iid,
                       local_epochs=args.local_epochs)
    out = Path(args.out)
    _check_out(out, args.overwrite)
    if args.backend == "flower":
        try:
            import flwr  # noqa: F401
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError("--backend flower needs the federated extra: pip install 'haet[federated]'") from None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .run import run_local, to_record

    err = Console(stderr=True)
    progress = Progress(TextColumn(f"[bold]federated {config.strategy} ({args.backend})"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"), console=err,
                        disable=args.quiet)
    lines: list[dict] = []

    def on_round(line: dict) -> None:
        lines.append(line)
        progress.update(bar, advance=1, description=f"accuracy {line['accuracy']:.3f} (new {line['accuracy_new']:.3f})")

    with progress:
        bar = progress.add_task("", total=config.rounds)
        try:
            if args.backend == "flower":
                from .flower import run_flower

                result = run_flower(config, verbose=args.verbose_flower, on_round=on_round)
            else:
                result = run_local(config, on_round=on_round)
        except KeyboardInterrupt:
            print("haet: interrupted; nothing written", file=sys.stderr)
            return 1
    record = to_record(result)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "rounds.jsonl", "w") as f:
        for line in lines:
            f.write(json.dumps({k: (None if v != v else v) for k, v in line.items()}) + "\n")
    path = record.save(out)
    _plot(lines, out / "accuracy.png", f"{config.task}, {record.label}, seed {config.seed}")
    if args.quiet:
        print(path)
    else:
        _print_summary(record, result, path)
    return 0


def _plot(lines: list[dict], path: Path, title: str) -> None:
    """Global, seen-class and new-class test accuracy per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    rounds = [line["round"] for line in lines]
    for key, label in (("accuracy", "global"), ("accuracy_seen", "seen classes"), ("accuracy_new", "new classes")):
        ax.plot(rounds, [line[key] for line in lines], marker="o", label=label)
    ax.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1), title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.is_symlink() or (out / "record.json").is_symlink():
        raise ConfigError(f"{out} is a symbolic link (or holds one); choose another --out")
    if any((out / f).is_symlink() for f in ("rounds.jsonl", "accuracy.png")):
        raise ConfigError(f"{out} holds a symbolic link among its outputs; choose another --out")
    if (out / "record.json").exists() and not overwrite:
        raise ConfigError(f"{out} already holds record.json; pass --overwrite or choose another --out")


def _print_summary(record, result, path) -> None:
    from rich.console import Console
    from rich.table import Table

    mm, final = record.method_metrics, result.final
    table = Table(title=f"haet federated: {record.task} / {record.label} / seed {record.seed}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    up, down = mm["federated/bytes_up"], mm["federated/bytes_down"]
    rows = [("global test accuracy", f"{final['accuracy']:.4f}"),
            ("seen-class accuracy", _pct(final.get("accuracy_seen"))),
            ("new-class accuracy", _pct(final.get("accuracy_new"))),
            ("rounds / clients", f"{len(result.rounds)} / {result.config.clients}"),
            ("bytes up / down per round", f"{up[-1] / 1e6:.2f} MB / {down[-1] / 1e6:.2f} MB"),
            ("client train time (sum)", f"{record.cost['train_s']:.2f} s"),
            (f"energy, clients + server ({record.cost['energy_source']})", f"{record.cost['energy_j']:.4g} J"),
            ("wall time", f"{record.cost['wall_s']:.1f} s")]
    for k, c in sorted(result.clients.items()):
        rows.append((f"client {k} (width {c['width']}, {c['samples']} samples)",
                     f"{c['train_s'] + c['impression_s']:.2f} s, {c['energy_j'] + c['impression_energy_j']:.3g} J "
                     f"({c.get('energy_source')})"))
    for k, v in rows:
        table.add_row(k, v)
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    if "model" in record.cost["energy_source"]:
        console.print("[dim]energy is estimated by haet's energy model (FLOPs and bytes moved at 45 nm), "
                      "not measured[/dim]")
    console.print(f"record: {path}")


def _pct(v) -> str:
    return "–" if v is None or v != v else f"{v:.4f}"
