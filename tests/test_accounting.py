"""Sound user-level accounting: delta far below 1/N, deployment sampling the accountant can trust,
SecAgg+ unless a deployment opts out, and what a plain upload tells the server."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.common import ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.superlink.grid.http_grid import HttpGrid

from client.local import train_round
from common.config import ConfigError, parse_run_config
from common.federation import slicer_cached
from common.models import build_model
from common.privacy import UserLevelDP, default_delta
from common.updates import UpdateLayout
from server import server_app
from server.report import recompute_user_epsilon
from server.run_dir import RunRecorder
from server.server_app import check_deployment, dp_population, user_level_dp
from server.strategy import FedRecStrategy, progress_line
from simulations.cli import main as fedrec
from simulations.engine import fused_run_config


def _config(**overrides):
    return parse_run_config(fused_run_config(overrides))


# --- delta ---------------------------------------------------------------------------------
@pytest.mark.parametrize("clients", [12, 20, 943, 35_000, 100_000, 10**6])
def test_default_delta_is_min_of_1e5_and_n_to_the_minus_1_1(clients):
    dp = user_level_dp(_config(**{"user-dp": True, "clients-per-round": 2}), clients)
    assert dp.target_delta == pytest.approx(min(1e-5, clients**-1.1), rel=1e-12)
    assert dp.target_delta <= clients**-0.1 / clients * (1 + 1e-12)  # below 1/N by a factor N^0.1 at least
    assert dp.describe()["delta"] == dp.target_delta


def test_a_delta_at_or_above_one_over_n_is_refused_in_one_line(tmp_path, capsys):
    config = _config(**{"user-dp": True, "user-dp-delta": 0.05, "clients-per-round": 2})
    with pytest.raises(ConfigError, match=r"user-dp-delta 0.05 must be below 1/N = 0.05 \(N = 20 clients\)"):
        user_level_dp(config, 20)
    assert user_level_dp(config, 19).target_delta == 0.05  # below 1/19: allowed when asked for explicitly
    with pytest.raises(ValueError, match="must be below 1/N"):
        UserLevelDP(1.0, 0.1, num_clients=10, sampling="poisson", sampling_rate=0.5, delta=0.1)
    run_dir = tmp_path / "never"
    code = fedrec(["simulate", "-c", f"user-dp=true user-dp-delta=0.1 synthetic-users=20 run-dir='{run_dir}'"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "user-dp-delta 0.1 must be below 1/N" in err[0], err
    assert not run_dir.exists(), "refused before any round"


def test_retrying_short_rounds_under_user_dp_is_refused():
    """A retried round samples again: a device drawn in a discarded attempt could be drawn twice in one round."""
    with pytest.raises(ConfigError, match="too-few-clients = 'retry' with user-dp"):
        _config(**{"user-dp": True, "too-few-clients": "retry"})
    assert _config(**{"user-dp": False, "too-few-clients": "retry"}).too_few_clients == "retry"
    assert _config(**{"user-dp": True, "too-few-clients": "skip"}).user_dp


def test_console_line_shows_the_delta_of_every_epsilon():
    line = progress_line(3, 10, {"clients_ok": 5, "clients_sampled": 5, "user_epsilon": 1.234, "user_delta": 1e-5,
                                 "record_epsilon_max": 4.5, "record_delta": 1e-6}, 1.0, 1.0)
    assert "user eps 1.23 (delta 1e-05)" in line and "record eps max 4.5 (delta 1e-06)" in line


# --- deployments: population, Poisson sampling, SecAgg+ --------------------------------------
DEPLOYED_DP = {"user-dp": True, "secure-aggregation": True, "client-sampling": "poisson",
               "user-dp-population": 1000, "clients-per-round": 100, "min-available-clients": 2,
               "user-dp-noise-multiplier": 1.0, "user-dp-clipping-norm": 0.1}


def _deployed_grid() -> HttpGrid:
    """Flower's own grid of a ServerApp on a real SuperLink (it connects lazily: nothing is dialled)."""
    return HttpGrid("127.0.0.1:9", token="test")


def _run_server_app(overrides: dict, run_dir) -> None:
    run_config = fused_run_config({**overrides, "run-dir": str(run_dir)})
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    server_app.main(_deployed_grid(), context)


@pytest.mark.parametrize("change, refusal", [
    ({"client-sampling": "fixed"}, "needs client-sampling = 'poisson'"),
    ({"user-dp-population": 0}, "needs user-dp-population = N"),
    ({"secure-aggregation": False}, "a deployment runs with secure-aggregation = true"),
])
def test_a_deployment_refuses_what_the_accountant_or_the_devices_cannot_trust(tmp_path, change, refusal):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=refusal) as raised:
        _run_server_app({**DEPLOYED_DP, **change}, run_dir)
    assert "\n" not in str(raised.value)
    assert not run_dir.exists(), "refused before the run directory or any round"
    # The same settings are fine in simulation, where the whole fleet is there and waited for.
    check_deployment(_config(**{**DEPLOYED_DP, **change, "user-dp-population": 0}), simulated=True)


def test_a_deployment_without_secagg_needs_the_explicit_opt_out():
    plain = _config(**{"secure-aggregation": False})
    with pytest.raises(ConfigError, match="allow-plain-uploads = true"):
        check_deployment(plain, simulated=False)
    check_deployment(_config(**{"secure-aggregation": False, "allow-plain-uploads": True}), simulated=False)
    check_deployment(_config(**{"secure-aggregation": True}), simulated=False)
    check_deployment(plain, simulated=True)  # simulation keeps its default


def test_population_of_the_mechanism_is_the_registered_devices_in_a_deployment():
    config = _config(**DEPLOYED_DP)
    assert dp_population(config, simulated=False, num_partitions=12) == 1000
    with pytest.raises(ConfigError, match="differs from the 12 clients"):
        dp_population(config, simulated=True, num_partitions=12)
    assert dp_population(_config(**{**DEPLOYED_DP, "user-dp-population": 0}), True, 12) == 12


class _Device(ClientProxy):
    """A connected device as the client manager holds it (never asked anything here)."""

    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, ins, timeout, group_id):  # pragma: no cover - sampling never calls these
        raise NotImplementedError

    get_parameters = fit = evaluate = reconnect = get_properties


GLOBAL = OrderedDict(item_embedding=np.zeros((50, 4), np.float32), output=np.zeros(3, np.float32))
LAYOUT = UpdateLayout.from_state(GLOBAL, ["item_embedding"], num_items=50)


def test_realised_inclusion_rate_of_a_deployed_round_is_at_most_the_accounted_q(tmp_path):
    """300 of 1,000 registered devices connected: each joins with the accountant's q, never more."""
    config = _config(**DEPLOYED_DP)
    dp = user_level_dp(config, dp_population(config, simulated=False, num_partitions=12))
    assert (dp.num_clients, dp.sampling, dp.sampling_rate, dp.expected_clients) == (1000, "poisson", 0.1, 100.0)
    strategy = FedRecStrategy(config, LAYOUT, list(GLOBAL.values()), RunRecorder(tmp_path / "run", {}, 10),
                              uploads_are_aggregated=True, user_dp=dp, expected_clients=0, partitions=None)
    strategy.sampling_rng = np.random.default_rng(7)
    manager = SimpleClientManager()
    connected = np.random.default_rng(1).choice(1000, size=300, replace=False)
    for node in connected:
        manager.register(_Device(int(node)))
    parameters = ndarrays_to_parameters(list(GLOBAL.values()))
    rounds = 2000
    counts = np.zeros(1000)
    for server_round in range(1, rounds + 1):
        for proxy, _ in strategy.configure_fit(server_round, parameters, manager):
            counts[proxy.node_id] += 1
    rate = counts / rounds
    sigma = np.sqrt(dp.sampling_rate * (1 - dp.sampling_rate) / rounds)
    assert np.all(rate <= dp.sampling_rate + 5 * sigma), rate.max()  # every registered device
    assert np.all(np.abs(rate[connected] - dp.sampling_rate) < 5 * sigma)  # connected ones: exactly q
    assert abs(rate[connected].mean() - dp.sampling_rate) < 5 * sigma / np.sqrt(len(connected))
    assert rate[np.setdiff1d(np.arange(1000), connected)].max() == 0.0

    # What fixed-size sampling of the same m = q N would have done: m of the 300 connected.
    fixed = FedRecStrategy(_config(**{**DEPLOYED_DP, "user-dp": False, "client-sampling": "fixed"}), LAYOUT,
                           list(GLOBAL.values()), RunRecorder(tmp_path / "fixed", {}, 10))
    picks = np.zeros(1000)
    for server_round in range(1, 201):
        for proxy, _ in fixed.configure_fit(server_round, parameters, manager):
            picks[proxy.node_id] += 1
    assert picks[connected].mean() / 200 == pytest.approx(100 / 300, rel=1e-9)  # 3.3x the m/N = 0.1 accounted

    # The noisy mean divides by q N whoever came: 30 clients' mean of 0.02 is a sum of 0.6, over 100.
    tiny = UserLevelDP(1e-9, 0.1, num_clients=1000, sampling="poisson", sampling_rate=0.1)
    strategy.user_dp = tiny
    mean = [np.full((50, 4), 0.02), np.full(3, 0.02), np.ones(50)]
    np.testing.assert_allclose(strategy._privatize(mean, num_clients=30, server_round=2)[0], 0.6 / 100, rtol=1e-6)


# --- what a plain upload tells the server ---------------------------------------------------
def test_a_plain_upload_names_every_item_its_user_trained_on():
    """The report's opening sentence, checked on real uploads: touched vector and non-zero rows."""
    config = _config(**{"synthetic-users": 20, "synthetic-items": 60, "eval-negatives": 20, "local-epochs": 1})
    slicer = slicer_cached(config)
    shared = list(build_model(config.model_config, 0, 60, seed=1).shared_state().values())
    for cid in range(3):
        data = slicer.client(cid)
        positives = np.unique(data.train_items)
        plain = train_round(config.model_config, config.train_config, data, shared, None, seed=3, server_round=1)
        touched = np.flatnonzero(plain.upload[-1])
        nonzero = np.flatnonzero(np.abs(plain.upload[0]).sum(axis=1))
        assert np.isin(positives, touched).all(), "touched vector: recall 1.0 of the user's items"
        assert np.isin(positives, nonzero).all() and np.isin(nonzero, touched).all()
        assert len(touched) < 60, "and it says which items the user did NOT train"
        # Under user-level DP without SecAgg+ the vector is all ones, but the clipped rows still tell.
        clipped = train_round(config.model_config, config.train_config, data, shared, None, seed=3, server_round=1,
                              clipping_norm=0.1)
        assert clipped.upload[-1].min() == 1.0
        rows = np.flatnonzero(np.abs(clipped.upload[0]).sum(axis=1))
        assert np.array_equal(rows, nonzero) and np.isin(positives, rows).all()


# --- the report's own recomputation ---------------------------------------------------------
@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_report_recomputation_agrees_with_the_run_accountant_for_both_samplings(sampling):
    extra = {"sampling_rate": 0.05} if sampling == "poisson" else {"sample_size": 25}
    dp = UserLevelDP(1.3, 0.1, num_clients=500, sampling=sampling, **extra)
    record = {**dp.describe(), "accountant": "rdp"}  # as privacy.json holds it
    accounted = dp.epsilon(40)
    assert recompute_user_epsilon(record, 40) == pytest.approx(accounted, rel=1e-9)
    assert recompute_user_epsilon(record, 41) > accounted * 1.001  # one round more is another figure
    assert recompute_user_epsilon({**record, "neighbouring": "nonsense"}, 40) is None
    assert default_delta(500) == record["delta"]


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_a_noisier_first_round_is_accounted_as_the_gaussians_it_composes(accountant):
    # Every client in both rounds (q = 1): rounds of noise 2z and z are exactly one Gaussian
    # mechanism of noise (1 / (2z)^2 + 1 / z^2)^-1/2, an epsilon the accountant must reproduce.
    z = 1.5
    schedule = UserLevelDP(z, 1.0, num_clients=943, sampling="poisson", sampling_rate=1.0, delta=1e-5,
                           first_round_noise=2.0)
    single = UserLevelDP((1 / (2 * z) ** 2 + 1 / z**2) ** -0.5, 1.0, num_clients=943, sampling="poisson",
                         sampling_rate=1.0, delta=1e-5)
    assert schedule.epsilon(2, accountant) == pytest.approx(single.epsilon(1, accountant), rel=2e-3)
    assert schedule.noise_std_at(1) == 2 * z and schedule.noise_std_at(2) == schedule.noise_std_at(7) == z
    # One round: round 1's noise alone; a first round noisier than the rest spends less than an even schedule.
    assert schedule.epsilon(1, accountant) == pytest.approx(
        UserLevelDP(2 * z, 1.0, num_clients=943, sampling="poisson", sampling_rate=1.0, delta=1e-5).epsilon(
            1, accountant), rel=1e-9)
    even = UserLevelDP(z, 1.0, num_clients=943, sampling="poisson", sampling_rate=1.0, delta=1e-5)
    assert schedule.epsilon(5, accountant) < even.epsilon(5, accountant)
    # The report's own recomputation reads the schedule from the record.
    record = {**schedule.describe(), "accountant": accountant}
    assert recompute_user_epsilon(record, 5) == pytest.approx(schedule.epsilon(5, accountant), rel=1e-9)
    assert recompute_user_epsilon({**record, "first_round_noise": 1.0}, 5) == pytest.approx(
        even.epsilon(5, accountant), rel=1e-9)


def test_the_server_adds_the_first_rounds_larger_noise_in_round_1_only(tmp_path):
    config = _config(**{"user-dp": True, "clients-per-round": 2, "user-dp-noise-multiplier": 1.0,
                        "user-dp-clipping-norm": 0.1, "user-dp-first-round-noise": 3.0})
    strategy = FedRecStrategy(config, LAYOUT, list(GLOBAL.values()), RunRecorder(tmp_path, {}, 10),
                              user_dp=user_level_dp(config, 20))
    strategy.noise_rng = np.random.default_rng(0)  # seeded here only: a run's noise is the OS's (SecureGaussian)
    mean = [np.zeros((50, 4)), np.zeros(3), np.ones(50)]
    denominator = strategy.user_dp.expected_clients
    for server_round, factor in ((1, 3.0), (2, 1.0), (3, 1.0)):
        released = strategy._privatize(mean, num_clients=2, server_round=server_round)
        measured = np.concatenate([a.ravel() for a in released[:-1]]).std() * denominator
        assert measured == pytest.approx(factor * 0.1, rel=0.15), (server_round, measured)


def test_a_skipped_round_is_accounted_and_recorded_with_its_epsilon(tmp_path):
    """Devices were sampled and trained even when too few replied: the record counts the round."""
    import json

    config = _config(**DEPLOYED_DP)
    dp = user_level_dp(config, 1000)
    strategy = FedRecStrategy(config, LAYOUT, list(GLOBAL.values()), RunRecorder(tmp_path / "run", {}, 10),
                              uploads_are_aggregated=True, user_dp=dp, num_rounds=5)
    strategy.round_complete, strategy._configured_round = False, 2
    strategy.record_skipped_round()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["round"] == 2 and rows[-1]["clients_ok"] == 0
    assert rows[-1]["user_epsilon"] == dp.epsilon(2) and rows[-1]["user_delta"] == 1e-5
