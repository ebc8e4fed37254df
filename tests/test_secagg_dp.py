"""User-level DP under SecAgg+: what the server dequantizes of one device, and who adds the noise.

The quantization is reproduced with Flower's own functions, line for line as
``secaggplus_mod._collect_masked_vectors`` and ``SecAggPlusWorkflow.unmask_stage`` call them
(pairwise and private masks cancel exactly modulo 2**32 and are left out), with the
parameters of the workflow the ServerApp builds for the run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_multiply,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.supercore.differential_privacy import get_norm

import common.privacy as privacy
import server.strategy as strategy_module
from client.client_app import MODS, FedRecClient, aggregation_weight, clipping_norm_for
from client.local import train_round
from common.config import ConfigError, parse_run_config
from common.federation import slicer_cached
from common.models import build_model
from common.privacy import SecureGaussian
from common.secagg import (
    check_distributed_noise,
    device_clipping_norm,
    noise_share_std,
    quantization_step,
    rounding_slack,
)
from server.secure_aggregation import MinimumSurvivorsSecAggPlus
from server.server_app import fit_workflow
from server.strategy import weighted_mean
from simulations.engine import fused_run_config, run_in_process

C = 0.1  # the default user-dp-clipping-norm


def _config(**overrides):
    return parse_run_config(fused_run_config(overrides))


def _workflow(config, max_weight: float | None = None):
    """The SecAgg+ parameters the run really uses (optionally with another max weight)."""
    workflow = fit_workflow(config)
    return SimpleNamespace(
        max_weight=workflow.max_weight if max_weight is None else max_weight,
        clipping_range=workflow.clipping_range,
        quantization_range=workflow.quantization_range,
        modulus_range=workflow.modulus_range,
    )


def _quantized(upload, weight, wf):
    """What ``secaggplus_mod`` computes from one device's upload before masking it."""
    q_ratio = round(weight / wf.max_weight * wf.quantization_range)
    scaled = parameters_multiply(upload, q_ratio / wf.quantization_range)
    quantized = quantize(scaled, wf.clipping_range, wf.quantization_range)
    # int64, as after the mod adds its (int64) masks; the masks themselves cancel in the sum.
    return factor_combine(q_ratio, [q.astype(np.int64) for q in quantized])


def _unmasked_mean(quantized, wf):
    """``SecAggPlusWorkflow.unmask_stage`` on the (mask-free) sum of the quantized uploads."""
    total = quantized[0]
    for other in quantized[1:]:
        total = parameters_addition(total, other)
    q_total, rest = factor_extract(parameters_mod(total, wf.modulus_range))
    vectors = dequantize(rest, wf.clipping_range, wf.quantization_range)
    offset = -(len(quantized) - 1) * wf.clipping_range
    return [(v + offset) * (wf.quantization_range / q_total) for v in vectors]


def _contribution(upload, wf):
    """One unit-weight device's part of the sum the server privatizes (mean x clients)."""
    return _unmasked_mean([_quantized(upload, 1, wf)], wf)


def _worst_case_contribution(upload, wf):
    """The largest-norm rounding the mod could pick: every coordinate rounded away from zero."""
    dq = round(1 / wf.max_weight * wf.quantization_range) / wf.quantization_range
    quantizer = wf.quantization_range / (2 * wf.clipping_range)
    worst = []
    for array in parameters_multiply(upload, dq):
        pre = (np.clip(array, -wf.clipping_range, wf.clipping_range) + wf.clipping_range) * quantizer
        worst.append(np.where(array >= 0, np.ceil(pre), np.floor(pre)).astype(np.int64))
    return [v / dq for v in dequantize(worst, wf.clipping_range, wf.quantization_range)]


def _device_update(config, partition: int, clipping_norm: float | None):
    """A device's real upload after local training on the synthetic data (round 1)."""
    data = slicer_cached(config).client(partition)
    shared = list(build_model(config.model_config, 0, data.num_items, seed=config.seed).shared_state().values())
    result = train_round(config.model_config, config.train_config, data, shared, None, seed=config.seed,
                         server_round=1, clipping_norm=clipping_norm)
    return [a.astype(np.float64) for a in result.upload], shared, result


def test_a_devices_dequantized_update_stays_within_the_clip_and_did_not_with_max_weight_1000():
    config = _config(**{"user-dp": True, "secure-aggregation": True, "local-epochs": 1})
    data = slicer_cached(config).client(0)
    shared = list(build_model(config.model_config, 0, data.num_items, seed=config.seed).shared_state().values())
    coordinates = sum(a.size for a in shared)
    step = quantization_step(config)
    assert clipping_norm_for(config, shared) == pytest.approx(C - step * math.sqrt(coordinates) - 1e-6 * C)
    upload, _, result = _device_update(config, 0, clipping_norm_for(config, shared))
    assert result.metrics["update_norm_before_clipping"] > C, "the update must be one the clip shortens"
    wf = _workflow(config)
    assert wf.max_weight == 1.0
    deltas = upload[:-1]
    sampled = [get_norm(_contribution(upload, wf)[:-1]) for _ in range(20)]
    worst = get_norm(_worst_case_contribution(deltas, wf))
    assert max(sampled) <= C and worst <= C, (max(sampled), worst)
    assert worst > get_norm(deltas), "the worst case is a real rounding, not the update itself"

    # The old settings: clip C, max weight 1000 (every weight 1 is scaled by 1/1000 before rounding).
    old_upload, _, _ = _device_update(config, 0, C)
    old = _workflow(config, max_weight=config.secagg_max_weight)
    assert old.max_weight == 1000.0
    old_norms = [get_norm(_contribution(old_upload, old)[:-1]) for _ in range(5)]
    assert min(old_norms) > 1.3 * C, old_norms  # measured 1.42-1.43 x C


def test_noisy_upload_minus_its_noise_still_dequantizes_within_the_clip():
    config = _config(**{"user-dp": True, "secure-aggregation": True, "local-epochs": 1, "min-train-clients": 2})
    data = slicer_cached(config).client(1)
    shared = list(build_model(config.model_config, 0, data.num_items, seed=config.seed).shared_state().values())
    upload, _, _ = _device_update(config, 1, clipping_norm_for(config, shared))
    noise = [SecureGaussian().normal(0.0, noise_share_std(config), a.shape) for a in upload[:-1]]
    noisy = [a + n for a, n in zip(upload[:-1], noise, strict=True)] + [upload[-1]]
    released = _contribution(noisy, _workflow(config))
    signal = [r - n for r, n in zip(released[:-1], noise, strict=True)]
    assert get_norm(signal) <= C
    assert np.all(np.abs(released[-1] - 1.0) < quantization_step(config)), "touched ones pass unchanged"


def test_b_uniform_weights_under_secagg_give_the_plain_mean():
    config = _config(**{"client-weight": "uniform", "secure-aggregation": True, "local-epochs": 1})
    # float32, as the client hands its upload to the mod without user-dp.
    uploads = [[a.astype(np.float32) for a in _device_update(config, p, None)[0]] for p in range(6)]
    weights = [aggregation_weight(config, 10 + p, False) for p in range(6)]
    assert set(weights) == {1}
    plain = weighted_mean([(None, SimpleNamespace(parameters=_params(u), num_examples=w)) for u, w in zip(uploads, weights, strict=True)])

    def error(wf) -> float:
        mean = _unmasked_mean([_quantized(u, w, wf) for u, w in zip(uploads, weights, strict=True)], wf)
        return max(float(np.max(np.abs(m - p))) for m, p in zip(mean, plain, strict=True))

    step = quantization_step(config)
    now, old = error(_workflow(config)), error(_workflow(config, max_weight=config.secagg_max_weight))
    # Each rounding is under one step, plus float32's own rounding of (x + r) x T / 2r (< 1/4 step).
    assert now < 1.25 * step, (now, step)
    assert old > 100 * step, (old, step)


def _params(arrays):
    from flwr.common import ndarrays_to_parameters

    return ndarrays_to_parameters([a.astype(np.float32) for a in arrays])


def test_settings_whose_rounding_eats_the_clip_or_whose_range_cuts_the_noise_are_refused():
    config = _config(**{"user-dp": True, "secure-aggregation": True, "secagg-quantization-range": 4096})
    with pytest.raises(ConfigError, match="half or more of user-dp-clipping-norm"):
        device_clipping_norm(config, 12833)
    config = _config(**{"user-dp": True, "secure-aggregation": True, "secagg-clipping-range": 1.0,
                        "user-dp-noise-multiplier": 3.0, "min-train-clients": 2})
    with pytest.raises(ConfigError, match="would cut the devices' noise"):
        check_distributed_noise(config, 100)
    # Without SecAgg+ the clip is C itself; with it, the slack grows with the coordinates.
    assert device_clipping_norm(_config(**{"user-dp": True}), 10**6) == C
    secagg = _config(**{"user-dp": True, "secure-aggregation": True})
    assert rounding_slack(secagg, 4 * 12833) == pytest.approx(2 * rounding_slack(secagg, 12833) - 1e-6 * C)


def test_secagg_never_unmasks_fewer_survivors_than_the_noise_shares_were_sized_for(monkeypatch):
    workflow = MinimumSurvivorsSecAggPlus(min_survivors=4, num_shares=3, reconstruction_threshold=2)
    monkeypatch.setattr("flwr.server.workflow.SecAggPlusWorkflow.collect_masked_vectors_stage", lambda *a: True)
    assert workflow.collect_masked_vectors_stage(None, None, SimpleNamespace(active_node_ids={1, 2, 3})) is False
    assert workflow.collect_masked_vectors_stage(None, None, SimpleNamespace(active_node_ids={1, 2, 3, 4})) is True
    assert isinstance(fit_workflow(_config(**{"user-dp": True, "secure-aggregation": True,
                                              "min-train-clients": 4})), MinimumSurvivorsSecAggPlus)
    assert not isinstance(fit_workflow(_config(**{"secure-aggregation": True})), MinimumSurvivorsSecAggPlus)


def test_secure_gaussian_has_normal_moments():
    draws = SecureGaussian().normal(0.5, 2.0, size=(1000, 1000))
    assert draws.shape == (1000, 1000)
    z = (draws.ravel() - 0.5) / 2.0
    assert abs(z.mean()) < 0.005 and abs(z.std() - 1) < 0.005
    assert abs(np.mean(z**3)) < 0.02 and abs(np.mean(z**4) - 3) < 0.05
    assert abs(np.mean(np.abs(z) < 1) - 0.6827) < 0.003
    assert SecureGaussian().normal(size=7).shape == (7,) and SecureGaussian().normal(size=3).shape == (3,)


def test_secure_gaussian_draws_every_bit_from_os_urandom(monkeypatch):
    requested = []

    def fake(n: int) -> bytes:
        requested.append(n)
        return np.random.default_rng(len(requested)).bytes(n)

    monkeypatch.setattr(privacy.os, "urandom", fake)
    first = SecureGaussian().normal(0.0, 1.0, size=(100, 3))
    assert requested == [8 * 150, 8 * 150]  # two uniforms of 8 bytes per pair of normals
    requested.clear()
    again = SecureGaussian().normal(0.0, 1.0, size=(100, 3))
    np.testing.assert_array_equal(first, again)  # same bytes, same noise: no other source of randomness


def test_central_user_dp_keeps_server_noise_and_distributed_user_dp_adds_none(tmp_path):
    from collections import OrderedDict

    from common.updates import UpdateLayout
    from server.run_dir import RunRecorder
    from server.server_app import user_level_dp

    shared = OrderedDict(item_embedding=np.zeros((50, 4), np.float32), output=np.zeros(3, np.float32))
    layout = UpdateLayout.from_state(shared, ["item_embedding"], num_items=50)

    for secagg, expected in ((False, False), (True, True)):
        config = _config(**{"user-dp": True, "secure-aggregation": secagg, "min-train-clients": 1})
        recorder = RunRecorder(tmp_path / str(secagg), {}, checkpoint_every=10)
        strategy = strategy_module.FedRecStrategy(config, layout, list(shared.values()), recorder,
                                                  user_dp=user_level_dp(config, 10))
        assert strategy.noise_on_devices is expected
        mean = [np.full((50, 4), 0.01), np.full(3, 0.01), np.ones(50)]
        released = strategy._privatize(mean, num_clients=4, server_round=2)
        assert np.allclose(released[0], 0.04 / strategy.user_dp.expected_clients) is expected


# --- end to end: user-dp + SecAgg+ with noise shares, in simulation ---------------------

E2E = {
    "synthetic-users": 12, "synthetic-items": 80, "eval-negatives": 20, "synthetic-mean-interactions": 10,
    "embedding-dim": 8, "num-server-rounds": 2, "local-epochs": 1, "evaluate-every": 100,
    "final-full-evaluation": False, "report": False, "checkpoint-every": 100,
    "user-dp": True, "secure-aggregation": True, "client-sampling": "fixed", "clients-per-round": 6,
    "min-train-clients": 4, "user-dp-noise-multiplier": 1.0, "user-dp-clipping-norm": C,
    "user-dp-first-round-noise": 2.0,
}


def recording_client_fn(out: Path):
    """fedrec's client, saving each fit's clipped update (before its noise share) and what it hands SecAgg+."""

    class Recording(FedRecClient):
        def _train(self, data, parameters, local_state, history, config):
            result = super()._train(data, parameters, local_state, history, config)
            self._clipped = [a.copy() for a in result.upload]
            return result

        def fit(self, parameters, config):  # type: ignore[override]
            upload, weight, metrics = super().fit(parameters, config)
            name = f"{config['server-round']}-{self.context.node_config['partition-id']}"
            np.savez(out / f"{name}.npz", *self._clipped, *upload)
            return upload, weight, metrics

    return lambda context: Recording(context).to_client()


def test_distributed_noise_end_to_end_in_simulation(tmp_path, monkeypatch):
    released, server_draws = [], []
    original_privatize = strategy_module.privatize

    def spy(dp, mean, num_clients, rng, **kwargs):
        released.append(([a.copy() for a in mean], num_clients, kwargs))
        return original_privatize(dp, mean, num_clients, rng, **kwargs)

    class CountingGaussian(SecureGaussian):
        def normal(self, *args, **kwargs):
            server_draws.append(kwargs)
            return super().normal(*args, **kwargs)

    monkeypatch.setattr(strategy_module, "privatize", spy)
    monkeypatch.setattr(strategy_module, "SecureGaussian", CountingGaussian)
    out = tmp_path / "uploads"
    out.mkdir()
    settings = {**E2E, "run-dir": str(tmp_path / "run")}
    config = _config(**settings)
    run_in_process(settings, 12, client_app=ClientApp(client_fn=recording_client_fn(out), mods=MODS))

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    fits = [row for row in rows if row["phase"] == "fit"]
    assert [row["round"] for row in fits] == [1, 2] and len(released) == 2
    assert server_draws == [], "the server drew no noise"
    step, t = quantization_step(config), 4
    for row, (mean, k, kwargs) in zip(fits, released, strict=True):
        z = 2.0 if row["round"] == 1 else 1.0  # round 1 carries user-dp-first-round-noise x the noise
        assert kwargs == {"server_round": row["round"], "noise_on_devices": True} and row["clients_ok"] == k == 6
        assert row["server_noise_std"] == 0.0 and row["user_noise_added_by"] == "devices"
        assert row["noise_multiplier_present"] == pytest.approx(z * math.sqrt(k / t))
        files = sorted(out.glob(f"{row['round']}-*.npz"))
        assert len(files) == k
        saved = [np.load(f) for f in files]
        parts = [[s[f"arr_{i}"] for i in range(len(s.files))] for s in saved]
        half = len(parts[0]) // 2
        clipped, noisy = [p[:half] for p in parts], [p[half:] for p in parts]
        total = [m * k for m in mean[:-1]]  # the unmasked sum of the deltas
        noisy_sum = [sum(n[i] for n in noisy) for i in range(half - 1)]
        clean_sum = [sum(c[i] for c in clipped) for i in range(half - 1)]
        # The unmasked sum is the devices' noisy sum up to SecAgg+'s rounding: nothing added on the server.
        assert all(np.max(np.abs(a - b)) <= k * step for a, b in zip(total, noisy_sum, strict=True))
        for c in clipped:
            assert get_norm(c[:-1]) <= device_clipping_norm(config, sum(a.size for a in c[:-1])) * (1 + 1e-6)
        measured = np.concatenate([(a - b).ravel() for a, b in zip(total, clean_sum, strict=True)]).std()
        assert measured == pytest.approx(z * C * math.sqrt(6 / t), rel=0.1), (row["round"], measured)


def test_the_record_level_generator_the_run_records_is_the_one_opacus_gets():
    import torch

    from client import private_training
    from common.privacy import RECORD_NOISE_GENERATOR
    from server.server_app import privacy_plan

    assert private_training._engine().secure_mode is False
    _, noise = private_training._generators(None)
    assert isinstance(noise, torch.Generator) and noise.device.type == "cpu"  # torch's CPU generator: mt19937
    plan = privacy_plan(_config(**{"record-dp": True}), None, 1, "")
    assert plan["record_level"]["noise_generator"] == RECORD_NOISE_GENERATOR
    assert "mt19937" in RECORD_NOISE_GENERATOR and "not a CSPRNG" in RECORD_NOISE_GENERATOR


@pytest.mark.parametrize("first", [0.5, 2.0])
def test_a_device_that_does_not_know_the_round_adds_the_largest_share(first):
    config = _config(**{"user-dp": True, "secure-aggregation": True, "min-train-clients": 4,
                        "user-dp-noise-multiplier": 1.0, "user-dp-clipping-norm": 0.5,
                        "user-dp-first-round-noise": first})
    per_round = {r: noise_share_std(config, r) for r in (1, 2, 3)}
    assert per_round[1] == pytest.approx(first * 0.5 / 2) and per_round[2] == per_round[3] == pytest.approx(0.5 / 2)
    assert noise_share_std(config, 0) == max(per_round.values())
