"""Issue items 5 (broken records given to `haet report`), 6 (--overwrite removes only haet's
files), 7 (one run per output folder) and 8 (Ctrl-C and SIGTERM keep a record)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from haet import methods as methods_pkg

from .conftest import haet_process, record_dict, run, tree_hash, write_record


def _wait_for(path, proc, timeout=120):
    start = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - start < timeout, f"{path} never appeared"
        time.sleep(0.1)


# -- item 5: records with wrong types, absurd nesting, or that are not files ---------------------
@pytest.mark.parametrize("fields", [
    {"seed": "x"}, {"epochs": -1}, {"metrics": [1]}, {"cost": {"train_s": "fast"}}, {"methods": [{"name": 5}]},
    {"history": "x"}, {"hardware": {"cpu": "x" * 10_000}}, {"method_metrics": {"a\nb": 1}},
])
def test_report_refuses_records_with_wrong_types(fields, tmp_path, capsys):
    write_record(tmp_path / "r", **fields)
    code, _, err = run(["report", tmp_path / "r"], capsys)
    assert code == 2 and "record.json is not a valid record" in err and err.count("\n") == 1, err


def test_report_refuses_absurdly_nested_records(tmp_path, capsys):
    (tmp_path / "record.json").write_text(json.dumps(record_dict())[:-1] + ', "x": ' + "[" * 100_000
                                          + "]" * 100_000 + "}")
    code, _, err = run(["report", tmp_path], capsys)
    assert code == 2 and "record.json is not a valid record" in err and err.count("\n") == 1, err
    write_record(tmp_path, method_metrics={"a": json.loads("[" * 20 + "]" * 20)})
    code, _, err = run(["report", tmp_path], capsys)
    assert code == 2 and "nested deeper" in err


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_report_refuses_a_record_that_is_not_a_regular_file(kind, tmp_path):
    """A FIFO blocked `haet report` for ever; /dev/zero ate memory until it died. Run in a child
    with a time limit, so that a regression fails instead of hanging."""
    d = tmp_path / "shared" / "run"
    d.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(d / "record.json")
    else:
        os.symlink("/dev/zero", d / "record.json")
    proc = haet_process(["report", tmp_path / "shared", "--out", tmp_path / "out"],
                        preexec_fn=lambda: __import__("resource").setrlimit(
                            __import__("resource").RLIMIT_AS, (6 * 2**30, 6 * 2**30)))
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("haet report blocked on the record")
    assert proc.returncode == 2 and err.count("\n") == 1 and "record.json" in err, (proc.returncode, err)


# -- item 6: --overwrite removes only what haet wrote --------------------------------------------
def test_overwrite_keeps_a_foreign_runs_tree(tmp_path, sentinel, capsys):
    out = tmp_path / "out"
    foreign = {out / "runs" / "mine" / "notes.txt": "my notes\n", out / "runs" / "data.csv": "1,2\n",
               out / "runs" / "baseline" / "seed7" / "notes.txt": "mine too\n"}
    for p, text in foreign.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    write_record(out / "runs" / "train" / "digits-1")  # a `haet train` run kept under runs/, not a bench's
    (out / "runs" / "train" / "digits-1" / "config.json").write_text("{}")
    kept = tree_hash(out / "runs" / "train")
    bench = ["bench", "--task", "digits", "--methods", "baseline", "--epochs", "1", "--out", out, "--quiet"]
    assert run(bench + ["--seeds", "2", "--overwrite"], capsys)[0] == 0
    assert (out / "runs" / "baseline" / "seed1" / "record.json").exists()
    assert run(bench + ["--overwrite"], capsys)[0] == 0  # one seed now: the bench's own seed1 goes
    assert not (out / "runs" / "baseline" / "seed1").exists()
    assert all(p.read_text() == text for p, text in foreign.items())
    assert tree_hash(out / "runs" / "train") == kept and sentinel.unchanged()
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 2 and "runs/train" not in (out / "results.csv").read_text()


def test_train_overwrite_removes_only_a_train_runs_files(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["train", "--task", "digits", "--epochs", "1", "--quiet", "--out", out]
    assert run(args, capsys)[0] == 0
    (out / "runs").mkdir()
    (out / "runs" / "keep.txt").write_text("keep\n")
    (out / "report.md").write_text("my report\n")
    assert run(args + ["--overwrite"], capsys)[0] == 0
    assert (out / "runs" / "keep.txt").read_text() == "keep\n" and (out / "report.md").read_text() == "my report\n"


def test_bench_refuses_run_folders_holding_files_haet_did_not_write(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "runs" / "baseline" / "seed0").mkdir(parents=True)
    (out / "runs" / "baseline" / "seed0" / "metrics.jsonl").write_text("someone else's\n")
    code, _, err = run(["bench", "--task", "digits", "--methods", "baseline", "--epochs", "1", "--out", out,
                        "--overwrite", "--quiet"], capsys)
    assert code == 2 and "that no haet run wrote" in err
    assert (out / "runs" / "baseline" / "seed0" / "metrics.jsonl").read_text() == "someone else's\n"


# -- item 7: one run per output folder -----------------------------------------------------------
def test_a_second_run_on_the_same_out_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "out"
    first = haet_process(["train", "--task", "digits", "--epochs", "100000", "--out", out, "--quiet"])
    try:
        _wait_for(out / "metrics.jsonl", first)
        for argv in (["train", "--task", "digits", "--epochs", "1", "--quiet", "--overwrite", "--out", out],
                     ["bench", "--task", "digits", "--methods", "baseline", "--epochs", "1", "--quiet", "--out", out],
                     ["report", tmp_path / "elsewhere", "--out", out]):
            if argv[0] == "report":
                write_record(tmp_path / "elsewhere")
            lines_before = (out / "metrics.jsonl").read_text().count("\n")
            code, _, err = run(argv, capsys)
            assert code == 2 and f"in use by another haet run (pid {first.pid})" in err, err
            assert (out / "metrics.jsonl").read_text().count("\n") >= lines_before  # nothing cleared
            assert not (out / "report.md").exists()
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert json.loads((out / "record.json").read_text())["stopped_by"] == "terminated"
    assert not (out / ".haet.lock").exists()  # released with the run


# -- item 8: Ctrl-C during warm-up, SIGTERM ------------------------------------------------------
def test_ctrl_c_during_bench_warm_up_stops_the_bench(tmp_path, capsys, monkeypatch):
    import haet

    class Interrupt(haet.Method):
        name = "interrupt"
        summary, paper = "presses Ctrl-C at step 3", "-"

        def after_step(self, state):
            if state.step == 3:
                raise KeyboardInterrupt

    monkeypatch.setitem(methods_pkg._USER, "interrupt", Interrupt)
    out = tmp_path / "b"
    code, _, err = run(["bench", "--task", "digits", "--methods", "baseline,interrupt", "--epochs", "1",
                        "--out", out, "--quiet"], capsys)
    assert code == 1 and "interrupted" in err
    assert not list(out.rglob("seed*"))  # no measured run started after the interrupt
    record = json.loads((out / "runs" / "interrupt" / "warmup" / "record.json").read_text())
    assert record["stopped_by"] == "interrupt" and record["steps"] == 3
    assert "| interrupt | 1 |" in (out / "report.md").read_text()


def test_sigterm_stops_a_train_run_and_keeps_its_record(tmp_path):
    out = tmp_path / "out"
    proc = haet_process(["train", "--task", "digits", "--epochs", "100000", "--checkpoint", "--out", out, "--quiet"])
    _wait_for(out / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    record = json.loads((out / "record.json").read_text())
    assert proc.returncode == 1 and record["stopped_by"] == "terminated" and record["epochs"] >= 1
    assert "run stopped: terminated; record written" in err


def test_sigterm_stops_a_bench_and_keeps_the_record_of_its_run(tmp_path):
    out = tmp_path / "b"
    proc = haet_process(["bench", "--task", "digits", "--methods", "baseline", "--seeds", "3", "--epochs", "100000",
                         "--out", out, "--quiet"])
    _wait_for(out / "runs" / "baseline" / "seed0" / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    record = json.loads((out / "runs" / "baseline" / "seed0" / "record.json").read_text())
    assert proc.returncode == 1 and record["stopped_by"] == "terminated" and "interrupted (terminated)" in err
    assert not (out / "runs" / "baseline" / "seed1").exists() and (out / "report.md").exists()


def test_the_sigterm_handler_is_installed_only_while_a_run_is_active(tmp_path, capsys):
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    class Spy(__import__("haet").Method):
        name = "spy"
        summary, paper = "records the SIGTERM handler", "-"

        def after_step(self, state):
            seen.append(signal.getsignal(signal.SIGTERM))

    import haet
    from haet.data import get_task
    train, test = get_task("digits").load(0, None)
    model = __import__("haet.models", fromlist=["build_model"]).build_model("mlp", (1, 8, 8), 10)
    haet.Trainer(model, train, test, methods=[Spy()], progress=False, budget=haet.Budget(steps=2)).fit(1)
    assert seen and seen[0] is not before and seen[0] not in (signal.SIG_DFL, signal.SIG_IGN)
    assert signal.getsignal(signal.SIGTERM) is before


def test_bench_never_writes_through_a_symlinked_run_folder(tmp_path, sentinel, capsys):
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    os.symlink(sentinel.root, out / "runs" / "baseline")  # runs/baseline/seed0/... would land outside
    code, _, err = run(["bench", "--task", "digits", "--methods", "baseline", "--epochs", "1", "--out", out,
                        "--quiet"], capsys)
    assert code == 2 and "is a symbolic link" in err and err.count("\n") == 1
    assert sentinel.unchanged() and not (sentinel.root / "seed0").exists()
