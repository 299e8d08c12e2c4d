"""Data parallel through torchrun on gloo: both ranks end with identical weights; rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def test_two_processes_on_gloo_end_with_identical_weights(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2 and r0["cost_world"] == 2
    # 256 samples, 2 equal shards of 128, batches of 32: 4 steps per epoch on each rank.
    assert r0["steps"] == r1["steps"] == 8
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    record = json.loads((tmp_path / "run" / "record.json").read_text())  # written once, by rank 0
    assert record["steps"] == 8 and record["cost"]["world_size"] == 2
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
