"""backend = "vectorized" with model = "als" against Flower's Simulation Engine: the same run, round by round.

Federated ALS and Private ALS (user-level DP, server noise from a fixed seed) run through
both backends with the same small configuration and seeds; the item factors after every
round, every ``metrics.jsonl`` row (epsilon included) and the reply fields the server
received must agree. The compact storage of uploads must give the very bytes Flower writes.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays

import server.strategy as strategy_module
from simulations.batched_als import CompactTensors
from tests.test_vectorized import SeededGaussian, assert_same_run, rows, run_both

ALS = {"model": "als", "embedding-dim": 4, "evaluate-every": 1, "fraction-evaluate": 0.5}
PRIVATE_ALS = {
    **ALS, "num-server-rounds": 2, "user-dp": True, "client-sampling": "poisson", "fraction-train": 1.0, "clients-per-round": 0,
    "user-dp-noise-multiplier": 1.0, "user-dp-clipping-norm": 0.5, "user-dp-delta": 1e-3, "als-max-items": 6,
    "fraction-evaluate": 1.0,  # under user-dp Flower samples at random: every device, so both runs ask the same
}


def test_plain_als_same_item_factors_and_metrics_each_round(tmp_path):
    flower, fast = run_both(tmp_path, {**ALS, "clients-per-round": 20, "dropout-probability": 0.2})
    assert_same_run(flower, fast, 3)
    fits = [r for r in rows(fast) if r["phase"] == "fit"]
    assert sum(r["clients_unavailable"] for r in fits) > 0  # the fleet really dropped devices
    assert all(r["clients_ok"] > 0 for r in fits)


def test_private_als_same_item_factors_metrics_and_epsilon(tmp_path, monkeypatch):
    monkeypatch.setattr(strategy_module, "SecureGaussian", SeededGaussian)
    flower, fast = run_both(tmp_path, PRIVATE_ALS)
    assert_same_run(flower, fast, 2)
    eps = [[r["user_epsilon"] for r in rows(d) if r["phase"] == "fit"] for d in (flower, fast)]
    assert eps[0] == eps[1] and eps[1][-1] > 0
    privacy = json.loads((fast / "privacy.json").read_text())
    assert privacy["transport"]["grid"] == "vectorized" and privacy["user_level"] is not None


def test_compact_uploads_serialize_to_the_bytes_flower_writes():
    rng = np.random.default_rng(0)
    sparse = np.zeros(1000, np.float32)
    sparse[rng.choice(1000, 40, replace=False)] = rng.normal(size=40)
    sparse[7] = -0.0  # a negative zero is not a zero to the bytes
    arrays = [sparse, np.ones(50, np.float32), rng.normal(size=(6, 3)).astype(np.float16), np.zeros(0, np.float32),
              np.zeros((4, 4), np.float64)]
    expected = ndarrays_to_parameters(arrays).tensors
    compact = CompactTensors(arrays)
    assert len(compact) == len(expected)
    assert list(compact) == expected and [compact[i] for i in range(len(arrays))] == expected
    assert compact[1:3] == expected[1:3]
    decoded = parameters_to_ndarrays(Parameters(compact, "numpy.ndarray"))  # type: ignore[arg-type]
    for got, want in zip(decoded, arrays, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
        np.testing.assert_array_equal(got, want)
