"""Item-promotion poisoning on a small synthetic fleet: the attack works, and a defense stops it."""

import json

import pytest

from common.config import parse_run_config
from common.federation import slicer_cached
from common.models import ModelConfig
from simulations.engine import fused_run_config, run_in_process
from simulations.poisoning import (
    DEFENSES,
    align_target_rows,
    attack_app,
    fake_profile,
    item_table_indices,
    unpopular_target,
)

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


def test_alignment_moves_only_the_target_rows_to_a_multiple_of_the_popular_mean():
    import numpy as np

    rng = np.random.default_rng(0)
    shared = [rng.normal(size=(6, 3)).astype(np.float32), rng.normal(size=(1, 3)).astype(np.float32)]
    trained = [rng.normal(size=(6, 3)).astype(np.float32), rng.normal(size=(1, 3)).astype(np.float32),
               np.array([1, 1, 0, 0, 0, 0], np.float32)]
    poisoned = align_target_rows(shared, trained, [0], target=4, anchors=np.array([0, 1]), scale=3.0)
    np.testing.assert_allclose(shared[0][4] + poisoned[0][4], 3.0 * shared[0][[0, 1]].mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(np.delete(poisoned[0], 4, axis=0), np.delete(trained[0], 4, axis=0))
    np.testing.assert_array_equal(poisoned[1], trained[1])  # the dense output layer stays as trained
    assert poisoned[2].tolist() == [1, 1, 0, 0, 1, 0], "the target row is marked touched"
    assert trained[2][4] == 0, "the trained upload itself is not modified"


def test_item_tables_are_found_by_the_naming_rule():
    assert item_table_indices(ModelConfig("gmf", embedding_dim=4), 10) == [0]
    assert len(item_table_indices(ModelConfig("mf", embedding_dim=4), 10)) == 2  # item embedding and item bias
    assert len(item_table_indices(ModelConfig("neumf", embedding_dim=4), 10)) == 2  # GMF and MLP item embeddings


def test_fake_users_promote_the_target_and_the_median_keeps_it_out(tmp_path):
    clean = _final(tmp_path, "clean", "none", 0)
    attacked = _final(tmp_path, "attacked", "none", 10)
    defended = _final(tmp_path, "median", "median", 10)
    assert attacked["test_count"] == clean["test_count"] == 40, "fake devices never count as evaluated users"
    assert clean["exposure_er@10"] < 0.3
    assert attacked["exposure_er@10"] > clean["exposure_er@10"] + 0.3, "the attack must promote the target"
    assert defended["exposure_er@10"] < attacked["exposure_er@10"] - 0.3
    assert defended["exposure_er@10"] == pytest.approx(clean["exposure_er@10"], abs=0.25)
