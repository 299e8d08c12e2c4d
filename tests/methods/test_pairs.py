"""Registry-driven composition: every pair of methods either runs with both effects present or is
refused at construction with a clear message; every method resumes to the same weights.

Each method has an effect check below (what it must have done to the model, the optimizer, the
data or the record after a few steps). A new method needs one: the test fails for a method
without it, so no method can join the registry without saying how its effect is seen.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch import nn

import haet
from haet.core.errors import ConfigError
from haet.data import TensorData
from haet.methods import parse_entry, registry
from haet.models import build_model

STEPS = 4
#: Settings that make each effect visible within STEPS steps of a small run (defaults otherwise).
QUICK = {
    "gradmatch": "gradmatch:fraction=0.3",
    "random_subset": "random_subset:fraction=0.3",
    "gradmax": "gradmax:grow_every=2,grow_until=2",
    "mbst": "mbst:update_every=2",
}


def _linear_conv(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]


def _params_of(optimizer) -> set[int]:
    return {id(p) for g in optimizer.param_groups for p in g["params"]}


def _effect(name: str, method, trainer, record) -> str | None:
    """None when `name`'s effect is present after the run, else what is missing."""
    mm, model = record.method_metrics, trainer.state.unwrapped_model
    trainable = [p for p in model.parameters() if p.requires_grad]
    if name in ("gradmatch", "random_subset"):
        ok = mm.get(f"{name}/selections", 0) >= 1 and 0 < mm.get(f"{name}/subset_size", 0) < len(trainer.state.train_data)
        return None if ok else f"no subset was selected: {mm}"
    if name == "downsample":
        return None if method.downsampled_steps > 0 else "no low-resolution step ran"
    if name == "fusion":
        return None if mm.get("fusion/fused_params") == len(trainable) else f"fused {mm.get('fusion/fused_params')} " \
            f"of {len(trainable)} parameters"
    if name == "sc_sgd":
        missing = {id(p) for p in trainable} - _params_of(method.optimizer)
        return None if mm.get("sc_sgd/updates", 0) > 0 and not missing else "parameters not updated by the circuit"
    if name == "qat":
        from haet.methods._qat_ops import QUANTIZED

        plain = [m for m in _linear_conv(model) if type(m) not in QUANTIZED.values()]
        return None if not plain and any(k.startswith("int") for k in record.cost["flops_by_dtype"]) \
            else f"layers left in float: {[type(m).__name__ for m in plain]}"
    if name == "binary_penalty":
        live = {id(p) for p in model.parameters()}
        held = [w for w in method.weights if id(w) in live]
        return None if held and len(held) == len(method.weights) else "the penalty acts on weights no longer in the model"
    if name == "binary_connect":
        from haet.methods._binary_ops import BinaryConnectLinear, _BinaryConnectConv

        n = sum(isinstance(m, (BinaryConnectLinear, _BinaryConnectConv)) for m in model.modules())
        return None if n and n == mm.get("binary_connect/layers") else f"{n} binary layers in the model"
    if name == "gsp":
        weights = [m.weight for m in _linear_conv(model)]
        zeros = sum(int((w == 0).sum()) for w in weights) / max(1, sum(w.numel() for w in weights))
        return None if mm.get("gsp/projections", 0) > 0 and zeros > 0.05 else f"{zeros:.1%} zeros in the model"
    if name == "mbst":  # the whole footprint under the bound, by sparsity and/or micro-batches
        from haet.methods._sparse_ops import _SparseLayer

        n = sum(isinstance(m, _SparseLayer) for m in model.modules())
        held = 0 < mm.get("mbst/footprint_bytes", 0) <= mm.get("mbst/bound_bytes", 0)
        acting = (n and mm.get("mbst/sparsity", 0) > 0) or 0 < mm.get("mbst/micro_batch", 0) < trainer.batch_size
        return None if held and acting else f"bound not met or nothing done: {n} sparse layers, {mm}"
    if name == "gradmax":
        grown = mm.get("gradmax/growth_events", 0) >= 1 and mm.get("gradmax/width_fraction", 0) > 0.25
        return None if grown else f"no growth: {mm}"
    if name == "tensor_train":
        from haet.layers import TensorTrainLinear

        return None if any(isinstance(m, TensorTrainLinear) for m in model.modules()) else "no tensor-train layer"
    if name == "eqprop":
        return None if mm.get("eqprop/steps", 0) == record.steps and record.cost["memory_bytes"]["activations"] == 0 \
            else f"backprop ran: {mm}"
    if name == "label_smoothing":
        return None if mm.get("label_smoothing/batches", 0) >= record.steps > 0 else f"loss not smoothed: {mm}"
    if name == "ema":
        return None if mm.get("ema/updates") == record.steps and mm.get("ema/applied") == 1 \
            and torch.equal(method.average[0], trainable[0].detach()) else f"the model does not hold the average: {mm}"
    return f"no effect check for method {name!r}: add one to tests/methods/test_pairs.py"


@pytest.fixture(scope="module")
def small_mnist5k(mnist5k):
    train, test = mnist5k
    return TensorData(train.x[:512], train.y[:512]), TensorData(test.x[:128], test.y[:128])


#: Methods that need a model of their own kind (every pair with them runs on it).
MODEL = {"eqprop": "eqprop-mlp"}


def _trainer(entry: str, data, out_dir=None, steps: int | None = STEPS):
    train, test = data
    haet.seed_everything(0)
    names = [spec.split(":")[0] for spec in entry.split("+")]
    model = build_model(next((MODEL[n] for n in names if n in MODEL), "mnist5k-cnn"), (1, 28, 28), 10)
    methods = parse_entry(entry)
    budget = haet.Budget(steps=steps) if steps else None
    trainer = haet.Trainer(model, train, test, methods=methods, budget=budget, progress=False, out_dir=out_dir,
                           checkpoint=out_dir is not None, batch_size=32)
    return trainer, methods


def _fit(trainer, epochs: int = 1, resume=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trainer.fit(epochs=epochs, resume_from=resume)


def _run(entry: str, data, out_dir=None, epochs: int = 1, steps: int | None = STEPS, resume=None):
    trainer, methods = _trainer(entry, data, out_dir, steps)
    return trainer, methods, _fit(trainer, epochs, resume)


NAMES = list(registry())
#: Settings of one method that change how it composes, paired as if they were methods of their own.
VARIANTS = {"fusion:mode=forward": "fusion"}
PAIRS = [(a, b) for a, b in itertools.combinations(NAMES + list(VARIANTS), 2)
         if VARIANTS.get(a, a) != VARIANTS.get(b, b)]


@pytest.mark.parametrize("name", NAMES)
def test_every_method_alone_shows_its_effect(name, small_mnist5k):
    trainer, (method,), record = _run(QUICK.get(name, name), small_mnist5k)
    assert record.stopped_by == "budget:steps"
    assert _effect(name, method, trainer, record) is None


@pytest.mark.parametrize("a,b", PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_every_pair_composes_with_both_effects_or_is_refused_at_construction(a, b, small_mnist5k):
    entry = f"{QUICK.get(a, a)}+{QUICK.get(b, b)}"
    try:
        trainer, methods = _trainer(entry, small_mnist5k)
    except ConfigError as err:
        message = str(err)
        na, nb = VARIANTS.get(a, a), VARIANTS.get(b, b)
        assert na in message and nb in message, f"the refusal does not name both methods: {message}"
        return
    record = _fit(trainer)  # accepted at construction: it must run (a ConfigError here is a late refusal)
    assert record.stopped_by == "budget:steps", f"{entry}: {record.stopped_by} {record.error}"
    for name, method in zip((VARIANTS.get(a, a), VARIANTS.get(b, b)), methods):
        missing = _effect(name, method, trainer, record)
        assert missing is None, f"{entry}: {name}'s effect was dropped: {missing}"


@pytest.mark.parametrize("name", NAMES)
def test_every_method_resumes_to_the_same_weights(name, small_mnist5k, tmp_path):
    entry = QUICK.get(name, name)
    straight, _, whole = _run(entry, small_mnist5k, tmp_path / "a", epochs=2, steps=None)
    # The same run (2 epochs in total) stopped by a budget at the end of its first epoch, then resumed.
    _, _, first = _run(entry, small_mnist5k, tmp_path / "b", epochs=2, steps=whole.history[0]["step"])
    assert first.epochs == 1 and first.stopped_by == "budget:steps"
    resumed, _, record = _run(entry, small_mnist5k, tmp_path / "b", epochs=2, steps=None, resume=tmp_path / "b")
    assert record.epochs == 2
    a, b = straight.state.model.state_dict(), resumed.state.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{name}: {key} differs after resume"
