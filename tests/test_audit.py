"""Empirical privacy audits (simulations/audits): the one-run bound's math and ceiling, the
interaction attack against a small synthetic fleet, and the acceptance test that ``fedrec
audit`` on its documented configuration can fail (ceiling above the accountant's epsilon),
does not (bound at or below it), and finds the canaries when DP is off."""

from __future__ import annotations

import json
import math
from itertools import pairwise

import numpy as np
import pytest
from scipy import stats

from common.config import parse_run_config
from common.federation import slicer_cached
from common.privacy import UserLevelDP
from simulations.audits.bound import (
    audit_from_scores,
    canaries_needed,
    ceiling,
    epsilon_lower_bound,
    guess_counts,
    one_run_guesses,
    p_value,
    verdict,
)
from simulations.audits.canary import record_level_canaries, user_level_canaries
from simulations.audits.interaction import interaction_inference
from simulations.audits.membership import hold_out
from simulations.audits.metrics import roc_auc, tpr_at_fpr
from simulations.cli import main
from simulations.engine import fused_run_config


def fleet(**overrides):
    config = parse_run_config(fused_run_config({"synthetic-users": 60, **overrides}))
    slicer = slicer_cached(config)
    return config, [slicer.client(i) for i in range(len(slicer))]


# --- the one-run bound -----------------------------------------------------------------
def test_all_correct_with_few_canaries_gives_a_small_finite_bound():
    bound = epsilon_lower_bound(m=10, r=10, v=10, delta=0.0, beta=0.05)
    # 10 correct out of 10 rejects eps exactly where (e^eps / (1 + e^eps))^10 = 0.05
    assert bound == pytest.approx(math.log(0.05 ** 0.1 / (1 - 0.05 ** 0.1)), abs=1e-4)
    assert 0.5 < bound < 2


def test_random_guesses_give_no_bound():
    rng = np.random.default_rng(3)
    bounds = []
    for _ in range(20):
        truth = rng.random(200) < 0.5
        scores = rng.random(200)  # independent of membership
        bounds.append(audit_from_scores(scores, truth, 50, 50, delta=1e-5)["epsilon_lower_bound"])
    assert np.mean(bounds) < 0.05 and max(bounds) < 0.5


def test_bound_grows_with_correct_guesses_and_shrinks_with_delta():
    bounds = [epsilon_lower_bound(100, 50, v, 1e-5) for v in range(25, 51)]
    assert all(b2 >= b1 for b1, b2 in pairwise(bounds))
    assert bounds[0] == 0.0 and bounds[-1] > 2.5
    assert epsilon_lower_bound(100, 50, 45, 1e-3) < epsilon_lower_bound(100, 50, 45, 0.0)


def test_p_value_is_the_binomial_tail_without_delta():
    eps = 1.3
    assert p_value(100, 40, 30, eps, 0.0) == pytest.approx(stats.binom.sf(29, 40, math.exp(eps) / (1 + math.exp(eps))))
    assert p_value(100, 40, 30, eps, 1e-4) > p_value(100, 40, 30, eps, 0.0)


def test_bound_is_valid_for_randomized_response():
    """An eps-DP mechanism (randomized response on each canary's bit) is caught above eps at most ~beta of the time."""
    rng = np.random.default_rng(0)
    eps, m, trials, over = 1.0, 200, 200, 0
    for _ in range(trials):
        truth = rng.random(m) < 0.5
        keep = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))
        guesses = np.where(keep, truth, ~truth)
        v = int(np.count_nonzero(guesses == truth))
        over += epsilon_lower_bound(m, m, v, 0.0, beta=0.05) > eps
    assert over / trials <= 0.1


def test_guesses_take_top_and_bottom_and_abstain_between():
    guesses = one_run_guesses(np.array([0.1, 0.9, 0.5, 0.3, 0.7]), k_pos=2, k_neg=1)
    assert guesses.tolist() == [-1, 1, 0, 0, 1]


# --- metrics ----------------------------------------------------------------------------
def test_auc_and_tpr_at_fpr():
    labels = np.array([1, 1, 0, 0], dtype=bool)
    assert roc_auc(np.array([0.9, 0.8, 0.1, 0.2]), labels) == 1.0
    assert roc_auc(np.array([0.5, 0.5, 0.5, 0.5]), labels) == 0.5
    assert roc_auc(np.array([0.1, 0.2, 0.9, 0.8]), labels) == 0.0
    scores = np.concatenate([np.arange(100) + 1000.0, np.arange(100)])
    assert tpr_at_fpr(scores, np.arange(200) < 100, 0.01) == 1.0
    assert tpr_at_fpr(np.zeros(200), np.arange(200) < 100, 0.01) == 0.0


def test_hold_out_keeps_a_row_per_user_and_removes_about_the_share():
    _, clients = fleet()
    rng = np.random.default_rng(0)
    for data in clients[:20]:
        reduced, removed = hold_out(data, 0.2, rng)
        assert len(reduced.train_items) == len(data.train_items) - removed.sum() >= 1
        assert abs(removed.sum() - round(0.2 * len(data.train_items))) <= 1


# --- interaction inference ----------------------------------------------------------------
def test_interaction_attack_beats_random_without_protection_and_falls_with_secagg():
    config, clients = fleet(**{"clients-per-round": 30, "user-dp-clipping-norm": 1.0})
    result = interaction_inference(config, clients, rounds=2, max_targets=15, seed=0, noise_seed=1)
    plain = result["settings"]["secagg-off/no-dp"]
    summed = result["settings"]["secagg-on/no-dp"]
    noised = result["settings"]["secagg-on/user-dp"]
    assert plain["projection"]["auc"] > 0.9
    assert plain["projection"]["f1"] > 5 * plain["random_guess"]["f1"]
    assert plain["projection"]["precision"] > 5 * plain["base_rate"]
    assert summed["projection"]["auc"] < plain["projection"]["auc"] - 0.2
    assert summed["projection"]["f1"] < plain["projection"]["f1"] / 2
    assert noised["projection"]["auc"] < 0.65
    # User-level DP alone does not hide a single upload from the server that receives it.
    assert result["settings"]["secagg-off/user-dp"]["projection"]["auc"] > 0.9


# --- the ceiling: can the audit fail at all? --------------------------------------------
def test_ceiling_is_the_bound_with_every_guess_right():
    # The README's former scale: 100 canaries, 50 guesses, delta 9.6e-4 could never print more than 2.49,
    # below the 2.90 its accountant claimed, so that audit could not fail.
    assert ceiling(100, 50, 9.6e-4) == pytest.approx(2.494, abs=1e-3)
    assert ceiling(100, 50, 9.6e-4) == epsilon_lower_bound(100, 50, 50, 9.6e-4)
    assert verdict(0.0, ceiling(100, 50, 9.6e-4), 2.90) == "inconclusive: ceiling below claim"
    # Without delta the ceiling solves q^r = beta, q = e^eps / (1 + e^eps).
    q = 0.05 ** (1 / 100)
    assert ceiling(200, 100, 0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-4)


def test_canaries_needed_is_the_fewest_whose_ceiling_exceeds_the_epsilon():
    for eps in (1.0, 2.5, 4.0):
        m = canaries_needed(eps, 1e-5, 0.05, 0.5)
        k_pos, k_neg = guess_counts(m, 0.5)
        assert ceiling(m, k_pos + k_neg, 1e-5) > eps
        k_pos, k_neg = guess_counts(m - 1, 0.5)
        assert ceiling(m - 1, k_pos + k_neg, 1e-5) <= eps
    needed = [canaries_needed(eps, 1e-5) for eps in (1, 2, 3, 4, 5, 6)]
    assert needed == sorted(needed) and needed[-1] > 20 * needed[1]  # exponential in epsilon
    assert canaries_needed(8.0, 1e-5, 0.05, 0.5, limit=200_000) is None  # the delta term caps the ceiling


def test_verdicts():
    assert verdict(3.1, 3.5, 2.5).startswith("failed")
    assert verdict(0.4, 2.4, 2.5) == "inconclusive: ceiling below claim"
    assert verdict(0.4, 3.5, 2.5).startswith("passed")
    assert verdict(2.0, 3.5, None).startswith("no claim")


# --- canaries: the acceptance test ---------------------------------------------------------
# ``fedrec audit --scenario canary`` on its documented configuration: z = 2, q = 0.5, 3 rounds
# give epsilon 2.47 at delta 1e-5; 200 canaries with half guessed give a ceiling of 3.49.
DOCUMENTED = ('synthetic-users=60 num-server-rounds=3 fraction-train=0.5 client-sampling="poisson" '
              'user-dp-noise-multiplier=2.0 user-dp-clipping-norm=1.0 user-dp-delta=1e-5 server-learning-rate=2.0 '
              'audit-canaries=200 audit-canary-units="user"')


def test_fedrec_audit_on_its_documented_configuration_could_fail_does_not_and_detects_leakage_without_dp(tmp_path, capsys):
    code = main(["audit", "--scenario", "canary", "--run-dir", str(tmp_path), "-c", DOCUMENTED])
    assert code == 0
    out = capsys.readouterr().out
    audits = json.loads((tmp_path / "audit.json").read_text())["audits"]["canary"]
    private, control = audits["user-level"], audits["user-level/no-dp"]
    line = next(x for x in out.splitlines() if x.startswith("[audit] canary user-level:"))
    for figure in (private["epsilon_lower_bound"], private["epsilon_ceiling"], private["accountant_epsilon"]):
        assert f"{figure:.3f}" in line
    assert "delta 1e-05" in line
    # With DP: the audit could have printed more than the claim, and did not.
    assert private["accountant_delta"] == private["delta"] == 1e-5
    assert private["epsilon_ceiling"] > private["accountant_epsilon"] > 0
    assert private["epsilon_lower_bound"] <= private["accountant_epsilon"]
    assert private["verdict"] == "passed: bound at or below claim, ceiling above it"
    # Without DP the same attack finds the canaries: leakage is detected, not assumed away.
    assert control["accuracy_of_guesses"] > 0.85
    assert control["epsilon_lower_bound"] > 1.5
    assert control["verdict"].startswith("no claim")


CANARY_RUN = {"clients-per-round": 0, "fraction-train": 0.5, "user-dp-clipping-norm": 1.0,
              "user-dp-delta": 1e-5, "server-learning-rate": 2.0}


def test_canary_audit_would_catch_a_run_without_noise():
    """The same audit on the same mechanism with almost no noise: the canaries are found, and
    the bound exceeds what an accountant would claim for real noise, so missing noise fails."""
    config, clients = fleet(**{**CANARY_RUN, "user-dp-noise-multiplier": 0.01})
    result = user_level_canaries(config, clients, rounds=3, num_canaries=80, items_per_canary=8, seed=0, noise_seed=1)
    claimed = UserLevelDP(noise_multiplier=6.0, clipping_norm=1.0, num_clients=result["population"],
                          sampling="poisson", sampling_rate=result["sampling_rate"], delta=1e-5).epsilon(3)
    assert result["accuracy_of_guesses"] > 0.85
    assert result["epsilon_lower_bound"] > claimed > 0
    assert verdict(result["epsilon_lower_bound"], result["epsilon_ceiling"], claimed).startswith("failed")


@pytest.mark.parametrize("loss", ["bce", "mse"])
def test_record_level_canaries_claim_an_epsilon_only_where_an_interaction_is_one_example(loss):
    config, clients = fleet(**{"loss": loss, "record-dp-noise-multiplier": 1.0, "fraction-train": 0.5})
    result = record_level_canaries(config, clients, rounds=1, num_canaries=20, seed=0)
    assert result["accountant_epsilon_per_example"] > 0
    assert not any("group_privacy" in key or key.startswith("accountant_epsilon_per_interaction") for key in result)
    if loss == "bce":
        assert result["examples_per_interaction"] == 1 + config.num_negatives
        assert result["claimed_epsilon"] is None and "accountant_epsilon" not in result
        assert result["verdict"].startswith("no claim")
    else:
        assert result["examples_per_interaction"] == 1
        assert result["claimed_epsilon"] == result["accountant_epsilon"] == result["accountant_epsilon_per_example"]
        assert result["verdict"] != "failed: bound above claim"
        assert result["verdict"] == verdict(result["epsilon_lower_bound"], result["epsilon_ceiling"],
                                            result["claimed_epsilon"])
