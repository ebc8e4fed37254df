"""The private EASE study's mechanism: what a device uploads is bounded by C, the server's noise is z C."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

from simulations.private_ease_study import (
    Contribution,
    PostProcessing,
    gram_from_triangle,
    kept_items,
    noise_multiplier,
    noisy_release,
    score_matrix,
    spectral_cut,
    spike_shrinkage,
    user_vector,
    weighted_gram,
)

NUM_ITEMS = 60


def random_users(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    return [rng.choice(NUM_ITEMS, size=int(rng.integers(1, NUM_ITEMS)), replace=False) for _ in range(count)]


@pytest.mark.parametrize("contribution", [Contribution(20, "bound", 1), Contribution(20, "bound", 7),
                                          Contribution(40, "bound", 40), Contribution(20, "inv-k"),
                                          Contribution(20, "bound", 1, 4.0), Contribution(30, "bound", 10, 2.5)])
def test_every_upload_has_norm_at_most_clip(contribution: Contribution) -> None:
    rng = np.random.default_rng(0)
    for items in random_users(rng, 200):
        kept = kept_items(items, contribution.k_max, rng)
        assert len(kept) == min(len(items), contribution.k_max) and np.isin(kept, items).all()
        upload = user_vector(kept, NUM_ITEMS, contribution.weight(len(kept)), contribution.diagonal)
        assert np.linalg.norm(upload) <= contribution.clip * (1 + 1e-12)


@pytest.mark.parametrize("diagonal", [1.0, 3.0])
def test_bound_weighting_uses_the_exact_norm_of_the_triangle(diagonal: float) -> None:
    """With c = 1 every upload has norm exactly C: the bound is the triangle's norm, not a looser one."""
    rng = np.random.default_rng(1)
    contribution = Contribution(30, "bound", 1, diagonal)
    for items in random_users(rng, 50):
        kept = kept_items(items, contribution.k_max, rng)
        norm = np.linalg.norm(user_vector(kept, NUM_ITEMS, contribution.weight(len(kept)), diagonal))
        assert norm == pytest.approx(contribution.clip, rel=1e-12)


@pytest.mark.parametrize("diagonal", [1.0, 5.0])
def test_server_gram_is_the_decoded_sum_of_the_uploads(diagonal: float) -> None:
    rng = np.random.default_rng(2)
    contribution = Contribution(15, "bound", 4, diagonal)
    kept = [kept_items(items, contribution.k_max, rng) for items in random_users(rng, 30)]
    weights = np.array([contribution.weight(len(k)) for k in kept])
    uploads = sum(user_vector(k, NUM_ITEMS, w, diagonal) for k, w in zip(kept, weights, strict=True))
    np.testing.assert_allclose(weighted_gram(kept, weights, NUM_ITEMS), gram_from_triangle(uploads, NUM_ITEMS, diagonal))


def test_release_noise_has_std_z_c_per_uploaded_coordinate_and_is_symmetric() -> None:
    n, std, diagonal = 300, 2.5, 4.0
    noisy = noisy_release(np.zeros((n, n)), std, np.random.default_rng(3), diagonal)
    upper = noisy[np.triu_indices(n, 1)]
    assert upper.std() == pytest.approx(std, rel=0.02)  # 44,850 coordinates: standard error 0.3 %
    assert abs(upper.mean()) < 0.05
    assert np.diag(noisy).std() * diagonal == pytest.approx(std, rel=0.15)  # 300 coordinates, decoded
    np.testing.assert_array_equal(noisy, noisy.T)


def test_noise_multiplier_is_the_accountants_for_one_release() -> None:
    z, spent = noise_multiplier(3.0, 943, 1e-5, "rdp")
    assert 2.9 < spent <= 3.0
    z_more, _ = noise_multiplier(1.0, 943, 1e-5, "rdp")
    assert z_more > z > 0


def test_items_outside_the_vocabulary_rank_below_it_by_noisy_popularity() -> None:
    rng = np.random.default_rng(4)
    users = random_users(rng, 40)
    rows = np.repeat(np.arange(len(users)), [len(u) for u in users])
    matrix = sparse.csr_matrix((np.ones(len(rows)), (rows, np.concatenate(users))), shape=(len(users), NUM_ITEMS))
    noisy = (matrix.T @ matrix).toarray() + gram_from_triangle(rng.normal(0, 1, NUM_ITEMS * (NUM_ITEMS + 1) // 2),
                                                               NUM_ITEMS)
    scores = score_matrix(matrix, noisy, PostProcessing(1.0, 10), noise_std=1.0)
    order = np.argsort(-np.diag(noisy))
    vocab, rest = order[:10], order[10:]
    assert (scores[:, vocab].min(axis=1) > scores[:, rest].max(axis=1)).all()
    assert (np.diff(scores[0, rest]) < 0).all()  # the rest, by noisy popularity
    only_popularity = score_matrix(matrix, noisy, PostProcessing(1.0, 0), noise_std=1.0)
    assert (np.argsort(-only_popularity[5], kind="stable") == np.argsort(-np.diag(noisy), kind="stable")).all()


def test_spike_shrinkage_recovers_a_planted_spike_better_than_the_hard_cut() -> None:
    """A rank-one Gram under symmetric noise: shrinking the eigenvalue beats keeping it as observed."""
    n, std = 400, 1.0
    rng = np.random.default_rng(5)
    direction = rng.normal(size=n)
    direction /= np.linalg.norm(direction)
    truth = 3.0 * std * np.sqrt(n) * np.outer(direction, direction)
    noisy = noisy_release(truth, std, rng)
    hard = spectral_cut(noisy, 2.0 * std * np.sqrt(n))
    shrunk = spike_shrinkage(noisy, std)
    assert np.linalg.matrix_rank(shrunk, tol=1e-6) == 1
    assert np.linalg.norm(shrunk - truth) < 0.9 * np.linalg.norm(hard - truth)
    assert np.allclose(spike_shrinkage(noisy_release(np.zeros((n, n)), std, rng), std), 0.0)  # noise alone: nothing
