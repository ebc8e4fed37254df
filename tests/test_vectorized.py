"""backend = "vectorized" against Flower's Simulation Engine: the same run, round by round.

The same small configuration runs through both backends with the same seeds; the global
model after every round (the checkpoints), every round's training and evaluation record
and the user-level epsilon must agree to float tolerance. The devices' own training is
also compared one by one against :func:`client.local.train_round`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import server.strategy as strategy_module
from client.local import client_key, evaluate_client, train_round
from common.config import ConfigError, fused_run_config, parse_run_config
from common.federation import slicer_cached
from common.models import build_model
from simulations.batched import BatchTrainer, device_round
from simulations.engine import run_in_process
from simulations.vectorized import Fleet, check_supported, run_vectorized

SMALL = {
    "dataset": "synthetic", "synthetic-users": 24, "synthetic-items": 120, "synthetic-mean-interactions": 15,
    "eval-negatives": 20, "model": "gmf", "num-server-rounds": 3, "clients-per-round": 10, "local-epochs": 2,
    "batch-size": 16, "evaluate-every": 1, "fraction-evaluate": 0.5, "checkpoint-every": 1, "report": False,
    "popular-items": 10,
}
# Differ by nature between two runs: wall times, and the random node ids Flower gives its SuperNodes.
TIMING_KEYS = {"round_seconds", "client_train_seconds", "train_seconds", "wall_seconds"}


class SeededGaussian:
    """The server's noise drawn from a fixed seed, so two runs add the same noise (test only)."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(1234)

    def normal(self, loc=0.0, scale=1.0, size=None):  # type: ignore[no-untyped-def]
        return self.rng.normal(loc, scale, size)


def run_both(tmp_path: Path, overrides: dict) -> tuple[Path, Path]:
    flower, fast = tmp_path / "flower", tmp_path / "vectorized"
    settings = {**SMALL, **overrides}
    config = parse_run_config(fused_run_config(settings))
    run_in_process({**settings, "run-dir": str(flower)}, len(slicer_cached(config)))
    run_vectorized({**settings, "run-dir": str(fast), "backend": "vectorized"})
    return flower, fast


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(flower: Path, fast: Path, rounds: int) -> None:
    for r in range(1, rounds + 1):
        with np.load(flower / "checkpoints" / f"round-{r:05d}.npz") as a, np.load(fast / "checkpoints" / f"round-{r:05d}.npz") as b:
            assert sorted(a.files) == sorted(b.files)
            for name in a.files:
                np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=2e-6, err_msg=f"round {r}: {name}")
    received = [json.loads((d / "received.json").read_text())["fields"] for d in (flower, fast)]
    assert received[1] == received[0]  # the same fields reached the server, in as many replies
    expected, got = rows(flower), rows(fast)
    assert [(r["round"], r["phase"]) for r in got] == [(r["round"], r["phase"]) for r in expected]
    for want, have in zip(expected, got, strict=True):
        assert set(have) == set(want), (want["round"], want["phase"], set(have) ^ set(want))
        for key, value in want.items():
            if key in TIMING_KEYS:
                continue
            if isinstance(value, float):
                assert math.isclose(have[key], value, rel_tol=1e-4, abs_tol=1e-6), (want["round"], key, have[key], value)
            else:
                assert have[key] == value, (want["round"], want["phase"], key)


def test_plain_gmf_same_model_and_metrics_each_round(tmp_path):
    flower, fast = run_both(tmp_path, {"eval-refit-epochs": 2})
    assert_same_run(flower, fast, 3)
    privacy = [json.loads((d / "privacy.json").read_text()) for d in (flower, fast)]
    assert privacy[0]["user_level"] is None and privacy[1]["user_level"] is None
    assert privacy[1]["transport"]["grid"] == "vectorized"


def test_mf_bpr_sgd_with_robust_aggregation_and_dropouts(tmp_path):
    flower, fast = run_both(tmp_path, {
        "model": "mf", "loss": "bpr", "local-optimizer": "sgd", "learning-rate": 0.05, "aggregation": "trimmed-mean",
        "trim-fraction": 0.2, "norm-bound": 0.05, "dropout-probability": 0.3, "late-join-fraction": 0.2,
        "local-epochs-min": 1, "local-epochs": 3,
    })
    assert_same_run(flower, fast, 3)
    fits = [r for r in rows(fast) if r["phase"] == "fit"]
    assert sum(r["clients_unavailable"] for r in fits) > 0  # the fleet really dropped devices


def test_user_dp_same_model_metrics_and_epsilon(tmp_path, monkeypatch):
    monkeypatch.setattr(strategy_module, "SecureGaussian", SeededGaussian)
    flower, fast = run_both(tmp_path, {
        "user-dp": True, "user-dp-noise-multiplier": 0.8, "user-dp-clipping-norm": 0.5, "user-dp-delta": 1e-3,
        "clients-per-round": 24, "dropout-probability": 0.2, "server-learning-rate": 1.0,
        "fraction-evaluate": 1.0,  # under user-dp Flower samples at random: every device, so both runs ask the same
    })
    assert_same_run(flower, fast, 3)
    eps = [[r["user_epsilon"] for r in rows(d) if r["phase"] == "fit"] for d in (flower, fast)]
    assert eps[0] == eps[1] and eps[1][-1] > 0


@pytest.mark.parametrize("lookup", [True, False])  # False: examples find their rows by a search of the sorted keys
@pytest.mark.parametrize("model,loss,optimizer", [("gmf", "bce", "adam"), ("mf", "mse", "adam"), ("gmf", "bpr", "sgd")])
def test_batched_devices_train_as_each_device_alone(model, loss, optimizer, lookup, monkeypatch):
    if not lookup:
        monkeypatch.setattr("simulations.batched._LOOKUP_ENTRIES", 0)
    settings = {**SMALL, "model": model, "loss": loss, "local-optimizer": optimizer, "local-epochs": 3,
                "user-learning-rate": 0.01, "shared-adam-epsilon": 1e-3}
    config = parse_run_config(fused_run_config(settings))
    fleet = Fleet(config, fused_run_config(settings))
    shared = build_model(config.model_config, 0, fleet.slicer.prepared.num_items, seed=config.seed).shared_state()
    partitions = list(range(8))
    plans = [device_round(fleet.data(p), config.train_config, [config.seed, 4, client_key(fleet.data(p))],
                          fleet.rows_of(p)) for p in partitions]
    assert len({plan.steps for plan in plans}) > 1  # devices of different lengths step together
    trained = BatchTrainer(config.model_config, config.train_config, dict(shared), plans).run()
    for partition, result in zip(partitions, trained, strict=True):
        alone = train_round(config.model_config, config.train_config, fleet.data(partition), list(shared.values()),
                            None, seed=config.seed, server_round=4)
        for name, rows_after in result.user_after.items():
            np.testing.assert_allclose(rows_after, alone.local_state[name], rtol=1e-5, atol=1e-6)
        for index, name in enumerate(shared):
            delta = alone.upload[index]
            if name.startswith("item_"):
                np.testing.assert_allclose(delta[result.item_rows], result.items_after[name] - shared[name][result.item_rows],
                                           rtol=1e-4, atol=1e-6)
            else:
                np.testing.assert_allclose(delta, result.dense_after[name].reshape(delta.shape) - shared[name],
                                           rtol=1e-4, atol=1e-6)
        assert math.isclose(result.loss, alone.metrics["train_loss"], rel_tol=1e-5)


def test_batched_refit_matches_device_evaluation():
    settings = {**SMALL, "eval-refit-epochs": 3}
    run_config = fused_run_config(settings)
    config = parse_run_config(run_config)
    fleet = Fleet(config, run_config)
    shared = list(build_model(config.model_config, 0, fleet.slicer.prepared.num_items, seed=config.seed).shared_state().values())
    refitted = fleet._refitted_rows([0, 1, 2, 3], shared)
    for partition in range(4):
        alone = evaluate_client(config.model_config, fleet.data(partition), shared, None, seed=config.seed,
                                refit=config.refit_config)
        _, _, metrics = fleet._client(partition, refitted[partition]).evaluate(shared, {})
        for key, value in alone.items():
            if isinstance(value, float):
                assert math.isclose(metrics[key], value, rel_tol=1e-5, abs_tol=1e-7), key


@pytest.mark.parametrize("override,named", [
    ({"model": "neumf"}, "model"), ({"secure-aggregation": True}, "secure-aggregation"),
    ({"record-dp": True}, "record-dp"), ({"round-deadline": 5.0}, "round-deadline"),
    ({"strategy": "fedprox"}, "proximal-mu"), ({"item-features": True}, "item-features"),
])
def test_unsupported_combinations_are_refused_with_one_line(override, named):
    config = parse_run_config(fused_run_config({**SMALL, **override}))
    with pytest.raises(ConfigError) as refused:
        check_supported(config)
    message = str(refused.value)
    assert "vectorized" in message and named in message and "\n" not in message


def test_simulate_refuses_an_unsupported_backend_combination_with_exit_2(tmp_path, capsys):
    from simulations.cli import main

    code = main(["simulate", "--backend", "vectorized", "--model", "neumf", "--rounds", "1", "--run-dir",
                 str(tmp_path / "run"), "-c", "synthetic-users=24 synthetic-items=120 eval-negatives=20 report=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "backend = 'vectorized'" in err[0] and "model" in err[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before any round
