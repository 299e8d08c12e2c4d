"""Report maths: the Pareto front, means, stds and ratios to the baseline."""

from __future__ import annotations

import pytest

from haet.core.record import RunRecord
from haet.report import build_report, pareto_front, summarize


def test_pareto_front_keeps_only_undominated_points():
    pts = [(1.0, 0.80), (2.0, 0.90), (2.5, 0.85), (3.0, 0.95), (0.5, 0.70), (4.0, 0.95)]
    assert pareto_front(pts) == [(0.5, 0.70), (1.0, 0.80), (2.0, 0.90), (3.0, 0.95)]


def _row(method, seed, acc, train_s):
    return {"method": method, "seed": seed, "accuracy": acc, "train_s": train_s, "peak_mem_mb": 100.0,
            "flops": 1e9, "energy_j": 2.0, "energy_source": "model", "stopped_by": "epochs"}


def test_summary_means_stds_and_ratios_to_baseline():
    table = [_row("fast", 0, 0.90, 1.0), _row("baseline", 0, 0.95, 4.0), _row("baseline", 1, 0.93, 2.0),
             _row("fast", 1, 0.92, 2.0)]
    base, fast = summarize(table)
    assert base.method == "baseline" and fast.method == "fast"  # baseline first
    assert base.mean["train_s"] == 3.0 and base.std["train_s"] == pytest.approx(2 ** 0.5)
    assert fast.ratio["train_s"] == pytest.approx(1.5 / 3.0) and fast.ratio["energy_j"] == 1.0
    assert fast.mean["accuracy"] == pytest.approx(0.91)


def test_build_report_from_records(tmp_path):
    for label, seed, acc in (("baseline", 0, 0.9), ("m:k=1", 0, 0.8)):
        RunRecord(task="t", model="m", label=label, seed=seed, metrics={"accuracy": acc},
                  cost={"train_s": 2.0 if label == "baseline" else 1.0, "energy_j": 1.0, "energy_source": "model",
                        "peak_mem_mb": 10.0, "flops": 5.0}).save(tmp_path / label.replace(":", "_"))
    result = build_report([tmp_path])
    md = result["report"].read_text()
    assert "| m:k=1 | 1 | 0.8000 (-10.0 pt) | 1.00 (0.50×) |" in md
    assert result["pareto"].stat().st_size > 10_000  # a real PNG was drawn
    assert result["results"].read_text().count("\n") == 3
