"""Zero-shot federated learning, in process: privacy of updates, equality with FedAvg, clustering,
HeteroFL aggregation, impressions, and the command line."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import haet
from haet.cli import main
from haet.data import TensorData
from haet.federated import FedConfig, make_split, run_local
from haet.federated import clustering, impressions, models
from haet.federated.client import UPDATE_FIELDS, ClientUpdate
from haet.federated.server import Server

@pytest.fixture(autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only contend on a shared machine
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def digit_models():
    """Three digits models trained on different random halves of the training set (seeds 1, 2, 3)."""
    torch.set_num_threads(1)
    task = haet.data.get_task("digits")
    train, _ = task.load(0, None)
    out = []
    for seed in (1, 2, 3):
        haet.seed_everything(seed)
        model = models.build(task.input_shape, 10)
        keep = torch.randperm(len(train))[:800]
        haet.Trainer(model, TensorData(train.x[keep], train.y[keep]), progress=False, seed=seed, device="cpu",
                     optimizer=lambda p: torch.optim.Adam(p, lr=3e-3)).fit(5)
        out.append(model.cpu().eval())
    return out


# Small enough to run in seconds: 3 clients on digits, few impressions.
TINY = FedConfig(task="digits", clients=3, rounds=2, new_classes=1, seed=0, impressions_per_class=4,
                 impression_steps=10, server_epochs=1)


def test_no_raw_client_sample_reaches_the_server():
    split = make_split(TINY.task, TINY.clients, TINY.new_classes, TINY.seed)
    raw = torch.cat([s.x for s in split.shards]).flatten(1)
    received: list[ClientUpdate] = []
    run_local(TINY, inspect=received.append)
    assert len(received) == TINY.clients * TINY.rounds
    assert sum(len(u.impressions) for u in received) > 0  # the zero-shot path really sent impressions
    shapes = {k: v.shape for k, v in models.build(split.input_shape, split.num_classes).state_dict().items()}
    for u in received:
        assert set(vars(u)) == set(UPDATE_FIELDS)
        assert {k: v.shape for k, v in u.weights.items()} == shapes  # weights: exactly the model's tensors
        assert all(isinstance(v, (int, float, str)) for v in u.stats.values())
        if len(u.impressions):
            # No impression is (close to) a training sample of any client: nearest raw sample is far away.
            nearest = torch.cdist(u.impressions.flatten(1), raw).min(dim=1).values
            assert float(nearest.min()) > 0.5, "an impression is a copy of a client's training sample"
        assert not any(torch.equal(t.flatten(), s) for t in u.weights.values() for s in raw[:50])


def test_server_refuses_an_update_that_carries_data():
    split = make_split(TINY.task, TINY.clients, TINY.new_classes, TINY.seed)
    server = Server(TINY, split.input_shape, split.num_classes, split.seen, [s.num_new for s in split.shards])
    weights, _ = server.plan(0)
    update = ClientUpdate(0, weights, 10, torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long),
                          torch.zeros(0, dtype=torch.long), torch.zeros(0, 10))
    update.samples = split.shards[0].x  # a leak
    with pytest.raises(ValueError, match="may not send"):
        server.receive([update], 1)


def test_zeroshot_equals_fedavg_with_iid_data_and_no_new_classes():
    cfg = dataclasses.replace(TINY, new_classes=0, iid=True)
    zs = run_local(dataclasses.replace(cfg, strategy="zeroshot"))
    fa = run_local(dataclasses.replace(cfg, strategy="fedavg"))
    assert zs.global_state.keys() == fa.global_state.keys()
    for k in zs.global_state:
        assert torch.equal(zs.global_state[k], fa.global_state[k]), k
    finite = [[{k: v for k, v in r.items() if v == v} for r in res.rounds] for res in (zs, fa)]  # no NaN
    assert finite[0] == finite[1] and finite[0][-1]["impressions"] == 0


def test_clustering_joins_one_new_class_across_clients_and_separates_two(digit_models):
    # Impressions of digit 3 from two clients and of digit 7 from one, each from its own trained model;
    # the server embeds them with a model of its own and must find two clusters: {3, 3} and {7}.
    task, trained = haet.data.get_task("digits"), digit_models
    groups, xs = [], []
    for client, cls in ((0, 3), (1, 3), (1, 7)):
        x, _ = impressions.synthesize(trained[client], [cls], 16, task.input_shape, steps=80, seed=client)
        xs.append(x)
        groups += [(client, cls)] * len(x)
    feats = clustering.embed(trained[2], torch.cat(xs)).numpy()
    cluster = clustering.cluster_points(feats, 2, seed=0)
    assigned = clustering.assign_groups(cluster, groups, 2)
    assert assigned[(0, 3)] == assigned[(1, 3)]
    assert assigned[(1, 7)] != assigned[(0, 3)]


def test_cluster_scoring_is_one_to_one():
    group_cluster = {(0, 0): 1, (1, 0): 1, (2, 0): 0}
    truth = {(0, 0): 5, (1, 0): 5, (2, 0): 9}
    assert clustering.match_truth(group_cluster, truth, (5, 9), 2) == {5: 1, 9: 0}
    merged = {(0, 0): 0, (1, 0): 0, (2, 0): 0}  # both classes in one cluster: one of them gets the other
    m = clustering.match_truth(merged, truth, (5, 9), 2)
    assert m[5] == 0 and m[9] == 1


def test_heterofl_equal_widths_is_fedavg_and_a_slice_computes_the_narrow_model():
    shape = (1, 28, 28)
    full = models.build(shape, 10)
    spatial = models.flatten_spatial(full, shape)
    a = {k: torch.randn_like(v) for k, v in full.state_dict().items()}
    b = {k: torch.randn_like(v) for k, v in full.state_dict().items()}
    avg = models.heterofl_average(a, [(a, 1.0), (b, 3.0)], spatial)
    for k in a:
        assert torch.allclose(avg[k], 0.25 * a[k] + 0.75 * b[k], atol=1e-6)
    half = models.build(shape, 10, 0.5)
    sliced = models.slice_state(a, {k: v.shape for k, v in half.state_dict().items()}, spatial)
    half.load_state_dict(sliced)
    zero = {k: torch.zeros_like(v) for k, v in a.items()}
    full.load_state_dict(models.heterofl_average(zero, [(sliced, 1.0)], spatial))  # narrow weights, rest zero
    x = torch.randn(4, *shape)
    assert torch.allclose(full(x), half(x), atol=1e-5)
    # Entries only the full-width client holds are its own; shared ones are averaged.
    mixed = models.heterofl_average(a, [(a, 1.0), (models.slice_state(b, {k: v.shape for k, v in
                                     half.state_dict().items()}, spatial), 1.0)], spatial)
    w = "0.weight"
    assert torch.allclose(mixed[w][:8], 0.5 * (a[w][:8] + b[w][:8]), atol=1e-6)
    assert torch.equal(mixed[w][8:], a[w][8:])


def test_impressions_carry_their_class_and_leave_the_model_unchanged(digit_models):
    task, model = haet.data.get_task("digits"), digit_models[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, owner = impressions.synthesize(model, [2, 5], 10, task.input_shape, steps=60, seed=0)
    assert x.shape == (20, 1, 8, 8) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    with torch.no_grad():
        p_imp = torch.softmax(model(x), 1).gather(1, owner[:, None]).mean()
        p_rand = torch.softmax(model(torch.rand_like(x)), 1).gather(1, owner[:, None]).mean()
    # Soft labels come from a Dirichlet centred on the class, so impressions are not all argmax-class,
    # but the model gives their class far more probability than it gives it on random inputs.
    assert p_imp > 0.3 and p_imp > 3 * p_rand
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    sim = impressions.class_similarity(model[-1].weight)
    assert torch.allclose(sim.diagonal(), torch.ones(10)) and float(sim.min()) >= 0.0


def test_shards_hide_new_classes_behind_private_names():
    split = make_split("digits", 6, 2, seed=0)
    holders = [k for k, s in enumerate(split.shards) if s.num_new]
    assert len(holders) == 4 and len(split.new) == 2
    for s in split.shards:
        known = set(s.labels.tolist())
        assert not known & set(split.new)  # a new class never appears under its true index
        assert {-(j + 1) for j in range(s.num_new)} <= known
    assert sum(len(s.labels) for s in split.shards) == 1437


@pytest.mark.parametrize("argv, word", [
    (["--task", "cifar10"], "cifar10"), (["--strategy", "fedprox"], "fedprox"), (["--backend", "grpc"], "grpc"),
    (["--clients", "1"], "clients"), (["--new-classes", "7"], "new_classes"), (["--rounds", "0"], "rounds"),
])
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, argv, word):
    out = tmp_path / "run"
    assert main(["federated", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and word in err
    assert not out.exists()


def test_cli_writes_a_record_with_the_federated_metrics(tmp_path, capsys):
    import importlib.metadata as md

    assert int(md.version("rich").split(".")[0]) < 15  # Flower's cap; the CLI's tables must work with it
    out = tmp_path / "run"
    assert main(["federated", "--task", "digits", "--clients", "3", "--rounds", "2", "--new-classes", "1",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "global test accuracy" in printed and "new-class accuracy" in printed
    rec = json.loads((out / "record.json").read_text())
    mm = rec["method_metrics"]
    assert 0.0 <= rec["metrics"]["accuracy"] <= 1.0
    for key in ("federated/accuracy_seen", "federated/accuracy_new"):
        assert 0.0 <= mm[key] <= 1.0
    assert len(mm["federated/bytes_up"]) == len(mm["federated/bytes_down"]) == 2 == mm["federated/rounds"]
    assert mm["federated/bytes_up"][0] > mm["federated/bytes_down"][0]  # impressions travel up on top of weights
    assert all(mm[f"federated/client{k}/energy_source"] in ("model", "rapl", "nvml") for k in range(3))
    assert rec["cost"]["energy_j"] > 0 and rec["cost"]["energy_source"]
    assert len((out / "rounds.jsonl").read_text().splitlines()) == 2
    assert (out / "accuracy.png").stat().st_size > 1000
    assert main(["federated", "--task", "digits", "--out", str(out)]) == 2  # no silent overwrite
    np.testing.assert_equal(len(rec["history"]), 2)
