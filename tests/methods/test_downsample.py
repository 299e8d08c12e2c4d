"""Downsample: FLOPs of a low-resolution step, gradients through pooled kernels, untouched regular batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import haet
from haet.data import TensorData
from haet.models import build_model
from haet.meters import default_meters
from haet.methods import parse_method
from haet.methods._downsample_ops import _resize_back, pooling_matrix
from haet.methods.downsample import (Downsample, DownsampleConfig, apply_downsample, downsample_input,
                                     low_resolution, pool_kernel)


def pooled_net() -> nn.Module:
    """Two 3×3 convolutions (the second with stride 2), global average pooling, a linear head."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def conv_flops(batch, c_out, out_pixels, c_in, taps):
    """Multiply-adds × 2 of one convolution's forward pass."""
    return 2 * batch * c_out * out_pixels * c_in * taps


def images(n=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorData(torch.randn(n, 1, size, size, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_low_resolution_step_flops_equal_the_analytic_count():
    data, B = images(8), 4
    haet.seed_everything(0)
    method, meters = Downsample(every=2, until=1.0), default_meters()
    record = haet.Trainer(pooled_net(), data, methods=[method], meters=meters, batch_size=B,
                          progress=False).fit(epochs=1)
    assert record.steps == 2 and method.downsampled_steps == 1  # step 1 regular, step 2 low resolution
    # Full resolution, 16×16: conv1 3×3 → 16×16 (backward: weight gradient only, the input needs none),
    # conv2 3×3 stride 2 → 8×8 (backward: input and weight gradients), linear 8 → 3.
    full = 2 * conv_flops(B, 4, 256, 1, 9) + 3 * conv_flops(B, 8, 64, 4, 9) + 3 * 2 * B * 8 * 3
    # Low resolution, 8×8 input: both kernels pooled to 2×2; conv1 → 8×8, conv2 stride 2 → 4×4.
    low = 2 * conv_flops(B, 4, 64, 1, 4) + 3 * conv_flops(B, 8, 16, 4, 4) + 3 * 2 * B * 8 * 3
    flops_meter = next(m for m in meters if m.name == "flops")
    per_input_shape = {sig[0][0]: flops for sig, flops in flops_meter.per_step.items()}
    assert per_input_shape == {(B, 1, 16, 16): {"float32": full}, (B, 1, 8, 8): {"float32": low}}  # the two batch kinds, counted apart
    assert record.cost["flops"] == full + low
    assert record.method_metrics["downsample/flops_saved"] == full - low


def test_pooling_matrix_is_area_weighting():
    assert torch.equal(pooling_matrix(3, 2), torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]]))
    third = 1 / 3
    expected = torch.tensor([[1, 2 * third, 0, 0, 0], [0, third, 1, third, 0], [0, 0, 0, 2 * third, 1]])
    assert torch.allclose(pooling_matrix(5, 3), expected.float())
    w = torch.randn(6, 2, 3, 3)
    assert torch.allclose(pool_kernel(w, 2).sum((-2, -1)), w.sum((-2, -1)), atol=1e-5)  # flat-input response kept


def test_pooled_kernel_gradients_reach_the_full_weights():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1).double()
    model = nn.Sequential(conv)
    lowres = apply_downsample(model)  # a lone conv has a spatial output: no probe
    assert model[0].weight is conv.weight  # the same Parameter: the optimizer updates the full-size weights
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)  # an 8×8 input downsampled by 2
    r = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    with low_resolution(lowres, 2):
        out = model(x)
    (out * r).sum().backward()
    # By hand: w' = P w Pᵀ with P the 3→2 area weights; the even 2×2 kernel pads one zero at the end.
    P = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]], dtype=torch.float64)
    w_low = torch.einsum("ak,oikl,bl->oiab", P, conv.weight.detach(), P).requires_grad_(True)
    b = conv.bias.detach().clone().requires_grad_(True)
    ref = F.conv2d(F.pad(x, (0, 1, 0, 1)), w_low, b)
    assert torch.allclose(out, ref, atol=1e-12)
    (ref * r).sum().backward()
    expected = torch.einsum("ak,oiab,bl->oikl", P, w_low.grad, P)  # chain rule: Pᵀ (∂L/∂w') P
    assert torch.allclose(conv.weight.grad, expected, atol=1e-12)
    assert torch.allclose(conv.bias.grad, b.grad, atol=1e-12)


def test_regular_batches_are_bit_identical_to_the_baseline():
    data = images(16)
    runs = {}
    for name, methods in (("baseline", []), ("downsample", [Downsample(every=2, until=1.0)])):
        haet.seed_everything(0)
        model = pooled_net()
        haet.Trainer(model, data, methods=methods, batch_size=4, budget=haet.Budget(steps=1),
                     progress=False).fit(epochs=1)
        runs[name] = model
    for (n, p), q in zip(runs["baseline"].named_parameters(), runs["downsample"].parameters()):
        assert torch.equal(p, q), n  # the first step is regular: identical update

    # After low-resolution steps, a regular forward/backward is the plain model's, bit for bit.
    haet.seed_everything(1)
    model = pooled_net()
    method = Downsample(every=2, until=1.0)
    haet.Trainer(model, data, methods=[method], batch_size=4, progress=False).fit(epochs=1)
    assert method.downsampled_steps == 2
    plain = pooled_net()
    plain.load_state_dict(model.state_dict())
    x = data.x[:5]
    out, ref = model(x), plain(x)
    assert torch.equal(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_flatten_head_is_scaled_back_to_its_full_size():
    x = torch.arange(3.0).view(1, 1, 1, 3).expand(1, 1, 3, 3)
    back = _resize_back(x, 2, (7, 7))
    assert back.shape == (1, 1, 7, 7)
    assert back[0, 0, 0].tolist() == [0, 0, 1, 1, 2, 2, 2]  # nearest ×2, then the edge replicated
    model = build_model("mnist5k-cnn", (1, 28, 28), 10)
    lowres = apply_downsample(model, example_input=torch.zeros(2, 1, 28, 28))
    with low_resolution(lowres, 2):
        assert model(downsample_input(torch.zeros(3, 1, 28, 28), 2)).shape == (3, 10)


class FlattenInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16 * 16, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_unsupported_models_are_refused_naming_the_layer():
    with pytest.raises(haet.ConfigError, match=r"layer 'fc' \(Linear\)"):
        apply_downsample(FlattenInForward(), example_input=torch.zeros(2, 1, 16, 16))
    dilated = nn.Sequential(nn.Conv2d(1, 2, 3, dilation=2), nn.AdaptiveAvgPool2d(1))
    with pytest.raises(haet.ConfigError, match=r"layer '0'.*dilation"):
        apply_downsample(dilated, example_input=torch.zeros(2, 1, 16, 16))
    with pytest.raises(haet.ConfigError, match="no Conv1d/Conv2d"):
        apply_downsample(nn.Sequential(nn.Flatten(), nn.Linear(256, 3)), example_input=torch.zeros(2, 1, 16, 16))


def test_bad_parameters_name_the_parameter_and_range():
    with pytest.raises(haet.ConfigError, match=r"factor must be an integer in \[2, 8\]"):
        DownsampleConfig(factor=1)
    with pytest.raises(haet.ConfigError, match=r"every must be an integer in \[1, inf\]"):
        Downsample(every=0)
    with pytest.raises(haet.ConfigError, match=r"downsample:kernel must be one of avg, none"):
        parse_method("downsample:kernel=max")


def test_low_resolution_batches_leave_batchnorm_running_statistics_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3))
    lowres = apply_downsample(model, example_input=torch.zeros(2, 1, 16, 16))
    bn = model[1]
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    with low_resolution(lowres, 2):
        model(downsample_input(torch.randn(4, 1, 16, 16) + 3, 2))
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert bn.track_running_stats  # restored after the block
    model(torch.randn(4, 1, 16, 16) + 3)
    assert not torch.equal(bn.running_mean, mean)  # regular batches update them as usual


def test_the_last_epochs_run_at_full_resolution():
    method = Downsample(every=1, until=0.5)
    haet.seed_everything(0)
    record = haet.Trainer(pooled_net(), images(8), methods=[method], batch_size=4, progress=False).fit(epochs=4)
    assert record.steps == 8 and method.downsampled_steps == 4  # epochs 1-2 (round(0.5·4)) only


@pytest.mark.parametrize("spec, message", [
    ("downsample:factor=8,every=1,until=1", r"every=1 with until=1 runs every training step at low resolution.*"
                                            r"allowed: every >= 2, or until < 1"),
    ("downsample:every=1,until=1.0", r"never at full resolution"),
])
def test_every_step_at_low_resolution_is_refused_at_construction(spec, message):
    with pytest.raises(haet.ConfigError, match=message):
        parse_method(spec)


def test_degenerate_schedules_and_sizes_are_refused_at_fit_start():
    def fit(epochs=2, data=None, **params):
        haet.seed_everything(0)
        return haet.Trainer(pooled_net(), data or images(8), methods=[Downsample(**params)], batch_size=4,
                            progress=False).fit(epochs=epochs)

    with pytest.raises(haet.ConfigError, match=r"every=1 with until=0.9 runs every step of all 2 epochs"):
        fit(every=1, until=0.9)                      # round(0.9·2) = 2: no full-resolution epoch is left
    with pytest.raises(haet.ConfigError, match=r"until=0.1 of 2 epochs rounds to 0 epochs"):
        fit(until=0.1)
    with pytest.raises(haet.ConfigError, match=r"factor=8 turns 28×28 inputs into 4×4; .* at least 8 samples per "
                                               r"side. Allowed factors for this input: 2..3"):
        fit(data=images(8, 28), factor=8)
    with pytest.raises(haet.ConfigError, match=r"factor=2 turns 8×8 inputs into 4×4.*Allowed factors for this "
                                               r"input: none"):
        apply_downsample(pooled_net(), DownsampleConfig(factor=2), example_input=torch.zeros(2, 1, 8, 8))
    assert fit(every=1, until=0.5, epochs=2).steps == 4  # a full-resolution epoch remains: accepted


def test_functional_form_takes_a_config_and_a_filter():
    model = pooled_net()
    lowres = apply_downsample(model, DownsampleConfig(factor=2), filter_fn=lambda name, m: name != "2",
                              example_input=torch.zeros(2, 1, 16, 16))
    assert type(model[0]).__name__ == "LowResConv2d" and type(model[2]) is nn.Conv2d  # '2' was filtered out
    with low_resolution(lowres, 2):
        assert model(downsample_input(torch.zeros(3, 1, 16, 16), 2)).shape == (3, 3)
