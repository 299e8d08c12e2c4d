"""Few labels: prototypes are the class means, pseudo-labels only above the threshold, FixMatch
trains under the Trainer, bad input exits 2."""

import pytest
import torch

from haet.cli import main
from haet.incremental.fewshot import (FixMatchConfig, FixMatchLoss, FixMatchModel, fixmatch_data, nearest_prototype,
                                      pick_labelled, prototypes, pseudo_labels)


def test_prototypes_are_class_means_and_classify_by_nearest():
    emb = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0], [12.0, 10.0], [11.0, 13.0]])
    y = torch.tensor([0, 0, 1, 1, 1])
    protos = prototypes(emb, y, 3)
    assert torch.equal(protos[0], torch.tensor([1.0, 0.0]))
    assert torch.allclose(protos[1], torch.tensor([11.0, 11.0]))
    assert torch.isinf(protos[2]).all()  # a class with no example is never the nearest
    assert nearest_prototype(torch.tensor([[0.5, 0.5], [9.0, 9.0]]), protos).tolist() == [0, 1]


def test_pick_labelled_takes_k_per_class():
    y = torch.arange(100) % 10
    idx = pick_labelled(y, 3, seed=0)
    assert len(idx) == 30 and torch.bincount(y[idx]).tolist() == [3] * 10


def test_pseudo_labels_only_above_threshold():
    logits = torch.tensor([[5.0, 0.0], [0.3, 0.0], [0.0, 4.0], [0.0, 0.0]])
    labels, mask = pseudo_labels(logits, 0.9)
    conf = torch.softmax(logits, 1).max(1).values
    assert torch.equal(mask, conf >= 0.9) and mask.tolist() == [True, False, True, False]
    assert labels[mask].tolist() == [0, 1]


def test_fixmatch_loss_ignores_unconfident_unlabelled():
    loss = FixMatchLoss(FixMatchConfig(threshold=0.99))
    weak = torch.tensor([[0.1, 0.0], [0.2, 0.0]])  # unconfident
    strong = torch.randn(2, 2, requires_grad=True)
    value = loss((weak, strong), torch.tensor([-1, -1]))
    value.backward()
    assert float(value) == 0.0 and torch.all(strong.grad == 0) and loss.pseudo_labelled == 0
    loss2 = FixMatchLoss(FixMatchConfig(threshold=0.6))  # confidences 0.9999 and 0.55
    strong2 = torch.randn(2, 2, requires_grad=True)
    loss2((torch.tensor([[9.0, 0.0], [0.2, 0.0]]), strong2), torch.tensor([-1, -1])).backward()
    assert strong2.grad[0].abs().sum() > 0 and torch.all(strong2.grad[1] == 0)


def test_fixmatch_data_keeps_labelled_share():
    x, y = torch.randn(80, 1, 4, 4), torch.arange(80) % 4
    xs, ys = fixmatch_data(x, y, torch.tensor([0, 1, 2, 3]), ratio=2)
    assert int((ys == -1).sum()) == 76 and int((ys >= 0).sum()) == 4 * 10  # 76 / (2 * 4) ≈ 10 repeats


def test_fixmatch_trains_in_the_trainer(tiny_data):
    from haet.core.trainer import Trainer
    from haet.data.loader import TensorData

    net = FixMatchModel(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4)))
    x, y = fixmatch_data(tiny_data.x, tiny_data.y, pick_labelled(tiny_data.y, 5, 0), ratio=3)
    loss = FixMatchLoss(FixMatchConfig(threshold=0.6))
    rec = Trainer(net, TensorData(x, y), tiny_data, loss_fn=loss, progress=False, device="cpu").fit(2)
    assert rec.steps > 0 and rec.cost["flops"] > 0 and loss.unlabelled_seen > 0
    assert 0 <= rec.metrics["accuracy"] <= 1


@pytest.mark.parametrize("argv, word", [
    (["--method", "knn"], "knn"),
    (["--labels-per-class", "0"], "labels-per-class"),
    (["--method", "fixmatch", "--threshold", "2"], "threshold"),
    (["--budget", "time=fast"], "time"),
])
def test_bad_input_exits_2(tmp_path, capsys, argv, word):
    out = tmp_path / "run"
    assert main(["fewshot", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word in err[0]
    assert not out.exists()


def test_prototype_cli_writes_a_record(tmp_path):
    from haet.core.record import RunRecord

    assert main(["fewshot", "--task", "digits", "--labels-per-class", "5", "--method", "prototype",
                 "--out", str(tmp_path), "--quiet"]) == 0
    rec = RunRecord.load(tmp_path)
    assert rec.method_metrics["fewshot/labelled"] == 50 and rec.method_metrics["fewshot/energy_source"] == "model"
    assert rec.metrics["accuracy"] > 0.3  # well above chance (0.1) with 5 labels per class
