"""Reports: results.csv, report.md and pareto.png from a set of RunRecords.

- ``results.csv``: one row per run (task, model, method label, seed, accuracy, costs, stop reason).
- ``report.md``: per method, mean ± std over seeds of accuracy, train time, peak memory, FLOPs and
  energy, each cost also as a ratio to the baseline's mean (the run with no method).
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
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..core import files
from ..core.errors import ConfigError
from ..core.record import RunRecord

COLUMNS = ("task", "model", "method", "seed", "accuracy", "loss", "train_s", "wall_s", "peak_mem_mb", "flops",
           "energy_j", "energy_source", "epochs", "steps", "stopped_by", "record")

#: The summary's quantities: (key, heading, unit, lower is better).
QUANTITIES = (("accuracy", "accuracy", "", False), ("train_s", "train time", "s", True),
              ("peak_mem_mb", "peak memory", "MiB", True), ("flops", "FLOPs", "", True),
              ("energy_j", "energy", "J", True))


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
                    "accuracy": r.metrics.get("accuracy"), "loss": r.metrics.get("loss"),
                    "train_s": c.get("train_s"), "wall_s": c.get("wall_s"), "peak_mem_mb": c.get("peak_mem_mb"),
                    "flops": c.get("flops"), "energy_j": c.get("energy_j"), "energy_source": c.get("energy_source"),
                    "epochs": r.epochs, "steps": r.steps, "stopped_by": r.stopped_by, "record": str(path)})
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


def summarize(table: list[dict], baseline: str = "baseline") -> list[Summary]:
    """One Summary per method label, in order of first appearance (baseline first)."""
    labels = sorted(dict.fromkeys(r["method"] for r in table), key=lambda m: (m != baseline,))
    summaries = []
    for label in labels:
        runs = [r for r in table if r["method"] == label]
        mean, std = {}, {}
        for key, *_ in QUANTITIES:
            values = [r[key] for r in runs if isinstance(r[key], (int, float))]
            mean[key] = statistics.fmean(values) if values else None
            std[key] = statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)
        sources = sorted({str(r["energy_source"]) for r in runs})
        stops = sorted({str(r["stopped_by"]) for r in runs})
        summaries.append(Summary(label, len(runs), mean, std, {}, "/".join(sources), "/".join(stops)))
    base = next((s for s in summaries if s.method == baseline), None)
    for s in summaries:
        for key, *_ in QUANTITIES:
            b = base.mean.get(key) if base else None
            s.ratio[key] = s.mean[key] / b if (b and s.mean[key] is not None) else None
    return summaries


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
    if key == "flops":
        return f"{value:.3g}"
    if key == "train_s":
        return f"{value:.2f}"
    return f"{value:.4g}" if key == "energy_j" else f"{value:.1f}"


def cell(s: Summary, key: str) -> str:
    text = fmt(s.mean[key], key)
    if s.runs > 1 and s.std[key] is not None:
        text += f" ± {fmt(s.std[key], key)}"
    if key != "accuracy" and s.ratio.get(key) is not None and s.method != "baseline":
        text += f" ({s.ratio[key]:.2f}×)"
    elif key == "accuracy" and s.ratio.get(key) is not None and s.method != "baseline":
        text += f" ({(s.mean[key] - s.mean[key] / s.ratio[key]) * 100:+.1f} pt)"
    return text


def write_markdown(table: list[dict], summaries: list[Summary], path: Path, plot: Path | None) -> Path:
    md = files.md_cell  # every string from a record is escaped: one line, no markup
    tasks = sorted({md(r["task"]) for r in table})
    models = sorted({md(r["model"]) for r in table})
    seeds = sorted({r["seed"] for r in table})
    lines = [f"# haet report: {', '.join(tasks)} ({', '.join(models)})", "",
             f"{len(table)} runs; seeds {', '.join(map(str, seeds))}. Mean ± std over seeds; in brackets, the "
             "ratio to the baseline's mean (accuracy: the difference in points). Train time excludes evaluation. "
             "Energy: source in the last column (`model` = estimated by haet's energy model, not measured).", "",
             "| method | runs | " + " | ".join(f"{h} ({u})" if u else h for _, h, u, _ in QUANTITIES)
             + " | energy source | stopped by |",
             "|---|---|" + "---|" * len(QUANTITIES) + "---|---|"]
    for s in summaries:
        lines.append(f"| {md(s.method)} | {s.runs} | " + " | ".join(cell(s, k) for k, *_ in QUANTITIES)
                     + f" | {md(s.energy_source)} | {md(s.stopped_by)} |")
    if plot is not None:
        lines += ["", f"![accuracy against cost]({plot.name})"]
    lines += ["", "Per-run rows: `results.csv`; full records: the `record.json` files it lists.", ""]
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
    energy_sources = sorted({s.energy_source for s in summaries})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    colors = plt.get_cmap("tab20").colors  # 20 colours and 7 markers: every method keeps its own look
    markers = "osD^vPX"
    for ax, (key, xlabel) in zip(axes, axes_spec):
        pts = []
        for i, s in enumerate(summaries):
            x, y = s.mean.get(key), s.mean.get("accuracy")
            if x is None or y is None:
                continue
            pts.append((x, y))
            is_base = s.method == "baseline"
            ax.errorbar(x, y, xerr=s.std.get(key) or 0, yerr=s.std.get("accuracy") or 0,
                        fmt="*" if is_base else markers[i % len(markers)], ms=14 if is_base else 7,
                        color="black" if is_base else colors[(2 * i + i // 10) % len(colors)],
                        capsize=3, label=s.method, zorder=3)
            if is_base:
                ax.axhline(y, color="gray", ls="--", lw=0.8)
                ax.axvline(x, color="gray", ls="--", lw=0.8)
        front = pareto_front(pts)
        if len(front) > 1:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:red", alpha=0.5,
                    lw=1.5, label="Pareto front" if ax is axes[0] else None, zorder=2)
        if key == "energy_j":
            xlabel = f"energy (J, {'/'.join(energy_sources)})"
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(1, min(len(labels), 6)), fontsize=8, frameon=False)
    fig.suptitle(title or "accuracy against cost (baseline: black star; mean ± std over seeds)")
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
    tasks = sorted({files.plain(r["task"]) for r in table})
    with files.FolderLock(out):
        plot = plot_pareto(summaries, out / "pareto.png", title=f"{', '.join(tasks)}: accuracy against cost "
                           "(baseline: black star; mean ± std over seeds)")
        return {"results": write_csv(table, out / "results.csv"),
                "report": write_markdown(table, summaries, out / "report.md", plot),
                "pareto": plot, "summaries": summaries, "rows": table, "records": [r for _, r in records]}
