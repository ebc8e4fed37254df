"""User-level DP: accounting from the run's own parameters, clipping, noise, budget stop, sampling."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.supercore.differential_privacy import get_norm

from client.local import train_round
from common.config import ConfigError, parse_run_config
from common.federation import slicer_cached
from common.privacy import UserLevelDP
from common.updates import UpdateLayout, encode_update
from server.run_dir import RunRecorder, load_checkpoint
from server.server_app import plan_rounds, user_level_dp
from server.strategy import FedRecStrategy, check_clipped
from simulations.engine import fused_run_config, run_in_process

RELATION = dp_accounting.NeighboringRelation


def _independent_epsilon(event, rounds, delta, accountant, relation):
    """dp-accounting composed round by round, the way a reviewer would check it by hand."""
    acc = rdp.RdpAccountant(neighboring_relation=relation) if accountant == "rdp" else pld.PLDAccountant(relation)
    for _ in range(rounds):
        acc.compose(event)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_poisson_epsilon_equals_dp_accounting_round_by_round(accountant):
    dp = UserLevelDP(1.1, 0.5, num_clients=943, sampling="poisson", sampling_rate=0.1)
    event = dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.1))
    for rounds in ((1, 10) if accountant == "rdp" else (1, 3)):
        expected = _independent_epsilon(event, rounds, 1e-5, accountant, RELATION.ADD_OR_REMOVE_ONE)
        assert dp.epsilon(rounds, accountant) == pytest.approx(expected, rel=1e-6)


def test_fixed_size_sampling_is_accounted_without_replacement_with_doubled_sensitivity():
    dp = UserLevelDP(2.0, 1.0, num_clients=500, sampling="fixed", sample_size=50, delta=1e-4)
    # Replace-one neighbours: the sum moves by up to 2C, so the noise is z / 2 sensitivities.
    event = dp_accounting.SampledWithoutReplacementDpEvent(500, 50, dp_accounting.GaussianDpEvent(1.0))
    expected = _independent_epsilon(event, 4, 1e-4, "rdp", RELATION.REPLACE_ONE)
    assert dp.epsilon(4) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="Poisson sampling only"):
        dp.epsilon(4, "pld")


def test_sampling_amplification_is_counted():
    """The issue's figure: q=0.01, z=1, 1000 rounds is about 2.1, not the 655 of no amplification."""
    dp = UserLevelDP(1.0, 1.0, num_clients=10_000, sampling="poisson", sampling_rate=0.01, delta=1e-5)
    assert 1.8 < dp.epsilon(1000) < 2.3
    unamplified = rdp.RdpAccountant()
    unamplified.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.0), 1000))
    assert unamplified.get_epsilon(1e-5) == pytest.approx(655, rel=0.01)


def test_max_rounds_is_the_last_round_within_budget():
    dp = UserLevelDP(1.0, 1.0, num_clients=943, sampling="poisson", sampling_rate=0.1)
    allowed = dp.max_rounds(3.0, upper=10_000)
    assert dp.epsilon(allowed) <= 3.0 < dp.epsilon(allowed + 1)
    assert dp.max_rounds(1e-6) == 0


def _config(**overrides):
    return parse_run_config(fused_run_config(overrides))


def test_run_config_builds_the_mechanism_that_runs_and_plans_the_budget_stop():
    config = _config(**{"user-dp": True, "client-sampling": "poisson", "clients-per-round": 20,
                        "num-server-rounds": 500, "user-dp-epsilon-budget": 2.0})
    dp = user_level_dp(config, num_clients=200)
    assert dp.sampling == "poisson" and dp.sampling_rate == pytest.approx(0.1) and dp.target_delta == 1e-5
    rounds, reason = plan_rounds(config, dp)
    assert rounds == dp.max_rounds(2.0, upper=500) < 500
    assert f"stopped after {rounds} of 500 rounds" in reason and "> budget 2.0" in reason
    fixed = user_level_dp(_config(**{"user-dp": True, "clients-per-round": 20}), num_clients=200)
    assert fixed.sampling == "fixed" and fixed.sample_size == 20
    assert plan_rounds(_config(**{"user-dp": True}), fixed)[0] == _config().num_server_rounds


def test_user_dp_config_is_validated():
    with pytest.raises(ConfigError, match="Poisson sampling only"):
        _config(**{"user-dp": True, "user-dp-accountant": "pld"})
    with pytest.raises(ConfigError, match="user-dp-noise-multiplier > 0"):
        _config(**{"user-dp": True, "user-dp-noise-multiplier": 0.0})
    with pytest.raises(ConfigError, match="client-sampling"):
        _config(**{"client-sampling": "uniform"})


def test_device_clips_its_update_and_sends_a_data_independent_touched_vector():
    config = _config(**{"synthetic-users": 20, "synthetic-items": 60, "eval-negatives": 20, "local-epochs": 3})
    data = slicer_cached(config).client(0)
    from common.models import build_model

    shared = list(build_model(config.model_config, 0, data.num_items, seed=1).shared_state().values())
    common = dict(seed=3, server_round=1)
    free = train_round(config.model_config, config.train_config, data, shared, None, **common)
    clipped = train_round(config.model_config, config.train_config, data, shared, None, clipping_norm=0.05, **common)
    assert get_norm(free.upload[:-1]) > 0.05, "the test needs an update the clip actually shortens"
    assert get_norm(clipped.upload[:-1]) == pytest.approx(0.05, rel=1e-5)
    assert clipped.metrics["update_norm_before_clipping"] == pytest.approx(get_norm(free.upload[:-1]), rel=1e-5)
    assert np.all(clipped.upload[-1] == 1.0)
    # Same direction: clipping scales, it does not change what was learned.
    scale = 0.05 / get_norm(free.upload[:-1])
    np.testing.assert_allclose(clipped.upload[0], free.upload[0] * scale, rtol=1e-4, atol=1e-7)


GLOBAL = OrderedDict(item_embedding=np.zeros((50, 4), np.float32), output=np.zeros(3, np.float32))
LAYOUT = UpdateLayout.from_state(GLOBAL, ["item_embedding"], num_items=50)


def _dp_strategy(tmp_path, **overrides):
    config = _config(**{"user-dp": True, "min-train-clients": 1, "server-learning-rate": 1.0, **overrides})
    dp = user_level_dp(config, num_clients=10)
    recorder = RunRecorder(tmp_path / "run", {}, checkpoint_every=10)
    return FedRecStrategy(config, LAYOUT, list(GLOBAL.values()), recorder, user_dp=dp), dp


def _upload(value):
    after = {"item_embedding": np.full((50, 4), value, np.float32), "output": np.full(3, value, np.float32)}
    upload = encode_update(LAYOUT, GLOBAL, after, np.arange(50), rowwise=False)
    return upload


def test_server_adds_noise_of_std_z_c_to_the_sum_and_divides_by_the_expected_count(tmp_path):
    strategy, dp = _dp_strategy(
        tmp_path, **{"user-dp-noise-multiplier": 2.0, "user-dp-clipping-norm": 0.5, "clients-per-round": 4}
    )
    strategy.noise_rng = np.random.default_rng(0)
    mean = [np.full((50, 4), 0.01), np.full(3, 0.01), np.ones(50)]
    noisy = strategy._privatize(mean, num_clients=4, server_round=2)
    assert dp.expected_clients == 4
    residual = np.concatenate([(noisy[0] - 0.01).ravel(), (noisy[1] - 0.01).ravel()])
    # noise on the sum has std z*C = 1.0; divided by 4 expected clients: 0.25
    assert np.std(residual) == pytest.approx(0.25, rel=0.15)
    assert np.all(noisy[-1] == 1.0)


def test_server_rejects_plain_updates_that_are_not_clipped(tmp_path):
    strategy, _ = _dp_strategy(tmp_path, **{"user-dp-clipping-norm": 0.1})
    small, large = _upload(0.001), _upload(0.5)
    assert get_norm(small[:-1]) < 0.1 < get_norm(large[:-1])
    results = [
        (SimpleNamespace(node_id=i), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(u), 1, {}))
        for i, u in enumerate((small, large))
    ]
    valid, rejected = strategy._validated(results)
    assert [p.node_id for p, _ in valid] == [0] and rejected["clipping"] == 1 and sum(rejected.values()) == 1
    with pytest.raises(ValueError, match="touched vector must be all ones"):
        check_clipped(encode_update(LAYOUT, GLOBAL, GLOBAL, np.array([1, 2])), 1.0)


def test_poisson_sampler_draws_each_client_with_the_accountants_rate(tmp_path):
    strategy, dp = _dp_strategy(tmp_path, **{"client-sampling": "poisson", "fraction-train": 0.3})
    strategy.sampling_rng = np.random.default_rng(1)
    proxies = {str(i): SimpleNamespace(cid=str(i), node_id=i) for i in range(10)}
    manager = SimpleNamespace(wait_for=lambda n: True, all=lambda: proxies)
    rounds = 2000
    counts = np.zeros(10)
    sizes = []
    for _ in range(rounds):
        chosen = strategy._sample_poisson(manager)
        sizes.append(len(chosen))
        for proxy in chosen:
            counts[proxy.node_id] += 1
    rate = counts / rounds
    # Binomial(2000, 0.3): std of the rate is ~0.010; 5 sigma.
    assert np.all(np.abs(rate - dp.sampling_rate) < 0.05)
    assert np.var(sizes) == pytest.approx(10 * 0.3 * 0.7, rel=0.2), "round sizes vary like Binomial(N, q)"


SMALL = {
    "synthetic-users": 12, "synthetic-items": 80, "eval-negatives": 20, "synthetic-mean-interactions": 10,
    "num-server-rounds": 3, "evaluate-every": 3, "fraction-evaluate": 1.0, "checkpoint-every": 3,
    "embedding-dim": 8, "min-train-clients": 1,
}


def _run(tmp_path: Path, name: str, overrides: dict) -> Path:
    run_dir = tmp_path / name
    overrides = {**SMALL, "run-dir": str(run_dir), **overrides}
    run_in_process(overrides, len(slicer_cached(parse_run_config(fused_run_config(overrides)))))
    return run_dir


def _final(run_dir: Path) -> dict[str, np.ndarray]:
    return load_checkpoint(run_dir / "checkpoints" / "final.npz")[1]


BUDGET_DP = UserLevelDP(1.0, 0.1, num_clients=12, sampling="poisson", sampling_rate=0.5)
BUDGET = (BUDGET_DP.epsilon(2) + BUDGET_DP.epsilon(3)) / 2  # round 3 would overspend


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory) -> Path:
    """User-level DP (z = 1 by default, C = 0.1, Poisson q = 0.5) whose budget stops it after 2 of 3 rounds."""
    return _run(tmp_path_factory.mktemp("privacy"), "budget", {
        "user-dp": True, "client-sampling": "poisson", "fraction-train": 0.5, "user-dp-clipping-norm": 0.1,
        "user-dp-epsilon-budget": BUDGET,
    })


def _checkpoint(run_dir: Path, server_round: int) -> dict[str, np.ndarray]:
    return load_checkpoint(run_dir / "checkpoints" / f"round-{server_round:05d}.npz")[1]


def test_dp_off_is_the_non_private_path_bit_for_bit_and_dp_on_changes_it(tmp_path, budget_run):
    every_round = {"checkpoint-every": 1}  # not a computation knob: each round's model can be compared
    plain_dir = _run(tmp_path, "plain", every_round)
    # Every DP knob moved, but both switches off: must be the very same computation.
    off_dir = _run(tmp_path, "off", {
        **every_round, "user-dp-noise-multiplier": 7.0, "user-dp-clipping-norm": 0.001, "user-dp-epsilon-budget": 0.5,
        "record-dp-noise-multiplier": 3.0, "record-dp-epsilon-budget": 0.1,
    })
    for server_round in (1, 2, 3):
        plain, off = _checkpoint(plain_dir, server_round), _checkpoint(off_dir, server_round)
        assert plain.keys() == off.keys()
        for name in plain:
            assert np.array_equal(plain[name], off[name]), (server_round, name)
    # DP on (the budget run: same data and seeds, stopped after round 2): round 2's model differs.
    plain, on = _checkpoint(plain_dir, 2), _final(budget_run)
    assert load_checkpoint(budget_run / "checkpoints" / "final.npz")[0] == 2
    assert any(not np.allclose(plain[name], on[name]) for name in plain)

    # Per-round epsilon in the run dir equals the accountant for the same parameters.
    fits = _fit_rows(budget_run)
    assert fits, "at least one round must have trained"
    for row in fits:
        assert row["user_epsilon"] == pytest.approx(BUDGET_DP.epsilon(row["round"]), rel=1e-9)
        assert row["user_delta"] == 1e-5  # min(1e-5, 12^-1.1)
    privacy = json.loads((budget_run / "privacy.json").read_text())
    assert privacy["user_level"]["sampling"] == "poisson" and privacy["user_level"]["noise_multiplier"] == 1.0
    assert privacy["user_level"]["noise_generator"].startswith("os.urandom")


def test_server_stops_before_the_budget_is_exceeded_and_says_why(budget_run):
    summary = json.loads((budget_run / "summary.json").read_text())
    assert summary["rounds"] == 2
    assert "stopped after 2 of 3 rounds" in summary["stop_reason"]
    rows = [json.loads(line) for line in (budget_run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["round"] for r in rows) == 2
    assert all(r["user_epsilon"] <= BUDGET for r in rows if r["phase"] == "fit")


def test_user_dp_under_secagg_noises_the_masked_sum(tmp_path):
    """SecAgg+ hands the server only the mean of clipped updates; the noise goes on that sum."""
    run_dir = _run(tmp_path, "secagg", {
        "user-dp": True, "secure-aggregation": True, "client-sampling": "poisson", "fraction-train": 0.7,
        "user-dp-clipping-norm": 0.1, "num-server-rounds": 2, "evaluate-every": 2, "checkpoint-every": 2,
    })
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    fits = [r for r in rows if r["phase"] == "fit"]
    # Poisson sampling draws from the OS (secret, as DP requires), so a round's cohort size varies;
    # what must hold is that every sampled device's masked update made it into the sum.
    assert fits and all(r["clients_ok"] == r["clients_sampled"] > 0 for r in fits)
    dp = UserLevelDP(1.0, 0.1, num_clients=12, sampling="poisson", sampling_rate=0.7)
    assert [r["user_epsilon"] for r in fits] == pytest.approx([dp.epsilon(r["round"]) for r in fits])
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert privacy["secure_aggregation"] is True and "issue 7522" in privacy["secure_aggregation_limitations"]


def _fit_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["phase"] == "fit"]


def test_record_level_epsilon_accumulates_across_rounds_in_the_devices_state(tmp_path):
    run_dir = _run(tmp_path, "record", {"record-dp": True, "record-dp-noise-multiplier": 1.0, "local-epochs": 1})
    fits = _fit_rows(run_dir)
    assert [r["round"] for r in fits] == [1, 2, 3]
    maxima = [r["record_epsilon_max"] for r in fits]
    assert 0 < maxima[0] < maxima[1] < maxima[2], "epsilon must be cumulative, not reset every round"
    assert all(r["record_dp_declined"] == 0 for r in fits)
    assert all(r.get("train_loss") is None for r in fits), "the private loss is not reported under DP"
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert "same DP-SGD step" in privacy["record_level"]["mechanism"]


def test_devices_past_their_budget_decline_and_the_model_does_not_move(tmp_path):
    from common.models import build_model

    run_dir = _run(tmp_path, "declined", {"record-dp": True, "record-dp-epsilon-budget": 0.01})
    fits = _fit_rows(run_dir)
    assert fits and all(r["record_dp_declined"] == r["clients_ok"] > 0 for r in fits)
    assert all(r["record_epsilon_max"] == 0.0 for r in fits)
    config = parse_run_config(fused_run_config({**SMALL}))
    initial = build_model(config.model_config, 0, config.synthetic_items, seed=config.seed).shared_state()
    final = _final(run_dir)
    for name, value in initial.items():
        assert np.array_equal(final[name], value), name
