"""The meters report what a hand count says: FLOPs, bytes, and the energy model's arithmetic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import haet
from haet.data import TensorData
from haet.meters import EnergyMeter, FlopsMeter, HardwareTable, MemoryMeter, TimeMeter

B, IN, H, OUT = 16, 12, 20, 3


def _data(n=64, shape=(IN,), classes=OUT):
    g = torch.Generator().manual_seed(0)
    return TensorData(torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g))


def _fit(model, data, **kw):
    haet.seed_everything(0)
    kw.setdefault("batch_size", B)
    return haet.Trainer(model, data, None, progress=False, device="cpu", **kw).fit(epochs=kw.pop("epochs", 1))


def test_linear_step_flops_equal_the_analytic_count():
    model = nn.Sequential(nn.Linear(IN, H), nn.ReLU(), nn.Linear(H, OUT))
    record = _fit(model, _data(64))
    # forward 2·B·in·out per layer; backward: weight gradients of both layers, input gradient of
    # the second only (the data needs none).
    per_step = 2 * B * (IN * H + H * OUT) + 2 * B * (IN * H + H * OUT) + 2 * B * H * OUT
    assert record.steps == 4
    assert record.cost["flops"] == 4 * per_step
    assert record.cost["flops_by_dtype"] == {"float32": 4 * per_step}


def test_conv_step_flops_equal_the_analytic_count_and_a_short_batch_is_remeasured():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, OUT))
    data = _data(40, shape=(2, 6, 6))  # batches of 16, 16 and 8

    def step(b):
        conv = 2 * b * 4 * 6 * 6 * 2 * 9      # multiply-adds of the conv, ×2
        lin = 2 * b * 144 * OUT
        return 2 * conv + 3 * lin             # conv: forward + weight grad; linear: forward + both grads

    record = _fit(model, data)
    assert record.cost["flops"] == 2 * step(16) + step(8)


def test_mfu_is_flops_over_time_and_peak():
    record = _fit(nn.Sequential(nn.Linear(IN, H), nn.ReLU(), nn.Linear(H, OUT)), _data(64))
    c = record.cost
    assert c["mfu"] == pytest.approx(c["flops"] / (c["train_s"] * c["peak_flops"]), rel=1e-9)
    assert c["peak_flops_source"].startswith(("estimate:", "table:"))


def test_memory_breakdown_of_a_known_model_with_adam():
    model = nn.Sequential(nn.Linear(IN, H), nn.ReLU(), nn.Linear(H, OUT))
    record = _fit(model, _data(64))
    n_params = IN * H + H + H * OUT + OUT
    mem = record.cost["memory_bytes"]
    assert mem["params"] == 4 * n_params
    assert mem["grads"] == 4 * n_params
    # Adam: exp_avg and exp_avg_sq per parameter, plus a float32 step counter per tensor.
    assert mem["optimizer"] == 2 * 4 * n_params + 4 * 4
    # saved for backward: the input (weight grad of layer 1), the ReLU output (its own backward
    # and layer 2's weight grad share it), and the loss's log-softmax output, int64 targets and
    # its scalar total weight; weights are parameters, not activations.
    assert mem["activations"] == 4 * B * IN + 4 * B * H + 4 * B * OUT + 8 * B + 4
    assert record.cost["peak_mem_mb"] > 0


def test_energy_model_is_ops_times_table_plus_bytes_times_table():
    model = nn.Sequential(nn.Linear(IN, H), nn.ReLU(), nn.Linear(H, OUT))
    record = _fit(model, _data(64))
    c, mem = record.cost, record.cost["memory_bytes"]
    assert c["energy_source"] == "model"
    p = mem["params"]
    moved_per_step = 4 * p + 2 * mem["activations"] + 2 * p + 2 * mem["optimizer"] + 4 * B * IN
    assert c["bytes_moved"] == 4 * moved_per_step
    expected = c["flops"] * (3.7 + 0.9) / 2 * 1e-12 + c["bytes_moved"] * 160e-12
    assert c["energy_j"] == pytest.approx(expected, rel=1e-12)
    assert c["energy_model_split_j"]["compute"] == pytest.approx(c["flops"] * 2.3e-12, rel=1e-12)


def test_energy_table_by_number_format_and_override(tmp_path):
    table = HardwareTable()
    assert table.pj_per_flop("float32") == pytest.approx(2.3)
    assert table.pj_per_flop("int8") == pytest.approx(0.15)
    assert table.pj_per_flop("int4") == pytest.approx((0.2 * 0.25 + 0.1) / 2)  # extrapolated
    f = tmp_path / "t.toml"
    f.write_text('dram_pj_per_byte = 100.0\n[op_energy_pj]\nfloat32 = [1.0, 1.0]\n[peak_flops."My NPU"]\nfloat32 = 1e12\n')
    custom = HardwareTable.from_toml(f)
    assert custom.pj_per_flop("float32") == 1.0 and custom.dram_pj_per_byte == 100.0
    assert custom.peak_flops_for("my npu v2") == (1e12, "table:My NPU")
    assert custom.peak_flops_for("unknown gpu") == (None, "unknown")
    with pytest.raises(ValueError, match="unknown hardware table keys"):
        HardwareTable().override({"dram": 1})


def test_int8_compute_dtype_lowers_modelled_energy_by_the_table_ratio():
    class Int8Label(haet.Method):
        name = "int8label"

        def fit_start(self, state):
            state.compute_dtype = "int8"

    model = nn.Sequential(nn.Linear(IN, H), nn.ReLU(), nn.Linear(H, OUT))
    rec = _fit(model, _data(64), methods=[Int8Label()])
    split = rec.cost["energy_model_split_j"]
    assert rec.cost["flops_by_dtype"] == {"int8": rec.cost["flops"]}
    assert split["compute"] == pytest.approx(rec.cost["flops"] * 0.15e-12, rel=1e-12)


def test_rapl_counter_reads_package_domains_and_handles_wraparound(tmp_path):
    from haet.meters import energy

    def domain(i, name, uj, wrap):
        d = tmp_path / f"intel-rapl:{i}"
        d.mkdir()
        (d / "name").write_text(name + "\n")
        (d / "energy_uj").write_text(f"{uj}\n")
        (d / "max_energy_range_uj").write_text(f"{wrap}\n")
        return d / "energy_uj"

    pkg = domain(0, "package-0", 900, 1000)
    dram = domain(1, "dram", 5, 1000)
    read = energy._rapl_counter(str(tmp_path))
    assert read() == 0.0
    pkg.write_text("100\n")   # wrapped: 900 -> 1000 -> 100 is 200 µJ
    dram.write_text("999\n")  # not a package domain: ignored
    assert read() == pytest.approx(200e-6)
    assert energy._rapl_counter(str(tmp_path / "none")) is None


def test_energy_meter_uses_rapl_when_readable_and_excludes_evaluation(tmp_path, monkeypatch):
    from haet.meters import energy

    d = tmp_path / "intel-rapl:0"
    d.mkdir()
    (d / "name").write_text("package-0")
    (d / "max_energy_range_uj").write_text("1000000000000")
    counter = d / "energy_uj"
    counter.write_text("0")
    monkeypatch.setattr(energy, "RAPL_ROOT", str(tmp_path))

    class Burn(haet.Method):
        """Advances the fake counter by 1 J per training step and by 100 J per evaluation."""
        name = "burn"

        def after_step(self, state):
            counter.write_text(str(int(counter.read_text()) + 1_000_000))

        def after_eval(self, state):
            counter.write_text(str(int(counter.read_text()) + 100_000_000))

    model = nn.Sequential(nn.Linear(IN, OUT))
    haet.seed_everything(0)
    rec = haet.Trainer(model, _data(64), _data(32), methods=[Burn()], batch_size=B, progress=False).fit(epochs=2)
    assert rec.cost["energy_source"] == "rapl"
    assert rec.cost["energy_j"] == pytest.approx(8.0)  # 8 steps; the 2 evaluations are excluded
    assert rec.cost["energy_model_j"] > 0  # the model's figure is still given alongside


def test_meters_can_be_chosen_and_energy_model_needs_its_inputs():
    model = nn.Sequential(nn.Linear(IN, OUT))
    rec = haet.Trainer(model, _data(32), None, meters=[TimeMeter(), FlopsMeter()], progress=False,
                       batch_size=B).fit(epochs=1)
    assert "energy_j" not in rec.cost and rec.cost["flops"] > 0
    with pytest.raises(ValueError, match="needs the flops and memory meters"):
        haet.Trainer(nn.Linear(IN, OUT), _data(32), None, meters=[EnergyMeter()], progress=False).fit(epochs=1)
    with pytest.raises(haet.ConfigError, match="reads energy_j, which no meter of this run provides"):
        haet.Trainer(model, _data(32), None, meters=[TimeMeter()], budget=haet.Budget(energy_j=1.0))
    assert MemoryMeter().name == "memory"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (NVML energy, CUDA memory)")
def test_cuda_run_measures_nvml_energy_and_allocator_peak():
    model = nn.Sequential(nn.Linear(IN, H), nn.ReLU(), nn.Linear(H, OUT))
    rec = haet.Trainer(model, _data(4096), None, device="cuda", progress=False, batch_size=B).fit(epochs=2)
    assert rec.device == "cuda" and rec.hardware["gpu"]
    assert rec.cost["energy_source"] in ("nvml", "model")
    if rec.cost["energy_source"] == "nvml":
        assert rec.cost["energy_j"] > 0
    assert rec.cost["peak_mem_mb"] == pytest.approx(torch.cuda.max_memory_allocated() / 2**20)
