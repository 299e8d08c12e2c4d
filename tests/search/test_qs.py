"""QS-NAS: the accelerator model against hand computations, its monotonicity, and the search."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from haet.cli import main
from haet.core.errors import ConfigError
from haet.hardware import PRESETS, Accelerator, get_accelerator, layer_shapes
from haet.meters.hardware import HardwareTable
from haet.search.qs import Point, grid_points, pareto, scaled_model, search

TOY = Accelerator("toy", pes=4, mults_per_pe=2, native_bits=16, clock_hz=1e8, buffer_bytes=1024,
                  buffer_pj_per_byte=2.0, dram_pj_per_byte=100.0, dram_bytes_per_cycle=8.0)


def test_a_linear_layer_costs_what_a_hand_count_says():
    # Linear 64 -> 32 at 8 bits: 2048 MACs; 2048 weight bytes, 64 input and 32 output bytes.
    layer = nn.Linear(64, 32)
    (shape,) = layer_shapes(nn.Sequential(layer), (64,))
    assert shape == (2048, 2048, 64, 32)
    cost = TOY.layer_cost(*shape, bits=8)
    # 4 PEs x 2 multipliers x 2 products (16-bit multipliers pack two 8-bit ones) = 16 per cycle.
    assert cost["compute_cycles"] == 2048 // 16
    # The input fits in half the buffer (512 B): 1 tile, weights read once; activations stay on chip.
    assert cost["tiles"] == 1 and cost["dram_bytes"] == 2048
    assert cost["dram_cycles"] == 2048 // 8 and cost["cycles"] == 256      # DRAM-bound
    buffer = 2 * 2048 * 1 / 2 + 32                                           # operands / multipliers, + outputs
    mac_pj = 2 * HardwareTable().pj_per_flop("int8")                         # (0.2 + 0.1) pJ
    assert cost["energy_j"] == pytest.approx((2048 * mac_pj + buffer * 2.0 + 2048 * 100.0) * 1e-12)


def test_a_conv_layer_whose_input_does_not_fit_is_tiled_and_rereads_its_weights():
    # Conv 3 -> 8, 3x3, padding 1 on 3x32x32 at 4 bits: 9216 MACs... per output 27, outputs 8*32*32.
    conv = nn.Conv2d(3, 8, 3, padding=1)
    (shape,) = layer_shapes(nn.Sequential(conv), (3, 32, 32))
    macs, weights, inputs, outputs = shape
    assert (macs, weights, inputs, outputs) == (8 * 32 * 32 * 27, 216, 3 * 32 * 32, 8 * 32 * 32)
    cost = TOY.layer_cost(*shape, bits=4)
    in_bytes, out_bytes, w_bytes = inputs / 2, outputs / 2, weights / 2        # 1536, 4096, 108 bytes
    tiles = math.ceil(in_bytes / 512)
    assert cost["tiles"] == tiles == 3
    assert cost["dram_bytes"] == w_bytes * tiles + in_bytes + out_bytes       # spills: read input, write output
    assert cost["compute_cycles"] == math.ceil(macs / (4 * 2 * 4))           # 4-bit: four products per multiplier
    mac_pj = 2 * HardwareTable().pj_per_flop("int4")
    buffer = 2 * macs * 0.5 / 2 + out_bytes
    assert cost["energy_j"] == pytest.approx((macs * mac_pj + buffer * 2.0 + cost["dram_bytes"] * 100.0) * 1e-12)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_energy_falls_with_bits_and_grows_with_width(preset):
    accel = PRESETS[preset]
    grid = {(p.bits, p.scale): p.energy_j for p in grid_points(accel, "mnist5k-cnn", (1, 28, 28), 10,
                                                                 [2, 4, 8, 32], [0.5, 1, 2])}
    for s in (0.5, 1, 2):
        assert grid[2, s] < grid[4, s] < grid[8, s] < grid[32, s]
    for q in (2, 4, 8, 32):
        assert grid[q, 0.5] < grid[q, 1] < grid[q, 2]


def test_the_search_picks_a_verified_pareto_point_that_meets_the_target():
    grid = grid_points(PRESETS["zedboard"], "mlp", (1, 8, 8), 10, [2, 3, 4, 6, 8], [0.25, 0.5, 1, 2])

    def accuracy(q, s):  # a synthetic surface: saturating in bits and in width
        return 0.99 - 0.5 * 2.0 ** (-q) - 0.04 / s

    trained = []

    def train(q, s):
        trained.append((q, s))
        return [accuracy(q, s)]

    result = search(grid, train, target=0.95, max_trainings=10)
    chosen = result["chosen"]
    assert chosen is not None and chosen.accuracy >= 0.95
    assert (chosen.bits, chosen.scale) in trained            # verified by training, not only predicted
    assert chosen in pareto(result["points"])
    feasible = [p for p in grid if accuracy(p.bits, p.scale) >= 0.95]
    best = min(feasible, key=lambda p: p.energy_j)
    assert chosen.energy_j <= 1.5 * best.energy_j            # near the true least-energy feasible point
    assert result["trainings"] <= 10 < len(grid)


def test_an_unreachable_target_reports_the_best_point():
    grid = grid_points(PRESETS["small-asic"], "mlp", (1, 8, 8), 10, [2, 8], [0.5, 1])
    result = search(grid, lambda q, s: [0.5 + q / 100], target=0.99, max_trainings=4)
    assert result["chosen"] is None and result["best"].bits == 8


def test_accelerator_files_and_bad_input_are_clear(tmp_path):
    f = tmp_path / "a.toml"
    f.write_text('preset = "zedboard"\nclock_hz = 2e8\n')
    assert get_accelerator(str(f)).clock_hz == 2e8
    f.write_text('clock_hz = -1\n')
    with pytest.raises(ConfigError, match="clock_hz must be a finite positive number"):
        get_accelerator(str(f))
    f.write_text('warp = 9\n')
    with pytest.raises(ConfigError, match="unknown accelerator keys"):
        get_accelerator(str(f))
    with pytest.raises(ConfigError, match="unknown accelerator 'fpga9'"):
        get_accelerator("fpga9")


def test_cli_bad_input_exits_2(tmp_path, capsys):
    base = ["search", "qs", "--task", "digits", "--target-accuracy", "0.9", "--out", str(tmp_path / "q")]
    assert main(base + ["--bits", "3,9"]) == 2
    assert "--bits" in capsys.readouterr().err
    assert main(base + ["--accelerator", "fpga9"]) == 2
    assert main(["search", "qs", "--task", "digits", "--model", "resnet8", "--target-accuracy", "0.9",
                 "--out", str(tmp_path / "q")]) == 2
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_a_small_real_search_writes_its_outputs(tmp_path, capsys):
    torch.manual_seed(0)
    out = tmp_path / "qs"
    code = main(["search", "qs", "--task", "digits", "--model", "mlp", "--target-accuracy", "0.5", "--bits", "2,8",
                 "--scales", "0.125,0.25", "--epochs", "1", "--max-trainings", "4", "--out", str(out), "--quiet"])
    assert code == 0
    data = json.loads((out / "qs.json").read_text())
    chosen = data["chosen"]
    assert chosen["accuracy"] >= 0.5 and data["energy_source"] == "model:zedboard"
    assert (out / "qs.png").stat().st_size > 0 and (out / "record.json").exists()
    record = json.loads((out / "record.json").read_text())
    assert record["method_metrics"]["accel/energy_per_inference_j"] == chosen["energy_j"]
    assert len(list((out / "runs").rglob("record.json"))) == data["trainings"]
