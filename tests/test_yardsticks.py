"""EASE and implicit-feedback ALS: the closed forms are right, and they beat popularity on structured data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

from common.config import parse_run_config
from common.federation import prepare
from simulations import yardsticks
from simulations.baselines import run_als, run_ease, run_itempop
from simulations.cli import main
from simulations.engine import fused_run_config


def _random_matrix(users: int, items: int, density: float, seed: int) -> sparse.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = (rng.random((users, items)) < density).astype(np.float32)
    return sparse.csr_matrix(dense)


def test_ease_matches_the_constrained_least_squares_column_by_column():
    """B minimises ||X - XB||^2 + lambda ||B||^2 with diag(B) = 0: solved directly per column here."""
    matrix = _random_matrix(12, 6, 0.4, seed=1)
    lam = 2.0
    gram = (matrix.T @ matrix).toarray().astype(np.float64)
    expected = np.zeros_like(gram)
    for j in range(gram.shape[0]):
        others = [i for i in range(gram.shape[0]) if i != j]
        system = gram[np.ix_(others, others)] + lam * np.eye(len(others))
        expected[others, j] = np.linalg.solve(system, gram[others, j])
    weights = yardsticks.ease_weights(matrix, lam)
    np.testing.assert_allclose(weights, expected, atol=1e-5)
    assert np.all(np.diag(weights) == 0)


def test_ease_rejects_a_non_positive_lambda():
    with pytest.raises(ValueError, match="lambda must be > 0"):
        yardsticks.ease_weights(_random_matrix(4, 3, 0.5, seed=0), 0.0)


@pytest.mark.parametrize("dense_blocks", [True, False])
def test_als_conjugate_gradient_reaches_the_exact_least_squares_rows(monkeypatch, dense_blocks):
    """With as many CG steps as factors, each row equals the normal equations' solution (both product paths)."""
    monkeypatch.setattr(yardsticks, "_DENSE_PRODUCT_DENSITY", 64 if dense_blocks else 1e-9)
    monkeypatch.setattr(yardsticks, "_PAIR_CHUNK", 5)  # several chunks even on this tiny matrix
    matrix = _random_matrix(9, 7, 0.4, seed=2)
    rng = np.random.default_rng(3)
    items = rng.standard_normal((7, 4))
    start = rng.standard_normal((9, 4))
    reg, alpha = 0.3, 4.0
    solved = yardsticks.als_half_step(matrix, items, start, reg, alpha, cg_steps=8)
    dense = matrix.toarray()
    for u in range(9):
        confidence = 1.0 + alpha * dense[u]
        system = items.T @ (confidence[:, None] * items) + reg * np.eye(4)
        exact = np.linalg.solve(system, items.T @ (confidence * dense[u]))
        np.testing.assert_allclose(solved[u], exact, rtol=1e-6, atol=1e-8)


def test_interaction_matrix_is_binary_even_with_repeated_pairs():
    matrix = yardsticks.interaction_matrix(np.array([0, 0, 1]), np.array([2, 2, 0]), 2, 3)
    assert matrix.toarray().tolist() == [[0, 0, 1], [1, 0, 0]]


@pytest.fixture(scope="module")
def structured():
    """Synthetic data whose choices follow hidden user and item factors: collaborative models must win."""
    overrides = {"synthetic-users": 600, "synthetic-items": 300, "synthetic-mean-interactions": 50}
    return prepare(parse_run_config(fused_run_config(overrides)))


def test_ease_and_als_beat_popularity_on_structured_data(structured):
    popularity = run_itempop(structured)
    ease = run_ease(structured)
    als = run_als(structured, iterations=6, seed=0)
    for result in (ease, als):
        # 600 test users: one standard error of HR@10 is about 0.02.
        assert result.test["sampled_hr@10"] > popularity.test["sampled_hr@10"] + 0.06, result.model
        assert result.test["full_ndcg@10"] > popularity.test["full_ndcg@10"], result.model
        assert result.seconds > 0
    assert 1 <= als.best_epoch <= als.epochs == 6
    assert len(als.history) == 6 and "sampled_hr@10" in als.history[0]


def test_a_bad_yardstick_flag_is_one_line_and_exit_2(capsys):
    assert main(["baseline", "--model", "ease", "--ease-lambda", "0"]) == 2
    assert capsys.readouterr().err.strip() == "fedrec: error: --ease-lambda must be > 0.0; got 0.0"
    assert main(["baseline", "--model", "als", "--als-factors", "0"]) == 2
    assert capsys.readouterr().err.strip() == "fedrec: error: --als-factors must be >= 1; got 0"
