"""Item-promotion poisoning on a small synthetic fleet: the attack works, and a defense stops it."""

import json

import pytest

from common.config import parse_run_config
from common.federation import slicer_cached
from simulations.engine import fused_run_config, run_in_process
from simulations.poisoning import DEFENSES, attack_app, fake_profile, unpopular_target

FLEET = {
    "synthetic-users": 40, "synthetic-items": 200, "synthetic-mean-interactions": 15, "num-server-rounds": 8,
    "local-epochs": 2, "server-learning-rate": 2.0, "evaluate-every": 100, "checkpoint-every": 100, "report": False,
    "shared-adam-epsilon": 1e-3,
}


def _final(tmp_path, name, defense, num_fake):
    overrides = {**FLEET, **DEFENSES[defense], "run-dir": str(tmp_path / name)}
    config = parse_run_config(fused_run_config(overrides))
    target = unpopular_target(config)
    overrides["exposure-item"] = target
    num_honest = len(slicer_cached(config))
    run_in_process(overrides, num_honest + num_fake, client_app=attack_app(num_honest, target, boost=30.0, filler=10))
    return json.loads((tmp_path / name / "summary.json").read_text())["final_evaluation"]


def test_fake_profile_is_the_target_plus_the_published_popular_items():
    import numpy as np

    profile = fake_profile(7, np.array([3, 7, 1, 4]), filler=2, num_items=10, rng=np.random.default_rng(0))
    assert sorted(profile.train_items.tolist()) == [1, 3, 7]
    assert profile.num_users == 1 and len(profile.test.users) == 0


def test_fake_users_promote_the_target_and_the_median_keeps_it_out(tmp_path):
    clean = _final(tmp_path, "clean", "none", 0)
    attacked = _final(tmp_path, "attacked", "none", 10)
    defended = _final(tmp_path, "median", "median", 10)
    assert attacked["test_count"] == clean["test_count"] == 40, "fake devices never count as evaluated users"
    assert clean["exposure_er@10"] < 0.3
    assert attacked["exposure_er@10"] > clean["exposure_er@10"] + 0.3, "the attack must promote the target"
    assert defended["exposure_er@10"] < attacked["exposure_er@10"] - 0.3
    assert defended["exposure_er@10"] == pytest.approx(clean["exposure_er@10"], abs=0.25)
