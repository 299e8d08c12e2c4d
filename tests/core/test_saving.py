"""Saved models (safetensors + model.json) reload with the same predictions, methods included;
loggers write what TensorBoard and MLflow read back."""

from __future__ import annotations

import json

import pytest
import torch

import haet
from haet import Budget, ConfigError
from haet.data.tasks import get_task
from haet.methods import parse_entry
from haet.models import build_model

#: Each method that changes the model, on a model it can change (digits: 1×8×8 images).
TRANSFORMING = [("baseline", "mlp"), ("qat", "mlp"), ("binary_connect", "mlp"), ("mbst:memory_fraction=0.5", "mlp"),
                ("tensor_train:min_params=1000", "mlp"), ("gradmax", "mlp"), ("downsample:factor=2", "mnist5k-cnn@16"),
                ("gsp:mode=oneshot,start_epoch=1", "mlp")]


@pytest.fixture(scope="module")
def digits():
    return get_task("digits").load(0, None)


@pytest.mark.parametrize("entry,model_name", TRANSFORMING, ids=[e.split(":")[0] for e, _ in TRANSFORMING])
def test_reloaded_model_predicts_the_same(tmp_path, digits, entry, model_name):
    train, test = digits
    if model_name.endswith("@16"):  # downsample needs inputs of at least 16×16: digits upsampled
        model_name = model_name[:-3]
        train, test = (haet.TensorData(torch.nn.functional.interpolate(d.x, size=16), d.y) for d in (train, test))
    haet.seed_everything(0)
    model = build_model(model_name, tuple(train.x.shape[1:]), 10)
    trainer = haet.Trainer(model, train, test, methods=parse_entry(entry), progress=False, batch_size=64,
                           budget=Budget(steps=12), out_dir=tmp_path, save_model=True, task="digits",
                           model_name=model_name, label=entry)
    trainer.fit(epochs=2)
    trained = trainer.state.model.eval()
    with torch.no_grad():
        expected = trained(test.x)
    reloaded = haet.load_model(tmp_path)
    with torch.no_grad():
        got = reloaded(test.x)
    assert [type(m) for m in reloaded.modules()] == [type(m) for m in trained.modules()]  # the methods' layers
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the same model: bit-identical outputs
    assert (tmp_path / "model.safetensors").is_file()
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["task"] == "digits" and [m["name"] for m in meta["methods"]] == [
        m.name for m in parse_entry(entry)]


def _saved_baseline(tmp_path, digits):
    train, test = digits
    haet.Trainer(build_model("mlp", (1, 8, 8), 10), train, test, progress=False, budget=Budget(steps=2),
                 out_dir=tmp_path, save_model=True, task="digits", model_name="mlp").fit(epochs=1)
    return tmp_path


def test_model_json_is_validated(tmp_path, digits):
    d = _saved_baseline(tmp_path, digits)
    meta = json.loads((d / "model.json").read_text())
    for bad, match in ((dict(meta, methods=[{"name": "qat", "params": {"bits": {"x": object.__name__}},
                                              "state": {}}]), "parameters of 'qat' must be"),
                       (dict(meta, input_shape=[-1]), "input_shape"),
                       (dict(meta, format="pickle"), "format"),
                       (dict(meta, methods=[{"name": "nope", "params": {}, "state": {}}]), "unknown method 'nope'")):
        (d / "model.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=match):
            haet.load_model(d)


def test_weights_that_do_not_fit_are_refused(tmp_path, digits):
    d = _saved_baseline(tmp_path, digits)
    meta = json.loads((d / "model.json").read_text())
    (d / "model.json").write_text(json.dumps(dict(meta, methods=[{"name": "qat", "params": {}, "state": {}}])))
    with pytest.raises(ConfigError, match="does not fit the rebuilt model"):
        haet.load_model(d)  # strict: the quantized model has tensors the plain weights lack


def test_haet_eval_reads_a_saved_model(tmp_path, digits, capsys):
    from haet.cli import main

    d = _saved_baseline(tmp_path, digits)
    model = haet.load_model(d)
    expected = haet.evaluate(model, digits[1], torch.nn.functional.cross_entropy, torch.device("cpu"))
    assert main(["eval", str(d)]) == 0
    assert f"{expected['accuracy']:.4f}" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "nothing")]) == 2


# -- loggers ---------------------------------------------------------------------------------------
def test_tensorboard_and_mlflow_get_every_evaluation(tmp_path, trainer_factory):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    loggers = [haet.TensorBoardLogger(tmp_path / "tb"), haet.MLflowLogger(tmp_path / "mlflow.db", run_name="r")]
    record = trainer_factory(loggers=loggers, batch_size=64).fit(epochs=2)
    acc = [h["accuracy"] for h in record.history]

    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    scalars = events.Scalars("accuracy")
    assert [(e.step, pytest.approx(e.value, abs=1e-6)) for e in scalars] == [(4, acc[0]), (8, acc[1])]
    assert events.Scalars("cost/flops")[0].value == pytest.approx(record.cost["flops"], rel=1e-6)

    client = MlflowClient(tracking_uri=loggers[1].tracking_uri)
    run = client.get_run(loggers[1].run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "accuracy")
    assert [(m.step, pytest.approx(m.value)) for m in history] == [(4, acc[0]), (8, acc[1])]
    assert run.data.metrics["final/accuracy"] == pytest.approx(record.metrics["accuracy"])


def test_a_user_logger_and_missing_extra_message(trainer_factory, monkeypatch):
    class Collect(haet.Logger):
        def __init__(self):
            self.lines, self.closed = [], False

        def log_metrics(self, step, metrics):
            self.lines.append((step, dict(metrics)))

        def close(self):
            self.closed = True

    mine = Collect()
    trainer_factory(loggers=[mine], batch_size=128).fit(epochs=1)
    assert mine.closed and mine.lines[0][0] == 2 and "accuracy" in mine.lines[0][1]

    import sys

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the log extra were not installed
    with pytest.raises(ConfigError, match=r"needs the log extra: pip install 'haet\[log\]'"):
        haet.MLflowLogger("x.db")
