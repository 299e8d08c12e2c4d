"""qat: fixed-point fake quantization, every matmul input quantized, an integer export that
matches the fake-quantized model, its size by hand count, and the FLOPs labelled by arithmetic."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import haet
from haet.core.errors import ConfigError
from haet.meters.hardware import HardwareTable
from haet.methods import parse_entry, parse_method
from haet.methods._qat_ops import ActQuant, fake_quant_weight
from haet.methods.qat import QATConfig, apply_qat, convert, export_bytes
from haet.models import build_model
from haet.models.transformer import Seq2SeqTransformer

from ..conftest import tiny_cnn


def significant_bits(t: torch.Tensor) -> int:
    """The most significant binary digits any entry of `t` needs (0 for all zeros)."""
    mantissa, _ = torch.frexp(t.detach().double())
    for bits in range(0, 54):
        if torch.equal(mantissa * 2.0**bits, torch.round(mantissa * 2.0**bits)):
            return bits
    return 54


class MatmulOperands(TorchDispatchMode):
    """Records the two operands of every matrix product and convolution."""

    OPS = {torch.ops.aten.mm.default: (0, 1), torch.ops.aten.bmm.default: (0, 1),
           torch.ops.aten.addmm.default: (1, 2), torch.ops.aten.convolution.default: (0, 1)}

    def __init__(self):
        super().__init__()
        self.operands: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            i, j = self.OPS[func]
            self.operands.append((str(func), args[i].detach().clone(), args[j].detach().clone()))
        return func(*args, **(kwargs or {}))


def tiny_transformer() -> Seq2SeqTransformer:
    torch.manual_seed(0)
    return Seq2SeqTransformer(src_len=160, vocab=13, d_model=32, heads=2, d_ff=64, enc_layers=1, dec_layers=1)


def seq_batch(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 160, generator=g), torch.randint(0, 13, (n, 5), generator=g)


def test_fixed_point_weights_use_power_of_two_scales_per_channel():
    w = torch.randn(6, 5, 3) * torch.tensor([0.01, 0.1, 1.0, 3.0, 0.5, 20.0])[:, None, None]
    wq, scale = fake_quant_weight(w, 8, "fixed_point", per_channel=True)
    amax = w.abs().amax(dim=(1, 2))
    assert torch.equal(torch.log2(scale), torch.round(torch.log2(scale)))        # powers of two
    assert torch.all(amax / 127 <= scale) and torch.all(scale < 2 * amax / 127)  # the smallest that covers
    levels = wq / scale[:, None, None]
    assert torch.equal(levels, torch.round(levels)) and levels.abs().max() <= 127
    assert torch.all((wq - w).abs() <= scale[:, None, None] / 2)                 # round to nearest


def test_activation_observer_is_a_moving_average_and_picks_the_sign():
    q = ActQuant(bits=8, momentum=0.9).train()
    a, b = torch.rand(100) * 3, torch.rand(100) * 5 + 1
    q(a)
    q(b)
    lo, hi = q.min_max.tolist()
    assert hi == pytest.approx(0.9 * float(a.max()) + 0.1 * float(b.max()), rel=1e-6)
    assert lo == pytest.approx(0.9 * float(a.min()) + 0.1 * float(b.min()), rel=1e-6)
    scale, zero, qmin, qmax = q.qparams()
    assert (qmin, qmax, zero) == (0, 255, 0)                                        # unsigned after ReLU-like data
    assert math.log2(scale).is_integer() and scale / 2 < hi / 255 <= scale
    signed = ActQuant(bits=8).train()
    signed(torch.randn(100))
    assert signed.qparams()[2:] == (-128, 127)


def test_straight_through_gradient_is_clipped_to_the_range():
    q = ActQuant(bits=4).train()
    q(torch.tensor([-1.0, 1.0]))  # |x| ≤ 1 over 7 levels → scale 2^-2; levels −8..7 cover [−2, 1.75]
    q.eval()
    x = torch.tensor([-2.5, -2.0, 0.2, 1.75, 1.9, 5.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("bits", [8, 4])
def test_every_matmul_input_of_the_transformer_is_fixed_point(bits):
    model = tiny_transformer()
    src, tgt = seq_batch()
    with MatmulOperands() as float_ops:
        model((src, tgt))
    assert max(max(significant_bits(a), significant_bits(b)) for _, a, b in float_ops.operands) > 16  # control
    names = apply_qat(model, QATConfig(bits_w=bits, bits_a=bits))
    assert {"embed", "encoder.0.attn.scores", "encoder.0.attn.mix", "decoder.0.norm1", "head"} <= set(names)
    model.train()
    with MatmulOperands() as ops:
        model((src, tgt))
    kinds = [k for k, _, _ in ops.operands]
    assert kinds.count("aten.bmm.default") >= 6      # Q·Kᵀ and P·V of three attentions are among them
    assert len(ops.operands) == len(float_ops.operands)
    for kind, a, b in ops.operands:
        assert significant_bits(a) <= bits and significant_bits(b) <= bits, kind


def test_affine_scheme_puts_activations_on_a_zero_point_grid():
    q = ActQuant(bits=8, scheme="affine").train()
    x = torch.randn(1000) + 0.7
    y = q(x)
    scale, zero, qmin, qmax = q.qparams()
    levels = y / scale + zero
    assert torch.allclose(levels, torch.round(levels), atol=1e-3) and levels.min() >= qmin and levels.max() <= qmax
    assert 0 < zero < 255 and not math.log2(scale).is_integer()
    model = tiny_cnn()
    apply_qat(model, QATConfig(scheme="affine"))
    model(torch.randn(2, 1, 8, 8))
    with pytest.raises(ConfigError, match="fixed_point"):
        convert(model)


def test_integer_export_matches_the_fake_quantized_cnn_on_the_test_set(mnist5k):
    train, test = mnist5k
    haet.seed_everything(0)
    model = build_model("mnist5k-cnn", (1, 28, 28), 10)
    haet.Trainer(model, train, methods=parse_entry("qat"), budget=haet.Budget(steps=40), progress=False).fit(1)
    int_model = convert(model)
    model.eval()
    with torch.no_grad():
        fake, exact = model(test.x), int_model(test.x)
    assert (fake.argmax(1) == exact.argmax(1)).float().mean() >= 0.999
    # Both compute the same integers; the fake-quantized model accumulates in float32 (24-bit
    # mantissa), so it may differ by a rounding in an accumulator of up to ~2^26 and, through it,
    # by one level of a later quantizer: bounded by 1e-3 of the logits' range here.
    assert (fake - exact).abs().max() <= 1e-3 * float(exact.abs().max())
    layer = int_model[0]
    assert layer.weight.dtype == torch.int8 and layer.bias.dtype == torch.int32 and layer.w_exp.dtype == torch.int8


def test_integer_export_matches_the_fake_quantized_transformer():
    model = tiny_transformer()
    apply_qat(model)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    src, tgt = seq_batch(64)
    for _ in range(5):
        loss = F.cross_entropy(model((src, tgt)).flatten(0, 1), tgt.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    int_model = convert(model)
    model.eval()
    with torch.no_grad():
        fake, exact = model((src, tgt)), int_model((src, tgt))
    assert (fake.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.999
    assert (fake - exact).abs().max() <= 1e-3 * float(exact.abs().max())


@pytest.mark.parametrize("bits_w, weight_bytes", [(8, 20432), (4, 10216)])
def test_export_size_is_the_hand_count(bits_w, weight_bytes):
    model = build_model("mnist5k-cnn", (1, 28, 28), 10)
    apply_qat(model, QATConfig(bits_w=bits_w))
    model(torch.rand(4, 1, 28, 28))
    # weights (144 + 4608 + 15680, packed at bits_w), int32 biases (16 + 32 + 10), one int8
    # exponent per output channel (58), three activation quantizers of 3 int16 each (18).
    assert export_bytes(convert(model)) == weight_bytes + 58 * 4 + 58 + 3 * 6
    float_model = build_model("mnist5k-cnn", (1, 28, 28), 10)
    assert export_bytes(float_model) == 20490 * 4


def test_trainer_labels_forward_flops_int8_and_backward_float32(trainer_factory):
    record = trainer_factory(methods=parse_entry("qat"), budget=haet.Budget(steps=3)).fit(1)
    batch = 64
    conv = 2 * batch * 4 * 64 * 9           # conv 1→4, 3×3, on 8×8
    linear = 2 * batch * 256 * 4            # linear 256→4
    forward, backward = conv + linear, conv + 2 * linear  # the input needs no gradient
    assert record.cost["flops_by_dtype"] == {"int8": 3 * forward, "float32": 3 * backward}
    table = HardwareTable()
    expected = (3 * forward * table.pj_per_flop("int8") + 3 * backward * table.pj_per_flop("float32")) * 1e-12
    assert record.cost["energy_model_split_j"]["compute"] == pytest.approx(expected, rel=1e-12)
    assert record.cost["energy_source"] == "model"
    assert record.method_metrics["qat/quantized_modules"] == 2


def test_parameters_are_shared_and_unhandled_modules_are_named():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.MultiheadAttention(4, 1), torch.nn.Linear(4, 2))
    before = [id(p) for p in model.parameters()]
    with pytest.warns(UserWarning, match="not quantized.*1"):
        names = apply_qat(model, filter_fn=lambda name, m: name != "2")
    assert names == ["0"] and [id(p) for p in model.parameters()] == before


def test_bad_parameters_name_the_parameter_and_range():
    with pytest.raises(ConfigError, match=r"bits_w must be an integer in \[2, 8\]"):
        parse_method("qat:bits_w=9")
    with pytest.raises(ConfigError, match="scheme must be one of"):
        parse_method("qat:scheme=float")
    with pytest.raises(ConfigError, match="qat and binary_connect cannot run together"):
        haet.Trainer(tiny_cnn(), [(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long))],
                     methods=parse_entry("qat+binary_connect"))


def test_resume_gives_the_same_weights_and_observers(trainer_factory, tmp_path):
    full = trainer_factory(methods=parse_entry("qat"))
    full.fit(2)
    trainer_factory(methods=parse_entry("qat"), out_dir=tmp_path, checkpoint=True).fit(1)
    resumed = trainer_factory(methods=parse_entry("qat"), out_dir=tmp_path, checkpoint=True)
    resumed.fit(2, resume_from=tmp_path)
    a, b = full.state.model.state_dict(), resumed.state.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("input_q.observed") for k in a)


class ScaleOnly(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x.flatten(1)[:, :4] * self.scale


def test_a_model_with_nothing_to_quantize_is_refused_at_fit_start(trainer_factory):
    with pytest.raises(ConfigError, match="qat: ScaleOnly has no layer qat quantizes.*qat would change nothing"):
        trainer_factory(ScaleOnly(), methods=parse_entry("qat")).fit(1)


def test_functional_form_needs_no_trainer_state():
    import inspect

    params = inspect.signature(apply_qat).parameters
    assert list(params) == ["model", "config", "optimizer", "filter_fn"]
    assert all(params[p].kind is inspect.Parameter.KEYWORD_ONLY for p in ("optimizer", "filter_fn"))
