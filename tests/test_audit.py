"""Empirical privacy audits (simulations/audits): the one-run bound's math, the interaction
attack against a small synthetic fleet, and the acceptance test that a user-level DP run's
empirical epsilon lower bound stays below the accountant's epsilon."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from common.config import parse_run_config
from common.federation import slicer_cached
from common.privacy import UserLevelDP
from simulations.audits.bound import audit_from_scores, epsilon_lower_bound, one_run_guesses, p_value
from simulations.audits.canary import user_level_canaries
from simulations.audits.interaction import interaction_inference
from simulations.audits.membership import hold_out
from simulations.audits.metrics import roc_auc, tpr_at_fpr
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
    assert all(b2 >= b1 for b1, b2 in zip(bounds, bounds[1:]))
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


# --- canaries: the acceptance test ---------------------------------------------------------
CANARY_RUN = {"clients-per-round": 0, "fraction-train": 0.5, "user-dp-clipping-norm": 1.0,
              "user-dp-delta": 1e-5, "server-learning-rate": 2.0}


def test_user_level_dp_lower_bound_never_exceeds_the_accountant():
    config, clients = fleet(**{**CANARY_RUN, "user-dp-noise-multiplier": 1.0})
    result = user_level_canaries(config, clients, rounds=3, num_canaries=80, items_per_canary=8, seed=0, noise_seed=1)
    assert result["accountant_delta"] == 1e-5 and result["delta"] == 1e-5
    assert result["guesses"] == 40
    assert 0 < result["accountant_epsilon"] < 20
    assert result["epsilon_lower_bound"] <= result["accountant_epsilon"]


def test_canary_audit_would_catch_a_run_without_noise():
    """The same audit on the same mechanism with almost no noise: the canaries are found, and
    the bound exceeds what an accountant would claim for real noise, so missing noise fails."""
    config, clients = fleet(**{**CANARY_RUN, "user-dp-noise-multiplier": 0.01})
    result = user_level_canaries(config, clients, rounds=3, num_canaries=80, items_per_canary=8, seed=0, noise_seed=1)
    claimed = UserLevelDP(noise_multiplier=6.0, clipping_norm=1.0, num_clients=result["population"],
                          sampling="poisson", sampling_rate=result["sampling_rate"], delta=1e-5).epsilon(3)
    assert result["accuracy_of_guesses"] > 0.85
    assert result["epsilon_lower_bound"] > claimed > 0
