"""The command line: listings, a real training run, bad input (exit 2, one line, nothing written)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from haet import cli
from haet.data import TASKS
from haet import methods as methods_pkg

from .examples_method import GradientClipping


def run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def with_clip(monkeypatch):
    """Register the README's worked example method as `clip` for this test."""
    monkeypatch.setitem(methods_pkg._USER, "clip", GradientClipping)


def test_tasks_and_methods_listings(capsys):
    code, out, _ = run(["tasks"], capsys)
    assert code == 0 and all(t in out for t in ("mnist5k", "digits", "mnist1d", "cifar10"))
    code, out, _ = run(["methods"], capsys)
    assert code == 0 and "baseline" in out and "gradmatch" in out


def test_train_mnist5k_five_epochs_reaches_94_percent(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, _ = run(["train", "--task", "mnist5k", "--epochs", "5", "--seed", "0", "--out", str(out_dir)], capsys)
    assert code == 0
    record = json.loads((out_dir / "record.json").read_text())
    assert record["metrics"]["accuracy"] >= 0.94
    assert record["task"] == "mnist5k" and record["model"] == "mnist5k-cnn" and record["steps"] == 5 * 63
    assert "test accuracy" in out and str(out_dir / "record.json") in out
    assert len((out_dir / "metrics.jsonl").read_text().splitlines()) == 5


@pytest.mark.parametrize("argv,message", [
    (["train", "--task", "nope"], "unknown task 'nope'; choose one of: " + ", ".join(sorted(TASKS))),
    (["train", "--model", "vgg"], "model 'vgg' does not fit task mnist5k; choose one of: mnist5k-cnn, mlp, resnet8"),
    (["train", "--method", "warp"], "unknown method 'warp'; choose one of:"),
    (["train", "--method", "baseline"], "omit --method"),
    (["train", "--budget", "time=abc"], "bad budget value time='abc'"),
    (["train", "--budget", "speed=3"], "key one of: time, energy, steps, flops, mem"),
    (["train", "--epochs", "0"], "epochs must be a positive integer, got 0"),
    (["train", "--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    (["train", "--seed", "-1"], "seed must be a non-negative integer"),
    (["train", "--device", "tpu"], "invalid choice: 'tpu' (choose from 'auto', 'cpu', 'cuda')"),
    (["train", "--task", "cifar10"], "task cifar10 needs --data-dir"),
    (["train", "--resume", "/nonexistent/run"], "no config.json there"),
    (["trian"], "invalid choice: 'trian' (choose from 'tasks', 'methods', 'train', 'bench', 'report'"),  # + COMMANDS
    (["bench", "--methods", "baseline"], "the following arguments are required: --out"),
    (["bench", "--methods", "baseline,warp", "--out", "X"], "unknown method 'warp'"),
    (["report", "/nonexistent"], "/nonexistent does not exist"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("haet: error: ") and message in err
    assert list(tmp_path.iterdir()) == []  # nothing written (not even runs/)


def test_method_parameter_errors_name_the_parameter(with_clip, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spec, message in (("clip:max_norm=-1", "clip: max_norm must be a number in (0, inf], got -1.0"),
                          ("clip:max_norm=big", "clip:max_norm must be a number, got 'big'"),
                          ("clip:norm=1", "unknown parameter 'norm' for clip; choose from: max_norm"),
                          ("clip:max_norm", "bad parameter 'max_norm' for method clip")):
        code, _, err = run(["train", "--method", spec], capsys)
        assert code == 2 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_method_runs_from_the_command_line(with_clip, tmp_path, capsys):
    code, _, _ = run(["train", "--task", "digits", "--epochs", "1", "--method", "clip:max_norm=0.5", "--quiet",
                      "--out", str(tmp_path)], capsys)
    record = json.loads((tmp_path / "record.json").read_text())
    assert code == 0 and record["methods"] == [{"name": "clip", "params": {"max_norm": 0.5}}]
    assert record["method_metrics"]["clip/clipped_steps"] > 0


def test_existing_record_is_not_overwritten_without_flag(tmp_path, capsys):
    args = ["train", "--task", "digits", "--epochs", "1", "--quiet", "--out", str(tmp_path)]
    assert run(args, capsys)[0] == 0
    before = (tmp_path / "record.json").read_text()
    code, _, err = run(args, capsys)
    assert code == 2 and "already holds record.json" in err and "--overwrite" in err
    assert (tmp_path / "record.json").read_text() == before
    assert run(args + ["--overwrite"], capsys)[0] == 0
    assert json.loads((tmp_path / "record.json").read_text())["haet_version"]


def test_checkpoint_and_resume_from_the_command_line(tmp_path, capsys):
    base = ["train", "--task", "digits", "--quiet", "--checkpoint"]
    assert run(base + ["--epochs", "3", "--out", str(tmp_path / "a")], capsys)[0] == 0
    assert run(base + ["--epochs", "2", "--out", str(tmp_path / "b")], capsys)[0] == 0
    assert run(["train", "--resume", str(tmp_path / "b"), "--epochs", "3", "--quiet"], capsys)[0] == 0
    a = json.loads((tmp_path / "a" / "record.json").read_text())
    b = json.loads((tmp_path / "b" / "record.json").read_text())
    assert a["metrics"] == b["metrics"] and a["steps"] == b["steps"] == 3 * 23
    code, _, err = run(["train", "--resume", str(tmp_path / "b"), "--task", "mnist5k"], capsys)
    assert code == 2 and "has task 'digits', not 'mnist5k'" in err


def test_bench_writes_table_report_and_plot(tmp_path, capsys, with_clip):
    out = tmp_path / "bench"
    code, stdout, _ = run(["bench", "--task", "digits", "--methods", "baseline,clip:max_norm=0.1", "--seeds", "2",
                           "--epochs", "1", "--out", str(out)], capsys)
    assert code == 0
    assert {p.name for p in out.iterdir()} >= {"results.csv", "report.md", "pareto.png", "runs"}
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and rows[0].startswith("task,model,method,seed,accuracy")
    report = (out / "report.md").read_text()
    assert "| baseline | 2 |" in report and "| clip:max_norm=0.1 | 2 |" in report and "×)" in report
    assert "report: " in stdout and "pareto: " in stdout
    code, _, err = run(["bench", "--task", "digits", "--methods", "baseline", "--epochs", "1", "--out", str(out)],
                       capsys)
    assert code == 2 and "--overwrite" in err
    (out / "report.md").unlink()
    assert run(["report", str(out)], capsys)[0] == 0 and (out / "report.md").read_text() == report


def test_console_script_and_module_entry_points(tmp_path):
    exe = [sys.executable, "-m", "haet"]
    done = subprocess.run(exe + ["train", "--task", "nope"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown task 'nope'" in done.stderr


def test_ctrl_c_stops_the_bench_and_reports_what_ran(tmp_path, capsys, monkeypatch):
    import haet

    class Interrupt(haet.Method):
        name = "interrupt"
        summary, paper = "raises KeyboardInterrupt", "-"

        def after_step(self, state):
            raise KeyboardInterrupt

    monkeypatch.setitem(methods_pkg._USER, "interrupt", Interrupt)
    out = tmp_path / "b"
    code, _, err = run(["bench", "--task", "digits", "--methods", "baseline,interrupt",
                        "--epochs", "1", "--seeds", "2", "--out", str(out)], capsys)
    assert code == 1 and "interrupted" in err
    records = sorted(p.parent.parent.name + "/" + p.parent.name for p in out.rglob("record.json"))
    assert records == ["baseline/seed0", "interrupt/seed0"]  # nothing ran after the interrupted run
    assert "| interrupt | 1 |" in (out / "report.md").read_text()
