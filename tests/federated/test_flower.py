"""The one Flower integration test: 3 clients × 2 rounds simulated on Ray (~20-60 s) must give the
global accuracy the in-process run gives, and every reply the ServerApp received must hold only
weights, impressions and statistics."""

from __future__ import annotations

import pytest
import torch

from haet.federated import FedConfig, make_split, run_local
from haet.federated.client import UPDATE_FIELDS

pytest.importorskip("flwr", reason="needs the federated extra: pip install 'haet[federated]'")
pytest.importorskip("ray", reason="needs the federated extra: pip install 'haet[federated]'")

#: Both backends run the same code with one thread per client; only float summation order inside
#: Ray workers may differ, so the final accuracies may differ by at most 2 test samples of 360.
TOLERANCE = 2 / 360


def test_flower_simulation_matches_the_local_run(tmp_path):
    from haet.federated.flower import run_flower

    cfg = FedConfig(task="digits", clients=3, rounds=2, new_classes=1, seed=0, impressions_per_class=4,
                    impression_steps=10, server_epochs=1)
    received = []
    flower = run_flower(cfg, workdir=tmp_path / "fl", inspect=received.append)
    local = run_local(cfg)
    assert flower.backend == "flower" and len(flower.rounds) == 2
    assert abs(flower.final["accuracy"] - local.final["accuracy"]) <= TOLERANCE
    assert abs(flower.final["accuracy_new"] - local.final["accuracy_new"]) <= 0.05
    assert [r["bytes_up"] for r in flower.rounds] == [r["bytes_up"] for r in local.rounds]
    # What the ServerApp received: only the allowed fields, impressions that are no client's samples.
    raw = torch.cat([s.x for s in make_split(cfg.task, cfg.clients, cfg.new_classes, cfg.seed).shards]).flatten(1)
    assert len(received) == 6 and sum(len(u.impressions) for u in received) > 0
    for u in received:
        assert set(vars(u)) == set(UPDATE_FIELDS)
        if len(u.impressions):
            assert float(torch.cdist(u.impressions.flatten(1), raw).min()) > 0.5
