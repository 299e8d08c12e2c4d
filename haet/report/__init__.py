"""Reports: results.csv, report.md and pareto.png from a set of RunRecords.

- ``results.csv``: one row per run (task, model, method label, seed, accuracy, costs, stop reason).
- ``report.md``: a section per (task, model); in it, per method, mean ± std over seeds of accuracy,
  train time, peak memory, FLOPs and energy, each cost also as a ratio to the baseline's mean of
  the same task and model (the run with no method). Runs of different tasks or models are never
  averaged together. Runs whose timing was contended (``cost.contended``) are counted and marked.
- ``pareto.png``: accuracy against train time, energy and peak memory; one point per method (mean,
  with std bars), the baseline marked, the Pareto front (no other method both cheaper and more
  accurate) drawn as a step line.

Records come from folders others may have shared: they are validated when loaded
(`RunRecord.load`), every string from them is escaped in Markdown and CSV (`haet.core.files`), and
the outputs are written atomically without following symlinks, with the output folder locked.
"""

from __future__ import annotations

import csv
import io
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..core import files
from ..core.errors import ConfigError
from ..core.record import RunRecord

COLUMNS = ("task", "model", "method", "seed", "accuracy", "loss", "nll", "train_s", "wall_s", "peak_mem_mb", "flops",
           "energy_j", "energy_source", "epochs", "steps", "stopped_by", "target", "time_to_target_s", "contended", "threads",
           "record")

#: The summary's quantities: (key, heading, unit, lower is better).
QUANTITIES = (("accuracy", "accuracy", "", False), ("nll", "test NLL", "nats", True),
              ("train_s", "train time", "s", True),
              ("peak_mem_mb", "peak memory", "MiB", True), ("flops", "FLOPs", "", True),
              ("energy_j", "energy", "J", True))
#: Quality measures: a section shows those its runs report (accuracy for classifiers, NLL for generative models).
QUALITY = ("accuracy", "nll")


def visible(summaries: list["Summary"]) -> list[tuple]:
    """The QUANTITIES to show for one (task, model) section: every cost, and the quality measures
    some run of the section reports."""
    return [q for q in QUANTITIES if q[0] not in QUALITY or any(s.mean.get(q[0]) is not None for s in summaries)]


def quality_key(summaries: list["Summary"]) -> str:
    """What the section's plots put on the y axis: accuracy, or the NLL when no run has an accuracy."""
    if any(s.mean.get("accuracy") is not None for s in summaries):
        return "accuracy"
    return "nll" if any(s.mean.get("nll") is not None for s in summaries) else "accuracy"


def find_records(dirs) -> list[tuple[Path, RunRecord]]:
    """Every record.json under the given directories (or record files), sorted by path."""
    found: list[tuple[Path, RunRecord]] = []
    for d in map(Path, dirs):
        if d.is_file():
            paths = [d]
        elif d.is_dir():
            paths = sorted(d.rglob("record.json"))
        else:
            raise ConfigError(f"{d} does not exist")
        found += [(p, RunRecord.load(p)) for p in paths]
    if not found:
        raise ConfigError(f"no record.json under {', '.join(map(str, dirs))}")
    return found


def rows(records: list[tuple[Path, RunRecord]]) -> list[dict]:
    out = []
    for path, r in records:
        c = r.cost
        out.append({"task": r.task, "model": r.model, "method": r.method_label, "seed": r.seed,
                    "accuracy": r.metrics.get("accuracy"), "loss": r.metrics.get("loss"), "nll": r.metrics.get("nll"),
                    "train_s": c.get("train_s"), "wall_s": c.get("wall_s"), "peak_mem_mb": c.get("peak_mem_mb"),
                    "flops": c.get("flops"), "energy_j": c.get("energy_j"), "energy_source": c.get("energy_source"),
                    "epochs": r.epochs, "steps": r.steps, "stopped_by": r.stopped_by,
                    "target": c.get("target"), "time_to_target_s": c.get("time_to_target_s"), "contended": c.get("contended"),
                    "threads": c.get("threads"), "record": str(path)})
    return out


@dataclass
class Summary:
    method: str
    runs: int
    mean: dict
    std: dict
    ratio: dict          # cost means / the baseline's (None without a baseline)
    energy_source: str
    stopped_by: str
    task: str | None = None
    model: str | None = None
    contended: int = 0                # runs whose timing was contended (cost.contended)
    targets: str = ""                 # time to target: "1.23 s (2/2)", "not reached (0/2)", "" without a target


def groups(table: list[dict]) -> list[tuple]:
    """The (task, model) pairs of the table, in order of first appearance."""
    return list(dict.fromkeys((r.get("task"), r.get("model")) for r in table))


def summarize(table: list[dict], baseline: str = "baseline") -> list[Summary]:
    """One Summary per (task, model, method label): sections in order of first appearance, the
    baseline first in each; ratios are to the baseline of the same task and model."""
    summaries = []
    for task, model in groups(table):
        section = [r for r in table if (r.get("task"), r.get("model")) == (task, model)]
        summaries += _summarize_section(section, baseline, task, model)
    return summaries


def _summarize_section(table: list[dict], baseline: str, task, model) -> list[Summary]:
    labels = sorted(dict.fromkeys(r["method"] for r in table), key=lambda m: (m != baseline,))
    summaries = []
    for label in labels:
        runs = [r for r in table if r["method"] == label]
        mean, std = {}, {}
        for key, *_ in QUANTITIES:
            values = [r.get(key) for r in runs if isinstance(r.get(key), (int, float))]
            mean[key] = statistics.fmean(values) if values else None
            std[key] = statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)
        sources = sorted({str(r["energy_source"]) for r in runs})
        stops = sorted({str(r["stopped_by"]) for r in runs})
        summaries.append(Summary(label, len(runs), mean, std, {}, "/".join(sources), "/".join(stops), task, model,
                                 sum(1 for r in runs if r.get("contended")), _targets(runs)))
    base = next((s for s in summaries if s.method == baseline), None)
    for s in summaries:
        for key, *_ in QUANTITIES:
            b = base.mean.get(key) if base else None
            s.ratio[key] = s.mean[key] / b if (b and s.mean[key] is not None) else None
    return summaries


def _targets(runs: list[dict]) -> str:
    """Time to target over the runs that had one: the mean over those that reached it, and how many did."""
    aimed = [r for r in runs if r.get("target")]
    if not aimed:
        return ""
    reached = [r["time_to_target_s"] for r in aimed if isinstance(r.get("time_to_target_s"), (int, float))]
    if not reached:
        return f"not reached (0/{len(aimed)})"
    return f"{statistics.fmean(reached):.2f} s ({len(reached)}/{len(aimed)})"


def write_csv(table: list[dict], path: Path) -> Path:
    buffer = io.StringIO(newline="")
    w = csv.DictWriter(buffer, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows({k: files.csv_cell(v) for k, v in row.items()} for row in table)
    return files.write_text(path, buffer.getvalue())


def fmt(value, key: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if key == "accuracy":
        return f"{value:.4f}"
    if key == "nll":
        return f"{value:.2f}"
    if key == "flops":
        return f"{value:.3g}"
    if key == "train_s":
        return f"{value:.2f}"
    return f"{value:.4g}" if key == "energy_j" else f"{value:.1f}"


def cell(s: Summary, key: str) -> str:
    text = fmt(s.mean[key], key)
    if s.runs > 1 and s.std[key] is not None:
        text += f" ± {fmt(s.std[key], key)}"
    if key == "nll" and s.ratio.get(key) is not None and s.method != "baseline":
        text += f" ({s.mean[key] - s.mean[key] / s.ratio[key]:+.2f} nats)"
    elif key != "accuracy" and s.ratio.get(key) is not None and s.method != "baseline":
        text += f" ({s.ratio[key]:.2f}×)"
    elif key == "accuracy" and s.ratio.get(key) is not None and s.method != "baseline":
        text += f" ({(s.mean[key] - s.mean[key] / s.ratio[key]) * 100:+.1f} pt)"
    return text


def write_markdown(table: list[dict], summaries: list[Summary], path: Path, plot: Path | dict | None) -> Path:
    """`plot`: one figure, or {(task, model): figure} for a report with several sections."""
    md = files.md_cell  # every string from a record is escaped: one line, no markup
    tasks = sorted({md(r["task"]) for r in table})
    models = sorted({md(r["model"]) for r in table})
    seeds = sorted({r["seed"] for r in table})
    sections = list(dict.fromkeys((s.task, s.model) for s in summaries))
    lines = [f"# haet report: {', '.join(tasks)} ({', '.join(models)})", "",
             f"{len(table)} runs; seeds {', '.join(map(str, seeds))}. Mean ± std over seeds; in brackets, the "
             "ratio to the baseline's mean (accuracy: the difference in points"
             + ("; NLL: in nats" if any(s.mean.get("nll") is not None for s in summaries) else "")
             + "). Train time excludes evaluation. "
             "Energy: source in the last column (`model` = estimated by haet's energy model, not measured).", ""]
    contended = sum(s.contended for s in summaries)
    if contended:
        lines += [f"**{contended} of {len(table)} runs were timed on a contended machine** (CPU time per thread "
                  "well below wall time, or load above the core count): their times and time ratios are not "
                  "reliable; rerun them on a quiet machine or with fewer threads. Marked ⚠ below.", ""]
    targets = any(s.targets for s in summaries)
    for task, model in sections:
        if len(sections) > 1:
            lines += [f"## {md(task)} / {md(model)}", ""]
        section = [s for s in summaries if (s.task, s.model) == (task, model)]
        shown = visible(section)
        lines += ["| method | runs | " + " | ".join(f"{h} ({u})" if u else h for _, h, u, _ in shown)
                  + (" | time to target |" if targets else " |") + " energy source | stopped by |"
                  + (" timing |" if contended else ""),
                  "|---|---|" + "---|" * len(shown) + ("---|" if targets else "") + "---|---|"
                  + ("---|" if contended else "")]
        for s in section:
            mark = (f" ⚠ {s.contended}/{s.runs} contended |" if s.contended else " ok |") if contended else ""
            lines.append(f"| {md(s.method)} | {s.runs} | " + " | ".join(cell(s, k) for k, *_ in shown)
                         + (f" | {md(s.targets) if s.targets else '–'}" if targets else "")
                         + f" | {md(s.energy_source)} | {md(s.stopped_by)} |" + mark)
        figure = plot.get((task, model)) if isinstance(plot, dict) else plot
        if figure is not None:
            lines += ["", f"![{quality_key(section)} against cost]({figure.name})"]
        lines.append("")
    lines += ["Per-run rows: `results.csv`; full records: the `record.json` files it lists.", ""]
    return files.write_text(path, "\n".join(lines))


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated by any other (lower cost and higher accuracy), sorted by cost."""
    front, best = [], -math.inf
    for cost, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((cost, acc))
            best = acc
    return front


def plot_pareto(summaries: list[Summary], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_spec = [("train_s", "train time (s)"), ("energy_j", "energy (J)"), ("peak_mem_mb", "peak memory (MiB)")]
    quality = quality_key(summaries)
    sign = 1 if quality == "accuracy" else -1  # the front keeps the highest accuracy, or the lowest NLL
    energy_sources = sorted({s.energy_source for s in summaries})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    colors = plt.get_cmap("tab20").colors  # 20 colours and 7 markers: every method keeps its own look
    markers = "osD^vPX"
    for ax, (key, xlabel) in zip(axes, axes_spec):
        pts = []
        for i, s in enumerate(summaries):
            x, y = s.mean.get(key), s.mean.get(quality)
            if x is None or y is None:
                continue
            pts.append((x, sign * y))
            is_base = s.method == "baseline"
            ax.errorbar(x, y, xerr=s.std.get(key) or 0, yerr=s.std.get(quality) or 0,
                        fmt="*" if is_base else markers[i % len(markers)], ms=14 if is_base else 7,
                        color="black" if is_base else colors[(2 * i + i // 10) % len(colors)],
                        capsize=3, label=s.method, zorder=3)
            if is_base:
                ax.axhline(y, color="gray", ls="--", lw=0.8)
                ax.axvline(x, color="gray", ls="--", lw=0.8)
        front = pareto_front(pts)
        if len(front) > 1:
            ax.step([p[0] for p in front], [sign * p[1] for p in front], where="post", color="tab:red", alpha=0.5,
                    lw=1.5, label="Pareto front" if ax is axes[0] else None, zorder=2)
        if key == "energy_j":
            xlabel = f"energy (J, {'/'.join(energy_sources)})"
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy" if quality == "accuracy" else "test NLL (nats, lower is better)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(1, min(len(labels), 6)), fontsize=8, frameon=False)
    fig.suptitle(title or f"{quality} against cost (baseline: black star; mean ± std over seeds)")
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    try:  # into a file haet opened itself: never through a symlink
        files.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)
    return path


def build_report(dirs, out: Path | None = None) -> dict:
    """Write results.csv, report.md and pareto.png for the records under `dirs` into `out`."""
    records = find_records(dirs)
    first = Path(dirs[0])
    out = Path(out) if out is not None else (first.parent if first.is_file() else first)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; choose a folder")
    for name in ("pareto.png", "results.csv", "report.md"):
        files.check_writable_path(out / name)  # a link or a folder in the way: refused before anything is written
    table = rows(records)
    summaries = summarize(table)
    plots = {}
    with files.FolderLock(out):
        for i, (task, model) in enumerate(groups(table)):
            name = "pareto.png" if i == 0 else f"pareto-{_slug(task)}-{_slug(model)}.png"
            plots[(task, model)] = plot_pareto([s for s in summaries if (s.task, s.model) == (task, model)],
                                               out / name, title=f"{files.plain(task)} / {files.plain(model)}: "
                                               f"{quality_key([s for s in summaries if (s.task, s.model) == (task, model)])}"
                                               " against cost (baseline: black star; mean ± std over seeds)")
        plot = next(iter(plots.values()))
        return {"results": write_csv(table, out / "results.csv"),
                "report": write_markdown(table, summaries, out / "report.md", plots),
                "pareto": plot, "pareto_all": list(plots.values()), "summaries": summaries, "rows": table,
                "records": [r for _, r in records]}


def _slug(text) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", str(text)).strip("_") or "none"
