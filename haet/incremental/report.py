"""The summary record and the plot of an incremental run."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..core.evaluation import evaluate
from ..core.record import RunRecord, hardware_info


def summary_record(start: nn.Module, results: list[dict], global_test, user_test, cfg, task: str, model_name: str,
                   args) -> RunRecord:
    """One record for the whole run: the final accuracies, the summed cost, per-update history."""
    cpu = torch.device("cpu")
    start.eval()
    before_user = evaluate(start, user_test, nn.functional.cross_entropy, cpu)["accuracy"]
    before_global = evaluate(start, global_test, nn.functional.cross_entropy, cpu)["accuracy"]
    last = results[-1]
    history = [{k: v for k, v in r.items() if k != "record"} for r in results]
    total = {k: sum(r[k] for r in results) for k in ("time_s", "train_s", "cache_fill_s", "flops", "energy_j")}
    mm = {f"incremental/{k}": v for k, v in {
        "updates": cfg.updates, "shift": args.shift, "last_layer": cfg.last_layer, "cache_mb": cfg.cache_mb,
        "cache_dtype": cfg.cache_dtype, "mix": cfg.mix, "epochs_per_update": cfg.epochs,
        "user_accuracy_before": before_user, "global_accuracy_before": before_global,
        "user_accuracy": last["user_accuracy"], "global_accuracy": last["global_accuracy"],
        "time_per_update_s": total["time_s"] / len(results), "cache_bytes": last["cache_bytes"],
        "cache_max_bytes": int(cfg.cache_mb * 2**20), "trunk_samples": last["trunk_samples"],
    }.items()}
    return RunRecord(
        task=task, model=model_name, label=results[0]["record"].label, seed=args.seed, device="cpu",
        hardware=hardware_info(cpu), epochs=cfg.epochs * len(results),
        steps=sum(r["record"].steps for r in results),
        stopped_by="updates", metrics={"user_accuracy": last["user_accuracy"],
                                       "global_accuracy": last["global_accuracy"],
                                       "accuracy": last["user_accuracy"]},
        history=history, cost={**total, "energy_source": "model",
                               "contended": any(r["contended"] for r in results)},
        method_metrics=mm, budget=results[0]["record"].budget, haet_version=__version__)


def write_plot(results: list[dict], path: Path, mm: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    u = [0] + [r["update"] for r in results]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(u, [mm["incremental/user_accuracy_before"]] + [r["user_accuracy"] for r in results], "o-", label="user (held out)")
    ax.plot(u, [mm["incremental/global_accuracy_before"]] + [r["global_accuracy"] for r in results], "s-",
            label="global test")
    ax.set_xticks(u)
    ax.set_xlabel("update (0: the pre-trained model)")
    ax.set_ylabel("accuracy")
    ax2 = ax.twinx()
    cum, t = [0.0], 0.0
    for r in results:
        t += r["time_s"]
        cum.append(t)
    ax2.plot(u, cum, "k:", label="cumulative time")
    ax2.set_ylabel("cumulative update time (s)")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="lower right", fontsize=8)
    ax.set_title(results[0]["record"].label, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
