"""Mixed precision, optimizers and schedules by name, accumulation, clipping, targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import haet
from haet import Budget, ConfigError, Method, TrainOptions
from haet.core.optim import make_optimizer, make_schedule
from haet.core.options import Target

from ..conftest import tiny_cnn


# -- precision ------------------------------------------------------------------------------------
class Dtypes(Method):
    name = "dtypes"

    def after_forward(self, state):
        self.outputs = state.outputs.dtype
        self.weights = {p.dtype for p in state.model.parameters()}


def test_bf16_runs_forward_in_bfloat16_keeps_fp32_weights_and_labels_flops(trainer_factory):
    probe = Dtypes()
    record = trainer_factory(methods=[probe], precision="bf16", budget=Budget(steps=3)).fit(epochs=1)
    assert probe.outputs == torch.bfloat16 and probe.weights == {torch.float32}
    assert set(record.cost["flops_by_dtype"]) == {"bfloat16"} and record.cost["flops"] > 0
    fp32 = trainer_factory(budget=Budget(steps=3)).fit(epochs=1)
    assert set(fp32.cost["flops_by_dtype"]) == {"float32"}
    assert record.cost["flops"] == fp32.cost["flops"]  # same work, another number format
    # the energy model prices bfloat16 below float32
    assert record.cost["energy_model_split_j"]["compute"] < fp32.cost["energy_model_split_j"]["compute"]


def test_fp16_on_cpu_is_refused(trainer_factory):
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        trainer_factory(precision="fp16", device="cpu")
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16, fp16"):
        trainer_factory(precision="int3")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with a gradient scaler needs a CUDA GPU")
def test_fp16_on_cuda_uses_a_scaler(trainer_factory):
    record = trainer_factory(precision="fp16", device="cuda", budget=Budget(steps=3)).fit(epochs=1)
    assert set(record.cost["flops_by_dtype"]) == {"float16"}


# -- accumulation and clipping ---------------------------------------------------------------------
def _sgd(params):
    return torch.optim.SGD(params, lr=0.5)


def test_accumulating_two_half_batches_equals_one_full_batch(trainer_factory):
    full = trainer_factory(optimizer=_sgd, batch_size=64, budget=Budget(steps=2))
    full_record = full.fit(epochs=1)
    acc = trainer_factory(optimizer=_sgd, batch_size=32, options=TrainOptions(accumulate=2), budget=Budget(steps=2))
    acc_record = acc.fit(epochs=1)
    for a, b in zip(full.state.model.parameters(), acc.state.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert acc_record.steps == full_record.steps == 2  # optimizer steps, not micro-batches
    assert acc.state.samples_seen == full.state.samples_seen == 128


def test_flops_count_every_micro_batch(trainer_factory):
    one = trainer_factory(batch_size=32).fit(epochs=1)
    two = trainer_factory(batch_size=32, options=TrainOptions(accumulate=2)).fit(epochs=1)
    assert two.steps == one.steps // 2 == 4
    assert two.cost["flops"] == one.cost["flops"] > 0  # same samples, same work


def test_accumulation_refused_with_a_method_that_owns_the_update(trainer_factory):
    from haet.methods import parse_method

    with pytest.raises(ConfigError, match="accumulate cannot run with fusion: fusion owns 'optimizer_step'"):
        trainer_factory(methods=[parse_method("fusion")], options=TrainOptions(accumulate=2))


def test_clip_grad_bounds_the_update(trainer_factory):
    def moved(options):
        trainer = trainer_factory(optimizer=lambda p: torch.optim.SGD(p, lr=1.0), budget=Budget(steps=1),
                                  options=options)
        before = [p.detach().clone() for p in trainer.state.model.parameters()]
        trainer.fit(epochs=1)
        with torch.no_grad():
            return float(torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(trainer.state.model.parameters(), before))))

    assert moved(TrainOptions(clip_grad=1e-3)) == pytest.approx(1e-3, rel=1e-3)  # lr 1: the step is the gradient
    assert moved(TrainOptions()) > 1e-2


def test_options_are_validated():
    with pytest.raises(ConfigError, match=r"accumulate must be an integer in \[1, inf\]"):
        TrainOptions(accumulate=0)
    with pytest.raises(ConfigError, match="clip_grad"):
        TrainOptions(clip_grad=-1.0)


# -- optimizers and schedules by name --------------------------------------------------------------
def test_optimizer_specs_build_and_validate():
    opt = make_optimizer("sgd:lr=0.1,momentum=0.9,nesterov=true")(nn.Linear(2, 2).parameters())
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    assert isinstance(make_optimizer("adamw:lr=3e-4")([nn.Parameter(torch.zeros(1))]), torch.optim.AdamW)
    with pytest.raises(ConfigError, match="unknown optimizer 'rmsprop'; choose one of: sgd, adam, adamw"):
        make_optimizer("rmsprop")
    with pytest.raises(ConfigError, match=r"optimizer sgd: lr must be a number in \(0, inf\]"):
        make_optimizer("sgd:lr=-1")
    with pytest.raises(ConfigError, match="unknown parameter 'mom' for optimizer sgd; choose from: lr, momentum"):
        make_optimizer("sgd:mom=0.9")
    with pytest.raises(ConfigError, match="nesterov=true needs momentum > 0"):
        make_optimizer("sgd:nesterov=true")
    with pytest.raises(ConfigError, match="unknown schedule 'linear'; choose one of: onecycle, cosine, step"):
        make_schedule("linear")


def test_cosine_schedule_steps_per_optimizer_step_to_its_floor(trainer_factory):
    trainer = trainer_factory(optimizer=lambda p: torch.optim.SGD(p, lr=0.1), batch_size=64,
                              scheduler=make_schedule("cosine:min_lr=0.001"))
    trainer.fit(epochs=2)  # 8 steps: the last one runs at min_lr
    assert trainer.state.optimizer.param_groups[0]["lr"] == pytest.approx(0.001)


def test_step_schedule_steps_per_epoch(trainer_factory):
    trainer = trainer_factory(optimizer=lambda p: torch.optim.SGD(p, lr=0.1), batch_size=128,
                              scheduler=make_schedule("step:step_size=1,gamma=0.5"))
    trainer.fit(epochs=3)
    assert trainer.state.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)


def test_onecycle_survives_a_steps_budget(trainer_factory):
    trainer = trainer_factory(optimizer=lambda p: torch.optim.SGD(p, lr=0.1), batch_size=32, budget=Budget(steps=5),
                              scheduler="onecycle:max_lr=0.5")
    record = trainer.fit(epochs=3)
    # built for the 5 steps the budget allows: the last one ran at the end of the annealing
    assert record.steps == 5 and trainer.state.optimizer.param_groups[0]["lr"] < 1e-4


def test_a_torch_scheduler_factory(trainer_factory):
    trainer = trainer_factory(optimizer=lambda p: torch.optim.SGD(p, lr=1.0), batch_size=128,
                              scheduler=lambda opt, total: torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 / (i + 1)))
    trainer.fit(epochs=1)  # 2 steps: lr 1 then 1/2 (no step after the last one)
    assert trainer.state.optimizer.param_groups[0]["lr"] == pytest.approx(1 / 2)


# -- a target to stop at -----------------------------------------------------------------------------
def test_target_stops_at_the_first_evaluation_that_meets_it(trainer_factory):
    record = trainer_factory(until={"accuracy": 0.0}, batch_size=32,
                             options=TrainOptions(eval_every=3)).fit(epochs=5)
    assert record.stopped_by == "target" and record.steps == 3
    assert record.cost["target"] == "accuracy>=0" and record.cost["target_step"] == 3
    first = record.history[0]
    assert first["mid_epoch"] and first["step"] == 3
    assert record.cost["time_to_target_s"] == first["train_s"] <= record.cost["train_s"]  # evaluation excluded


def test_an_unreached_target_is_reported_as_such(trainer_factory):
    record = trainer_factory(until="loss<=0.0", batch_size=128).fit(epochs=2)
    assert record.stopped_by == "epochs" and record.cost["time_to_target_s"] is None
    assert record.cost["target"] == "loss<=0"


def test_target_direction_and_parsing():
    assert Target("accuracy", 0.9).op == ">=" and Target("loss", 0.1).op == "<="
    assert Target("token_error_rate", 0.1).op == "<=" and Target("mse", 0.1).op == "<="
    assert Target.parse("val_loss=0.2").op == "<=" and Target.parse("accuracy>=0.5").value == 0.5
    with pytest.raises(ConfigError, match="bad target"):
        Target.parse("accuracy")
    with pytest.raises(ConfigError, match="not evaluated by this run; evaluated: accuracy, loss"):
        Target("bleu", 1.0).met({"accuracy": 0.5, "loss": 1.0})
