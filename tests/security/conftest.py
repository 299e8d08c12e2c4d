"""Helpers for the attack tests: a sentinel tree outside the run's folder and a marker file.

Every test here reproduces an attack or fault with crafted files, then checks that the marker (a
file the attack would create by running code) never appears and that nothing outside the run's
folder changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from haet import cli

ROOT = Path(__file__).resolve().parents[2]


def run(argv, capsys):
    """haet.cli.main in-process: (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def haet_process(argv, **kwargs) -> subprocess.Popen:
    """`python -m haet ARGV` in a child process (for signals, crashes and hash seeds)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", **kwargs.pop("env", {})}
    return subprocess.Popen([sys.executable, "-m", "haet", *map(str, argv)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def tree_hash(root: Path) -> dict:
    """Every entry under `root` (links not followed): its kind and content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = "dir"
    return out


class Sentinel:
    """A tree outside the run's folder, with victim files an attack would like to change."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "site-packages").mkdir(parents=True)
        for i in range(3):
            (root / f"victim{i}.txt").write_text(f"precious {i}\n")
        self.marker = root / "MARKER"
        self.before = tree_hash(root)

    def victim(self, i: int) -> Path:
        return self.root / f"victim{i}.txt"

    def unchanged(self) -> bool:
        return tree_hash(self.root) == self.before and not self.marker.exists()


@pytest.fixture
def sentinel(tmp_path) -> Sentinel:
    return Sentinel(tmp_path / "outside")


def record_dict(**fields) -> dict:
    """A valid schema-1 record, with `fields` replaced."""
    d = {"schema": 1, "haet_version": "0.1.0", "task": "digits", "model": "mlp", "methods": [], "label": "baseline",
         "seed": 0, "device": "cpu", "hardware": {"cpu": "Some CPU (R) @ 2.2GHz"}, "epochs": 1, "steps": 23,
         "stopped_by": "epochs", "metrics": {"accuracy": 0.9, "loss": 0.3},
         "history": [{"epoch": 1, "train_loss": 0.5, "accuracy": 0.9}],
         "cost": {"train_s": 0.2, "wall_s": 0.3, "peak_mem_mb": 10.0, "flops": 1e6, "energy_j": 0.01,
                  "energy_source": "model"}, "method_metrics": {}, "budget": {}, "error": None}
    d.update(fields)
    return d


def write_record(directory: Path, **fields) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "record.json").write_text(json.dumps(record_dict(**fields)))
    return directory / "record.json"
