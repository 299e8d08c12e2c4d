"""Issue items 3, 4, 5 and 10: --resume into a prepared folder, inputs checked up front (exit 2,
one line, nothing written), a full disk, and flags that conflict with the resumed run."""

from __future__ import annotations

import errno
import hashlib
import json
import os

import pytest
import torch

from .conftest import run

TRAIN = ["train", "--task", "digits", "--quiet"]


@pytest.fixture
def checkpointed(tmp_path, capsys):
    """A digits run with one epoch and a checkpoint: the folder a resume continues."""
    d = tmp_path / "run"
    assert run(TRAIN + ["--epochs", "1", "--checkpoint", "--out", d], capsys)[0] == 0
    return d


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- item 3: --resume never writes through a symlink -------------------------------------------
def test_resume_ignores_planted_temporary_links(checkpointed, sentinel, capsys):
    """record.json.tmp and checkpoint.pt.tmp planted as links to victims: their targets were
    overwritten by the resumed run."""
    os.symlink(sentinel.victim(0), checkpointed / "record.json.tmp")
    os.symlink(sentinel.victim(1), checkpointed / "checkpoint.pt.tmp")
    code, _, err = run(["train", "--resume", checkpointed, "--epochs", "2", "--quiet"], capsys)
    assert code == 0, err
    assert json.loads((checkpointed / "record.json").read_text())["epochs"] == 2
    assert sentinel.unchanged()


@pytest.mark.parametrize("name", ["metrics.jsonl", "record.json", "checkpoint.pt", "config.json"])
def test_resume_refuses_a_folder_whose_files_are_links(name, checkpointed, sentinel, capsys):
    victim = sentinel.victim(2)
    real = checkpointed / name
    victim.write_bytes(real.read_bytes())  # the link leads to a copy, so only the link is wrong
    sentinel.before = __import__("tests.security.conftest", fromlist=["tree_hash"]).tree_hash(sentinel.root)
    real.unlink()
    os.symlink(victim, real)
    code, _, err = run(["train", "--resume", checkpointed, "--epochs", "2", "--quiet"], capsys)
    assert code == 2 and "symbolic link" in err and err.count("\n") == 1
    assert sentinel.unchanged()


# -- item 4: inputs checked up front; "record written" only when it was ------------------------
def test_out_that_is_a_file_is_bad_input(tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("mine\n")
    code, _, err = run(TRAIN + ["--epochs", "1", "--out", out], capsys)
    assert code == 2 and "is a file" in err and "record written" not in err and err.count("\n") == 1
    assert out.read_text() == "mine\n"


@pytest.mark.parametrize("table,match", [
    ("dram_pj_per_byte = nan\n", "dram_pj_per_byte must be a finite positive number"),
    ("dram_pj_per_byte = -5.0\n", "dram_pj_per_byte must be a finite positive number"),
    ("[op_energy_pj]\nfloat32 = [nan, 0.9]\n", "op_energy_pj.float32"),
    ("[peak_flops.H100]\nfloat32 = -1.0\n", "peak_flops.H100.float32"),
    ("[op_energy_pj]\nfloat32 = 3.7\n", "must be \\[multiply pJ, add pJ\\]"),
    ("this is = not toml [", "is not valid TOML"),
    ("colour = 1\n", "unknown hardware table keys"),
])
def test_bad_hardware_table_is_bad_input(table, match, tmp_path, capsys, monkeypatch):
    """Item 11 too: a NaN or negative entry silently disabled the energy budget."""
    path = tmp_path / "hw.toml"
    path.write_text(table)
    monkeypatch.setenv("HAET_HARDWARE", str(path))
    code, _, err = run(TRAIN + ["--epochs", "1", "--budget", "energy=1J", "--out", tmp_path / "o"], capsys)
    assert code == 2 and err.count("\n") == 1 and "record written" not in err, err
    assert __import__("re").search(match, err) and "hw.toml" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change,match", [
    (lambda p: p.update(epoch="1"), "'epoch' must be int"),
    (lambda p: p.update(epoch=-1), "'epoch' is negative"),
    (lambda p: p.update(history="x"), "'history' must be list"),
    (lambda p: p.pop("rng"), "'rng' is missing"),
    (lambda p: p["rng"].update(torch=[1, 2]), "'rng' does not hold"),
    (lambda p: p["model"].update({"extra.weight": torch.zeros(1)}), "does not fit this run"),
    (lambda p: p.update(model={k.replace("weight", "w"): v for k, v in p["model"].items()}), "does not fit this run"),
])
def test_checkpoint_contents_are_validated(change, match, checkpointed, capsys):
    path = checkpointed / "checkpoint.pt"
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)
    code, _, err = run(["train", "--resume", checkpointed, "--epochs", "2", "--quiet"], capsys)
    assert code == 2 and match in err and err.count("\n") == 1 and "record written" not in err, err


def _full_disk(monkeypatch, also_record: bool):
    """Writes fail with ENOSPC after putting part of their bytes on disk, as a full disk does."""
    import haet.core.record

    def save(obj, f, *args, **kwargs):
        data = b"partial checkpoint bytes"
        if hasattr(f, "write"):
            f.write(data)
        else:
            open(f, "wb").write(data)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save)
    if also_record:
        def record_save(self, directory):
            (directory / "record.json.tmp").write_text("{")
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(haet.core.record.RunRecord, "save", record_save)


@pytest.mark.parametrize("also_record", [False, True])
def test_full_disk_keeps_the_last_good_checkpoint(also_record, checkpointed, capsys, monkeypatch):
    good = _digest(checkpointed / "checkpoint.pt")
    record_before = (checkpointed / "record.json").read_text()
    _full_disk(monkeypatch, also_record)
    code, _, err = run(["train", "--resume", checkpointed, "--epochs", "2", "--quiet"], capsys)
    err = "".join(line for line in err.splitlines(keepends=True) if not line.startswith("haet: warning:"))
    assert code == 1 and err.count("\n") == 1 and "no space left on device" in err.lower(), err
    assert _digest(checkpointed / "checkpoint.pt") == good
    leftovers = [p.name for p in checkpointed.iterdir() if p.name.endswith(".tmp") and not also_record]
    assert leftovers == []
    if also_record:
        assert "record written" not in err and (checkpointed / "record.json").read_text() == record_before
    else:
        assert "record written" in err
        assert json.loads((checkpointed / "record.json").read_text())["stopped_by"] == "error"


# -- item 5: no traceback for broken files -----------------------------------------------------
def test_checkpoint_that_is_a_text_file_or_has_flipped_bits(checkpointed, capsys):
    path = checkpointed / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
    for content in (bytes(data), b"just some text\n", data[:100]):
        path.write_bytes(content)
        code, _, err = run(["train", "--resume", checkpointed, "--epochs", "2", "--quiet"], capsys)
        assert code == 2 and "checkpoint.pt" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("config", [
    {"budget": [1]}, {"methods": 5}, {"seed": "0"}, {"epochs": 2.5}, {"task": None}, {"budget": {"steps": "x"}},
    [1, 2], "text",
])
def test_resume_config_with_wrong_types(config, checkpointed, capsys):
    saved = json.loads((checkpointed / "config.json").read_text())
    (checkpointed / "config.json").write_text(json.dumps({**saved, **config} if isinstance(config, dict) else config))
    code, _, err = run(["train", "--resume", checkpointed, "--epochs", "2", "--quiet"], capsys)
    assert code == 2 and "config.json" in err and err.count("\n") == 1, err


# -- item 10: --resume and the flags of the resumed run ----------------------------------------
def test_resume_applies_a_new_budget(checkpointed, capsys):
    code, _, err = run(["train", "--resume", checkpointed, "--epochs", "5", "--budget", "steps=30", "--quiet"], capsys)
    record = json.loads((checkpointed / "record.json").read_text())
    assert code == 0, err
    assert record["budget"]["steps"] == 30 and record["stopped_by"] == "budget:steps" and record["steps"] == 30


@pytest.mark.parametrize("flags,match", [
    (["--epochs", "0"], "holds 1 trained epochs"),
    (["--out", "elsewhere"], "--out elsewhere is another folder"),
    (["--batch-size", "32"], "has batch size 64, not 32"),
])
def test_resume_refuses_conflicting_flags(flags, match, checkpointed, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    before = _digest(checkpointed / "checkpoint.pt")
    code, _, err = run(["train", "--resume", checkpointed, *flags, "--quiet"], capsys)
    assert code == 2 and match in err and err.count("\n") == 1, err
    assert _digest(checkpointed / "checkpoint.pt") == before and not (tmp_path / "elsewhere").exists()


def test_resume_refuses_epochs_below_what_was_trained(tmp_path, capsys):
    d = tmp_path / "run"
    assert run(TRAIN + ["--epochs", "2", "--checkpoint", "--out", d], capsys)[0] == 0
    before = (d / "record.json").read_text()
    code, _, err = run(["train", "--resume", d, "--epochs", "1", "--quiet"], capsys)
    assert code == 2 and "already holds 2 trained epochs; --epochs 1 is fewer" in err
    assert (d / "record.json").read_text() == before


def test_resuming_mbst_to_another_total_says_so_in_the_record(tmp_path, capsys):
    d = tmp_path / "run"
    assert run(TRAIN + ["--method", "mbst:memory_fraction=0.5", "--epochs", "1", "--checkpoint", "--budget", "steps=5", "--out", d],
               capsys)[0] == 0
    assert run(["train", "--resume", d, "--epochs", "2", "--budget", "steps=8", "--quiet"], capsys)[0] == 0
    mm = json.loads((d / "record.json").read_text())["method_metrics"]
    assert mm["resume/from_epoch"] == 1 and mm["resume/planned_epochs"] == 1 and mm["resume/epochs"] == 2
    assert "not identical to an uninterrupted one" in mm["mbst/resume_note"]
    assert json.loads((d / "config.json").read_text())["epochs"] == 2


def test_resuming_gradmax_to_another_total_is_identical(tmp_path, capsys):
    """gradmax schedules growth in optimizer steps: 1 epoch resumed to 2 equals 2 straight."""
    method = ["--method", "gradmax:grow_every=5,grow_until=40"]
    assert run(TRAIN + method + ["--epochs", "2", "--out", tmp_path / "a"], capsys)[0] == 0
    assert run(TRAIN + method + ["--epochs", "1", "--checkpoint", "--out", tmp_path / "b"], capsys)[0] == 0
    assert run(["train", "--resume", tmp_path / "b", "--epochs", "2", "--quiet"], capsys)[0] == 0
    a, b = (json.loads((tmp_path / n / "record.json").read_text()) for n in "ab")
    assert a["metrics"] == b["metrics"] and a["steps"] == b["steps"] == 46
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    assert "gradmax/resume_note" not in b["method_metrics"]
