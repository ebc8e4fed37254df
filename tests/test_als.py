"""Federated ALS through the real Flower path: exactness, the per-user bound under user-dp, SecAgg+.

The item factors of a run in which every device takes part every round must be the
centralized exact ALS sweeps (simulations.yardsticks) from the same start; under user-level
DP every upload a device really sent must lie within the clipping norm the accountant assumes;
under SecAgg+ the server must receive nothing but masked vectors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common import als
from common.config import ConfigError, parse_run_config
from common.federation import prepare
from common.models import build_model
from server.run_dir import load_checkpoint
from simulations import yardsticks
from simulations.engine import fused_run_config
from tests.test_federated import field_table, simulate

TINY_ALS = {
    "model": "als",
    "synthetic-users": 16,
    "synthetic-items": 60,
    "synthetic-mean-interactions": 10,
    "eval-negatives": 10,
    "embedding-dim": 4,
    "num-server-rounds": 3,
    "evaluate-every": 5,
    "checkpoint-every": 1,
}
PRIVATE_ALS = {
    **TINY_ALS,
    "num-server-rounds": 2,
    "user-dp": True,
    "client-sampling": "poisson",
    "fraction-train": 1.0,
    "user-dp-noise-multiplier": 1.0,
    "user-dp-clipping-norm": 0.5,
    "als-max-items": 6,
}


def _final_items(run_dir: str) -> np.ndarray:
    _, model = load_checkpoint(Path(run_dir) / "checkpoints" / "final.npz")
    return model["item_embedding.weight"]


def _statistics(replies) -> list[np.ndarray]:
    """The statistics vector of every plain training reply."""
    return [r["arrays"]["fitres.parameters"][0] for r in replies if r["type"] == "train"]


def test_federated_als_is_the_centralized_exact_als(tmp_path):
    overrides, replies = simulate(tmp_path, TINY_ALS)
    config = parse_run_config(fused_run_config(overrides))
    prepared = prepare(config)
    train = prepared.split.train
    matrix = yardsticks.interaction_matrix(train.users, train.items, prepared.num_users, prepared.num_items)
    items = build_model(config.model_config, 0, prepared.num_items, seed=config.seed).shared_state()
    items = items["item_embedding.weight"]
    for _ in range(config.num_server_rounds):  # the server keeps (and sends) float32 item factors
        _, items = yardsticks.als_exact_sweep(matrix, matrix.T.tocsr(), items)
        items = items.astype(np.float32)
    federated = _final_items(overrides["run-dir"])
    assert np.abs(items).max() > 0.05, "the sweeps moved the factors away from their 0.01-scale start"
    np.testing.assert_allclose(federated, items, rtol=1e-4, atol=1e-6)
    uploads = _statistics(replies)
    assert len(uploads) == config.num_server_rounds * prepared.num_users, "every device, every round"
    assert {u.shape for u in uploads} == {(als.statistics_size(prepared.num_items, config.embedding_dim),)}


def test_every_real_private_upload_is_within_the_clip_the_accountant_assumes(tmp_path):
    overrides, replies = simulate(tmp_path, PRIVATE_ALS)
    clip = PRIVATE_ALS["user-dp-clipping-norm"]
    uploads = [r["arrays"]["fitres.parameters"] for r in replies if r["type"] == "train"]
    assert uploads, "the devices trained"
    norms = np.array([np.linalg.norm(arrays[0].astype(np.float64)) for arrays in uploads])
    # The accountant's sensitivity: one vector of norm <= C per user (a user is added or removed).
    assert norms.max() <= clip * (1 + 1e-6)
    # The bound is used, not wasted: a unit factor with k items gives at least ~0.8 C by construction.
    assert norms.min() >= 0.75 * clip
    for arrays in uploads:
        np.testing.assert_array_equal(arrays[1], 1.0)  # the touched vector says nothing about the user's items
    metrics = {key for r in replies if r["type"] == "train" for key in r["configs"]["fitres.metrics"]}
    assert metrics <= {"train_seconds", "upload_bytes", "download_bytes"}


def test_bounded_statistics_hold_the_bound_for_any_data():
    """Whatever the item factors (scale, direction) and however many items: norm <= clip."""
    rng = np.random.default_rng(0)
    num_items, factors, clip = 300, 6, 0.7
    for scale in (1e-3, 1.0, 1e3):
        y = rng.standard_normal((num_items, factors)) * scale
        for count, cap in ((1, 0), (40, 0), (300, 0), (300, 25)):
            items = rng.choice(num_items, size=count, replace=False)
            stats = als.private_statistics(y, items, num_items, clip, cap, rng)
            assert np.linalg.norm(stats) <= clip * (1 + 1e-12)
            counts = stats[als.triangle_size(factors) : als.triangle_size(factors) + num_items]
            kept = np.count_nonzero(counts)
            assert kept == (min(count, cap) if cap else count), "the cap is what the device uploads"


def test_secure_aggregation_with_user_dp_sends_only_masked_vectors(tmp_path):
    overrides, replies = simulate(tmp_path, {**PRIVATE_ALS, "secure-aggregation": True})
    train = [r for r in replies if r["type"] == "train"]
    assert not [r for r in replies if r["type"] == "evaluate"], "no evaluation reply in the clear"
    assert all(not any(r["arrays"].values()) for r in train), "no statistics travel as plain arrays"
    table = field_table(replies)
    masked = table[("train", "collect_masked_vectors")]
    assert masked == {"secaggplus_configs/masked_params", "fitres.num_examples/num_examples", "fitres.status/code",
                      "fitres.status/message", "fitres.metrics/train_seconds", "fitres.metrics/upload_bytes",
                      "fitres.metrics/download_bytes"}
    stages = {stage for _, stage in table}
    assert stages == {"setup", "share_keys", "collect_masked_vectors", "unmask", "collect_masked_vectors (evaluation)"}
    items = _final_items(overrides["run-dir"])
    assert np.all(np.isfinite(items)) and np.abs(items).max() > 0


@pytest.mark.parametrize("conflict", [{"strategy": "fedadam"}, {"record-dp": True}, {"secure-aggregation": True}])
def test_als_refuses_settings_it_cannot_honour(conflict):
    with pytest.raises(ConfigError, match="model 'als' needs"):
        parse_run_config(fused_run_config({"model": "als", **conflict}))
