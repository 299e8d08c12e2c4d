"""The command line for a PyTorch user: training options, haet eval, haet methods NAME, bench
sections and skipped methods, a progress bar that reads at 80 columns and in logs."""

from __future__ import annotations

import io
import json
import re

import pytest
from rich.console import Console

import haet
from haet.bench import RunConfig, unfit_reason
from haet.cli import _last_eval_step, build_parser, main
from haet.core.progress import TrainProgress
from haet.core.record import RunRecord


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for name in ("tasks", "methods", "train", "bench", "report", "eval"):
        assert name in text


def test_methods_name_prints_parameters_types_defaults_ranges(capsys):
    assert main(["methods", "gradmatch"]) == 0
    text = capsys.readouterr().out
    assert "fraction" in text and "float" in text and "0.3" in text and "(0, 1)" in text
    assert "share of the training samples" in text
    assert "integer [1, inf)" in text  # select_every's check_range
    assert main(["methods", "nope"]) == 2


@pytest.mark.parametrize("args,match", [
    (["--optimizer", "rmsprop"], "unknown optimizer 'rmsprop'; choose one of: sgd, adam, adamw"),
    (["--optimizer", "sgd:lr=0"], r"lr must be a number in \(0, inf\]"),
    (["--schedule", "cosine:warmup=3"], "unknown parameter 'warmup' for schedule cosine"),
    (["--precision", "fp8"], "invalid choice: 'fp8'"),
    (["--accumulate", "0"], "accumulate must be an integer"),
    (["--until", "accuracy"], "bad target 'accuracy'"),
    (["--eval-every", "0"], "eval_every must be an integer"),
    (["--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA GPU"),
    (["--log", "wandb"], "invalid choice: 'wandb'"),
])
def test_bad_training_options_exit_2_and_write_nothing(tmp_path, capsys, args, match):
    out = tmp_path / "run"
    assert main(["train", "--task", "digits", "--out", str(out), *args]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not out.exists()


def test_train_with_training_options_and_saved_model(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--task", "digits", "--epochs", "1", "--budget", "steps=6", "--out", str(out), "--quiet",
                 "--precision", "bf16", "--optimizer", "sgd:lr=0.05,momentum=0.9", "--schedule", "cosine",
                 "--accumulate", "2", "--clip-grad", "5", "--until", "accuracy=0.0", "--eval-every", "3",
                 "--save-model", "--threads", "1"])
    assert code == 0
    record = RunRecord.load(out)
    assert record.stopped_by == "target" and record.steps == 3
    assert set(record.cost["flops_by_dtype"]) == {"bfloat16"} and record.cost["threads"] == 1
    config = json.loads((out / "config.json").read_text())
    assert config["optimizer"] == "sgd:lr=0.05,momentum=0.9" and config["accumulate"] == 2
    assert haet.load_model(out) is not None


def test_bench_refuses_an_out_holding_another_task(tmp_path, capsys):
    RunRecord(task="digits", model="mlp", label="baseline", metrics={"accuracy": 0.5}).save(
        tmp_path / "runs" / "baseline" / "seed0")
    code = main(["bench", "--task", "mnist1d", "--methods", "baseline", "--out", str(tmp_path), "--epochs", "1"])
    assert code == 2
    assert "holds runs of digits / mlp; pass --add" in capsys.readouterr().err
    code = main(["bench", "--task", "digits", "--methods", "baseline", "--out", str(tmp_path), "--add"])
    assert code == 2
    assert "already holds baseline runs of digits / mlp" in capsys.readouterr().err


def test_methods_that_cannot_take_the_model_are_named_with_the_reason():
    cfg = RunConfig(task="digits", model="resnet8", methods="gradmax", epochs=1)
    reason = unfit_reason(cfg)
    assert reason is not None and "gradmax" in reason and "growable" in reason
    assert unfit_reason(RunConfig(task="digits", model="resnet8", methods="qat", epochs=1)) is None
    assert unfit_reason(RunConfig(task="digits", model="mlp", methods="baseline", epochs=1)) is None


def test_cifar_tarball_says_to_extract_it(tmp_path, capsys):
    tarball = tmp_path / "cifar-10-python.tar.gz"
    tarball.write_bytes(b"\x1f\x8b")
    assert main(["train", "--task", "cifar10", "--data-dir", str(tarball), "--out", str(tmp_path / "o")]) == 2
    assert "is the downloaded archive, not a directory: extract it first (tar xzf" in capsys.readouterr().err


def test_summary_after_an_interrupt_names_the_step_of_the_last_evaluation():
    record = RunRecord(steps=57, stopped_by="interrupt", history=[
        {"epoch": 1, "step": 20, "train_loss": 1.0, "train_s": 1.0, "accuracy": 0.5, "loss": 1.2},
        {"epoch": 2, "step": 40, "train_loss": 0.8, "train_s": 2.0, "accuracy": 0.6, "loss": 1.0}],
        metrics={"accuracy": 0.6, "loss": 1.0})
    assert _last_eval_step(record) == "40 (last evaluation; stopped at 57)"


# -- progress -------------------------------------------------------------------------------------
def _run_bar(console, trainer_factory):
    trainer = trainer_factory(batch_size=64, budget=haet.Budget(steps=100, time_s=500))
    state = trainer.state
    state.epochs = 2
    bar = TrainProgress(state, trainer.budget, console=console)
    with bar:
        for epoch in (1, 2):
            state.epoch = epoch
            state.train_loader = list(range(4))
            for _ in range(4):
                state.step += 1
                bar.advance(0.123456)
            state.eval_metrics = {"accuracy": 0.5 + epoch / 10}
    return console.file.getvalue()


def test_progress_fits_80_columns(trainer_factory):
    raw = _run_bar(Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None), trainer_factory)
    lines = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw).replace("\r", "\n").splitlines()  # cursor control
    final = [line for line in lines if "epoch 2/2" in line][-1]
    assert "loss 0.1235" in final and "acc 0.700" in final and "4/4" in final and "92 steps" in final
    assert all(len(line) <= 80 for line in lines)


def test_progress_when_piped_prints_plain_lines(trainer_factory):
    text = _run_bar(Console(file=io.StringIO(), width=80), trainer_factory)
    lines = text.strip().splitlines()
    assert len(lines) == 2 and "\x1b" not in text
    assert lines[0].startswith("epoch 1/2  step 4  loss 0.1235  acc 0.600")
    assert "left" in lines[1] and "92 steps" in lines[1]


def test_bench_reports_time_to_target_and_not_reached_honestly(tmp_path):
    from haet.bench import run_bench

    result = run_bench("digits", ["baseline"], 1, 1, tmp_path / "a", budget={"steps": 4}, warmup_steps=0,
                       options={"until": "loss<=0.0", "threads": 1})
    assert result["summaries"][0].targets == "not reached (0/1)"
    assert "| time to target |" in result["report"].read_text()
    result = run_bench("digits", ["baseline"], 1, 1, tmp_path / "b", budget={"steps": 4}, warmup_steps=0,
                       options={"until": "accuracy=0.0", "eval_every": 2, "threads": 1})
    record = result["records"][0]
    assert record.stopped_by == "target" and record.steps == 2
    assert result["summaries"][0].targets == f"{record.cost['time_to_target_s']:.2f} s (1/1)"


def test_methods_all_keeps_those_that_fit_and_names_the_others():
    import argparse

    from haet import cli
    from haet.methods import split_entries

    args = argparse.Namespace(methods="all", task="digits", model="resnet8", epochs=1, device="cpu", data_dir=None,
                              batch_size=64, quiet=True)
    kept, skipped = cli._drop_unfit(args, split_entries("all"), {}, {"threads": 1})
    assert kept[0] == "baseline" and "qat" in kept
    # digits on resnet8: 8×8 inputs too small to downsample, no growable pair, no Linear to convert,
    # not an energy-based network
    assert sorted(dict(skipped)) == ["downsample", "eqprop", "gradmax", "tensor_train"]
    assert "growable" in dict(skipped)["gradmax"] and "change nothing" in dict(skipped)["tensor_train"]
    assert set(kept) | set(dict(skipped)) == set(split_entries("all"))


def test_a_method_refusing_at_fit_start_leaves_nothing_written(tmp_path, capsys):
    out = tmp_path / "ds"
    # downsample needs inputs of at least 16×16; digits are 8×8: refused when training starts
    code = main(["train", "--task", "digits", "--model", "mnist5k-cnn", "--method", "downsample", "--epochs", "1",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "downsample" in err and err.count("haet: error") == 1
    assert not out.exists()


def test_train_takes_a_recipe_and_explicit_flags_win(tmp_path, capsys):
    import json

    out = tmp_path / "r"
    assert main(["train", "--task", "digits", "--recipe", "fast", "--epochs", "1", "--batch-size", "128",
                 "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "fast-cnn" and config["methods"].startswith("label_smoothing")
    assert config["optimizer"].startswith("sgd:") and config["schedule"].startswith("onecycle:")
    assert config["epochs"] == 1 and config["batch_size"] == 128           # given on the command line
    record = json.loads((out / "record.json").read_text())
    assert record["model"] == "fast-cnn" and record["methods"][0]["name"] == "label_smoothing"
    assert main(["train", "--task", "digits", "--recipe", "slow", "--out", str(tmp_path / "x")]) == 2
    assert "unknown recipe 'slow'" in capsys.readouterr().err and not (tmp_path / "x").exists()
