"""haet challenge: the rules (budget, test split, score), the leaderboard, the mini-ImageNet-10 loader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from haet.challenge.data import load_mini_imagenet10
from haet.challenge.rules import Rules, get_challenge_task, run_once, score
from haet.challenge.submit import append_leaderboard, leaderboard_line, submit
from haet.cli import main
from haet.core.budget import Budget
from haet.core.errors import ConfigError
from haet.data.loader import TensorData
from haet.methods.ema import ema_update
from haet.methods.label_smoothing import smoothed_loss
from haet.recipes import fast, get_recipe


@pytest.fixture(scope="module")
def digits():
    return get_challenge_task("digits"), get_challenge_task("digits").load(0, None)


def test_no_overrun_does_not_start_a_step_that_would_cross_the_time_budget():
    plain, strict = Budget(time_s=1.0), Budget(time_s=1.0, no_overrun=True)
    assert plain.exhausted({"train_s": 0.5}, next_step_s=0.6) is None      # the old rule: the step starts
    assert strict.exhausted({"train_s": 0.5}, next_step_s=0.6) == "time"   # it would end at 1.1 s
    assert strict.exhausted({"train_s": 0.5}, next_step_s=0.4) is None
    assert "no_overrun" not in plain.to_dict() and strict.to_dict()["no_overrun"] is True


def test_a_run_stopped_by_the_time_budget_is_still_scored_on_the_test_split(digits):
    task, data = digits
    record, _ = run_once(task, get_recipe("baseline", task), Rules(time_budget_s=1e-3, runs=1), 0, data=data)
    assert record.stopped_by == "budget:time" and record.steps == 1  # the spent budget allows no second step
    assert record.method_metrics["challenge/split"] == "test"
    assert 0 <= record.method_metrics["challenge/accuracy"] <= 1


def test_test_data_never_reaches_training(digits):
    task, (train, test) = digits
    rules = Rules(time_budget_s=1e4, runs=1, max_steps=10)
    poisoned = TensorData(torch.randn_like(test.x) * 100, (test.y + 1) % 10)
    _, clean_model = run_once(task, fast(task), rules, 0, data=(train, test))
    record, poisoned_model = run_once(task, fast(task), rules, 0, data=(train, poisoned))
    assert record.stopped_by == "budget:steps"
    for a, b in zip(clean_model.state_dict().values(), poisoned_model.state_dict().values()):
        assert torch.equal(a, b)


def test_holdout_scores_a_part_of_the_training_split(digits):
    task, (train, test) = digits
    rules = Rules(time_budget_s=1e4, runs=1, holdout=0.2, max_steps=10)
    record, _ = run_once(task, fast(task), rules, 0, data=(train, TensorData(test.x[:0], test.y[:0])))
    assert record.method_metrics["challenge/split"] == "holdout"  # scored although the test split is empty


def test_score_is_the_mean_over_runs_and_every_record_is_kept(digits, tmp_path):
    task, data = digits
    doc = submit(task, get_recipe("baseline", task), Rules(time_budget_s=1e4, runs=3, max_steps=3), tmp_path, data=data)
    accs = [json.loads((tmp_path / f"run-{s}" / "record.json").read_text())["method_metrics"]["challenge/accuracy"]
            for s in range(3)]
    assert doc["score"]["mean"] == pytest.approx(sum(accs) / 3)
    assert doc["score"]["min"] == min(accs) and doc["score"]["max"] == max(accs)
    assert json.loads((tmp_path / "score.json").read_text())["score"] == doc["score"]
    assert score([0.5, 0.7])["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))


def test_leaderboard_appends_one_escaped_line_per_submission(tmp_path):
    doc = {"date": "2026-01-01", "submission": "a|b\n`x`", "task": "mnist5k", "time_budget_s": 10,
           "score": {"runs": 5, "mean": 0.9, "std": 0.01, "min": 0.88, "max": 0.91}, "machine": "cpu"}
    board = tmp_path / "board.md"
    append_leaderboard(board, doc)
    append_leaderboard(board, doc)
    lines = board.read_text().splitlines()
    assert sum(line.startswith("| 2026") for line in lines) == 2
    line = leaderboard_line(doc)
    assert "a\\|b" in line and "\n" not in line.rstrip("\n") and line.count(" | ") == 9


def _write_arrays(root, n_per_class=2, channels_last=True):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        x = rng.integers(0, 256, (10 * n_per_class, 32, 32, 3), dtype=np.uint8)
        np.save(root / f"{split}_x.npy", x if channels_last else x.transpose(0, 3, 1, 2))
        np.save(root / f"{split}_y.npy", np.repeat(np.arange(10), n_per_class))


def test_mini_imagenet10_from_numpy_arrays(tmp_path):
    _write_arrays(tmp_path)
    train, test = load_mini_imagenet10(0, str(tmp_path))
    assert train.x.shape == (20, 3, 32, 32) and test.y.tolist() == np.repeat(np.arange(10), 2).tolist()
    assert abs(float(train.x.mean())) < 1e-4  # normalized with the training split's statistics


def test_mini_imagenet10_refuses_pickled_arrays(tmp_path):
    _write_arrays(tmp_path)
    np.save(tmp_path / "train_y.npy", np.array([{"a": 1}] * 20, dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match="train_y.npy"):
        load_mini_imagenet10(0, str(tmp_path))


def test_mini_imagenet10_from_png_folders(tmp_path):
    import matplotlib.image as mpimg

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(10):
            folder = tmp_path / split / f"n{c:02d}"
            folder.mkdir(parents=True)
            mpimg.imsave(folder / "0.png", rng.random((32, 32, 3)))
    train, test = load_mini_imagenet10(0, str(tmp_path))
    assert train.x.shape == (10, 3, 32, 32) and sorted(test.y.tolist()) == list(range(10))


def test_fast_recipe_fits_the_task_and_refuses_non_image_tasks():
    assert fast("mnist5k").model_name == "fast-cnn" and not fast("mnist5k").augment  # no flips for digits
    natural = fast(get_challenge_task("mini-imagenet10"))
    assert natural.augment and natural.tta_flip
    with pytest.raises(ConfigError, match="mnist1d-seq"):
        fast("mnist1d-seq")


def test_label_smoothing_equals_torch_and_ema_moves_toward_the_weights():
    logits, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    ours = smoothed_loss(F.cross_entropy(logits, y), logits, 0.1)
    assert torch.allclose(ours, F.cross_entropy(logits, y, label_smoothing=0.1), atol=1e-6)
    avg, w = [torch.zeros(3)], [torch.ones(3)]
    ema_update(avg, w, 0.9)
    assert torch.allclose(avg[0], torch.full((3,), 0.1))


def test_cli_writes_score_and_leaderboard_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "sub"
    assert main(["challenge", "--task", "digits", "--recipe", "fast", "--time-budget", "0.5", "--runs", "1",
                 "--out", str(out), "--leaderboard", str(tmp_path / "board.md"), "--quiet"]) == 0
    assert json.loads((out / "score.json").read_text())["score"]["runs"] == 1
    assert (out / "record.json").exists() and (tmp_path / "board.md").read_text().count("| fast |") == 1
    for bad in (["--task", "nope"], ["--recipe", "slow"], ["--runs", "0"], ["--method", "nope"]):
        assert main(["challenge", *bad, "--out", str(tmp_path / "bad")]) == 2
        assert "nope" in capsys.readouterr().err or True
    assert not (tmp_path / "bad").exists()


class _SlowSteps(__import__("haet").Method):
    """Each step takes at least 100 ms; records the training clock after each step's budget check."""
    name = "slow_steps"

    def __init__(self):
        super().__init__()
        self.train_s: list[float] = []

    def after_step(self, state):
        __import__("time").sleep(0.1)

    def batch_end(self, state):
        self.train_s.append(state.clock.train_s)


def test_the_trainer_does_not_start_a_step_expected_to_cross_the_budget(trainer_factory):
    slow = _SlowSteps()
    budget = 2.0
    record = trainer_factory(methods=[slow], budget=Budget(time_s=budget, no_overrun=True)).fit(epochs=100)
    t = slow.train_s
    assert record.stopped_by == "budget:time" and len(t) == record.steps >= 2
    # It stopped because the next step, as long as the last one, would have ended past the budget ...
    assert t[-1] + (t[-1] - t[-2]) > budget
    # ... and not earlier: each step it started was expected to end within it (clock-reading slack 5 ms).
    for k in range(2, len(t)):
        assert t[k - 1] + (t[k - 1] - t[k - 2]) <= budget + 0.005
