"""The one Ray test of haet rl: two Ray actors learn CartPole, and a killed actor ends the run with
an error record instead of a hang. Ray starts once for both (temp files in a short folder)."""

from __future__ import annotations

import shutil
import tempfile

import pytest

from haet.core.budget import Budget
from haet.rl import RLConfig, Until, train

ray = pytest.importorskip("ray")


@pytest.mark.ray
def test_ray_two_actors_learn_cartpole_and_a_killed_actor_is_an_error(monkeypatch):
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # present behaviour, without its warning
    temp = tempfile.mkdtemp(prefix="haet-ray-test-")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, logging_level="ERROR", log_to_driver=False)
    try:
        config = RLConfig(env="CartPole-v1", backend="ray", actors=2, actor_precision="int8", policy_width=64,
                          policy_depth=2, seed=0, eval_every=2000, actor_timeout_s=60)
        record = train(config, budget=Budget(steps=8000), until=Until(195.0))
        assert record.stopped_by == "target", (record.error, record.history)
        assert record.metrics["return"] >= 195.0 and record.metrics["eval_episodes"] == 20
        mm = record.method_metrics
        assert mm["rl/broadcast_bytes"] == mm["rl/payload_bytes"] * 2 * mm["rl/broadcasts"]
        assert mm["rl/inference_s"] > 0 and mm["rl/env_s"] > 0

        def kill_first_actor(progress):
            actors = progress["backend"].actors
            if actors:
                ray.kill(actors[0])

        crashed = train(RLConfig(env="CartPole-v1", backend="ray", actors=2, policy_width=16, policy_depth=1,
                                 seed=0, actor_timeout_s=60),
                        budget=Budget(steps=100_000), on_round=kill_first_actor)
        assert crashed.stopped_by == "error"
        assert "actor 0 died" in crashed.error
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
