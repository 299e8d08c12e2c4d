"""A whole submission: N runs under the rules, DIR/score.json, DIR/record.json, a leaderboard line."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Callable

from ..core.errors import ConfigError
from ..core.record import RunRecord, cpu_name
from ..recipes import Recipe
from .rules import Rules, run_once, score

LEADERBOARD_HEADER = ("| date | submission | task | budget (s) | runs | mean accuracy | std | min | max | machine |\n"
                      "|---|---|---|---|---|---|---|---|---|---|\n")


def submit(task, recipe: Recipe, rules: Rules, out_dir: str | Path, *, data_dir: str | None = None,
           device: str = "cpu", label: str | None = None, on_run: Callable[[int, RunRecord], None] | None = None,
           data=None) -> dict:
    """Run `recipe` `rules.runs` times (seeds 0..N-1), keep every run's record under DIR/run-<seed>/,
    write DIR/score.json and DIR/record.json; return the score document. Ctrl-C keeps and scores
    the finished runs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    records: list[RunRecord] = []
    interrupted = False
    try:
        for seed in range(rules.runs):
            record, _ = run_once(task, recipe, rules, seed, data_dir=data_dir, device=device,
                              out_dir=out / f"run-{seed}", data=data)
            records.append(record)
            mm = record.method_metrics
            runs.append({"seed": seed, "accuracy": mm["challenge/accuracy"], "wall_s": mm["challenge/wall_s"],
                         "overrun_s": mm["challenge/overrun_s"], "train_s": record.cost.get("train_s"),
                         "steps": record.steps, "stopped_by": record.stopped_by, "record": f"run-{seed}/record.json"})
            if on_run is not None:
                on_run(seed, record)
    except KeyboardInterrupt:
        interrupted = True
    if not runs:
        raise ConfigError("interrupted before the first run finished: nothing to score")
    doc = {"task": task.name, "submission": label or recipe.name, "recipe": recipe.params(),
           "split": "holdout" if rules.holdout else "test", "time_budget_s": rules.time_budget_s,
           "runs_asked": rules.runs, "interrupted": interrupted,
           "score": score([r["accuracy"] for r in runs]), "runs": runs,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": f"{cpu_name()} ({device})"}
    (out / "score.json").write_text(json.dumps(doc, indent=2) + "\n")
    s = doc["score"]
    summary = RunRecord(task=task.name, model=recipe.model_name, label=doc["submission"], seed=0,
                        device=records[-1].device, hardware=records[-1].hardware,
                        steps=sum(r.steps for r in records), stopped_by="interrupt" if interrupted else "runs",
                        metrics={"accuracy": s["mean"]}, budget={"time_s": rules.time_budget_s},
                        method_metrics={"challenge/score_mean": s["mean"], "challenge/score_std": s["std"],
                                        "challenge/score_min": s["min"], "challenge/score_max": s["max"],
                                        "challenge/runs": s["runs"], "challenge/time_budget_s": rules.time_budget_s},
                        cost={"train_s": sum(r.cost.get("train_s", 0.0) for r in records)},
                        haet_version=records[-1].haet_version)
    summary.save(out)
    return doc


def _cell(value: object) -> str:
    """A markdown table cell: pipes escaped, line breaks and control characters removed."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(value))
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`").strip()


def leaderboard_line(doc: dict) -> str:
    s = doc["score"]
    cells = [doc["date"], doc["submission"], doc["task"], f"{doc['time_budget_s']:g}", s["runs"],
             f"{s['mean']:.4f}", f"{s['std']:.4f}", f"{s['min']:.4f}", f"{s['max']:.4f}", doc["machine"]]
    return "| " + " | ".join(_cell(c) for c in cells) + " |\n"


def append_leaderboard(path: str | Path, doc: dict) -> Path:
    """Append one line for the submission `doc` to the markdown table at `path` (created with a header)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", encoding="utf-8") as f:
        if new:
            f.write("# HAET challenge leaderboard\n\n" + LEADERBOARD_HEADER)
        f.write(leaderboard_line(doc))
    return path
