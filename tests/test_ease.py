"""Federated EASE through the real Flower path: the weights are the centralized closed form.

A device uploads only the upper triangle of its own item-item Gram; the server's closed form
on the sum must be the centralized EASE on the same training data, in the clear and under
SecAgg+, and the devices' evaluation of it must read what the centralized evaluation reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common import ease
from common.config import ConfigError, parse_run_config
from common.federation import prepare
from server.run_dir import load_checkpoint
from simulations import yardsticks
from simulations.baselines import run_ease
from simulations.engine import fused_run_config
from simulations.vectorized import check_supported
from tests.test_federated import field_table, simulate

TINY_EASE = {
    "model": "ease",
    "synthetic-users": 16,
    "synthetic-items": 40,
    "synthetic-mean-interactions": 10,
    "eval-negatives": 10,
    "num-server-rounds": 1,
    "fraction-train": 1.0,
    "evaluate-every": 1,
    "checkpoint-every": 1,
    "ease-lambda": 3.0,  # small data: a small lambda, so B is far from zero and the check is sharp
}


def _centralized(overrides: dict) -> tuple[np.ndarray, object]:
    """The yardstick's B on the run's own training split, and the prepared data."""
    config = parse_run_config(fused_run_config(overrides))
    prepared = prepare(config)
    train = prepared.split.train
    matrix = yardsticks.interaction_matrix(train.users, train.items, prepared.num_users, prepared.num_items)
    return yardsticks.ease_weights(matrix, config.ease_lambda), prepared


def _federated_weights(run_dir: str) -> np.ndarray:
    """B as the server solved it (the shared table is B^T)."""
    _, model = load_checkpoint(Path(run_dir) / "checkpoints" / "final.npz")
    return model["item_embedding.weight"].T


def _final_evaluation(run_dir: str) -> dict:
    import json

    return json.loads((Path(run_dir) / "summary.json").read_text())["final_evaluation"]


def test_federated_ease_is_the_centralized_ease_and_each_upload_is_the_device_gram(tmp_path):
    """Rounds of 6 devices add up (6 + 6 + 4), each device once; the fourth round finds none left."""
    overrides, replies = simulate(tmp_path, {**TINY_EASE, "clients-per-round": 6, "num-server-rounds": 4,
                                             "evaluate-every": 5})
    expected, prepared = _centralized(overrides)
    federated = _federated_weights(overrides["run-dir"])
    assert np.abs(expected).max() > 0.05, "a non-trivial B"
    np.testing.assert_allclose(federated, expected, rtol=1e-5, atol=1e-7)
    # What each device really sent: one array, exactly the Gram of one user's training items.
    uploads = [r["arrays"]["fitres.parameters"] for r in replies if r["type"] == "train"]
    assert len(uploads) == prepared.num_users, "each device adds its Gram exactly once"
    assert all(len(arrays) == 1 for arrays in uploads), "the Gram alone: no separate item list"
    train = prepared.split.train
    users = {tuple(np.unique(train.items[train.users == u])) for u in range(prepared.num_users)}
    sent = set()
    for (gram,) in uploads:
        items = np.flatnonzero(ease.gram_diagonal(gram, prepared.num_items))
        np.testing.assert_array_equal(gram, ease.device_gram([items], prepared.num_items))
        sent.add(tuple(items))
    assert sent == users, "every device uploaded its own Gram, and only that"
    # The devices' evaluation of x_u B reads what the centralized evaluation reads.
    config = parse_run_config(fused_run_config(overrides))
    central = run_ease(prepared, lam=config.ease_lambda).test
    final = _final_evaluation(overrides["run-dir"])
    for metric in ("sampled_hr@10", "sampled_ndcg@10", "full_hr@10", "full_ndcg@10"):
        assert final[f"test_{metric}"] == pytest.approx(central[metric], abs=1e-9), metric


def test_federated_ease_under_secagg_is_the_centralized_ease_and_sends_only_masked_vectors(tmp_path):
    overrides, replies = simulate(tmp_path, {**TINY_EASE, "secure-aggregation": True, "clients-per-round": 8,
                                             "num-server-rounds": 2, "evaluate-every": 5})
    expected, _ = _centralized(overrides)
    np.testing.assert_allclose(_federated_weights(overrides["run-dir"]), expected, rtol=1e-5, atol=1e-7)
    train = [r for r in replies if r["type"] == "train"]
    assert train and all(not any(r["arrays"].values()) for r in train), "no Gram travels as a plain array"
    masked = field_table(replies)[("train", "collect_masked_vectors")]
    assert "secaggplus_configs/masked_params" in masked
    assert not [key for key in masked if key.startswith("fitres.parameters")]


def test_the_server_solve_rounds_away_secagg_error_below_half_a_count():
    rng = np.random.default_rng(0)
    lists = [rng.choice(12, size=5, replace=False) for _ in range(9)]
    total = sum(ease.device_gram([items], 12) for items in lists)
    noisy = total + rng.uniform(-0.49, 0.49, total.shape)
    exact = ease.solve_from_sum(total, 12, 2.0)
    np.testing.assert_array_equal(ease.solve_from_sum(noisy, 12, 2.0), exact)
    np.testing.assert_array_equal(ease.gram_diagonal(total, 12), np.bincount(np.concatenate(lists), minlength=12))


def test_a_kiosk_gram_counts_its_users():
    gram = ease.symmetric_gram(ease.device_gram([np.array([0, 2]), np.array([2, 3, 3])], 4), 4)
    expected = np.zeros((4, 4))
    for items in ([0, 2], [2, 3]):
        expected[np.ix_(items, items)] += 1
    np.testing.assert_array_equal(gram, expected)


@pytest.mark.parametrize("conflict", [
    {"user-dp": True}, {"record-dp": True}, {"strategy": "fedadam"}, {"item-features": True},
    {"aggregation": "median"}, {"popularity": "positives"}, {"transport-dtype": "float16"}, {"resume": True},
    {"secure-aggregation": True, "partitioning": "group", "users-per-client": 20},
    {"secure-aggregation": True, "secagg-quantization-range": 65536},
])
def test_ease_refuses_settings_it_cannot_honour(conflict):
    with pytest.raises(ConfigError, match="^model 'ease' needs "):
        parse_run_config(fused_run_config({"model": "ease", **conflict}))


def test_the_vectorized_backend_refuses_ease():
    with pytest.raises(ConfigError, match="model = 'ease'"):
        check_supported(parse_run_config(fused_run_config({"model": "ease"})))


def test_a_deployment_refuses_plain_ease_uploads_unless_told():
    """A plain EASE upload names its user's items (the Gram's diagonal): the deployment guard applies to it too."""
    from server.server_app import check_deployment

    with pytest.raises(ConfigError, match="secure-aggregation = true"):
        check_deployment(parse_run_config(fused_run_config({"model": "ease"})), simulated=False)
    check_deployment(parse_run_config(fused_run_config({"model": "ease", "secure-aggregation": True})), simulated=False)
