import numpy as np
import pytest
import scipy.sparse.linalg as sla

from common.splits import leave_one_out, random_split
from common.synthetic import generate_synthetic

FIELDS = ("users", "items", "ratings", "timestamps", "user_ids", "item_ids")


def test_same_seed_is_bit_identical_and_other_seed_differs():
    a = generate_synthetic(300, 200, seed=7)
    b = generate_synthetic(300, 200, seed=7)
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), f
    c = generate_synthetic(300, 200, seed=8)
    assert len(a) != len(c) or not np.array_equal(a.items, c.items)


def test_structure_of_generated_data():
    d = generate_synthetic(400, 300, mean_interactions=20, min_interactions=5, seed=1)
    assert (d.num_users, d.num_items) == (400, 300)
    counts = d.user_counts()
    assert counts.min() >= 5 and counts.max() <= 150
    assert 15 < counts.mean() < 25  # lognormal mean 20, slightly shifted by clipping
    # Each (user, item) at most once.
    assert len(np.unique(d.users * d.num_items + d.items)) == len(d)
    # Ratings are whole stars 1..5 and all levels occur.
    assert set(np.unique(d.ratings).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    # Rows sorted by user; timestamps strictly increase within each user.
    assert np.all(np.diff(d.users) >= 0)
    same_user = d.users[1:] == d.users[:-1]
    assert np.all(np.diff(d.timestamps)[same_user] > 0)


def test_popularity_is_skewed():
    d = generate_synthetic(1000, 500, seed=0)
    share = np.sort(d.item_counts())[::-1]
    top_decile = share[:50].sum() / len(d)
    assert top_decile > 0.3  # uniform would give 0.1
    flat = generate_synthetic(1000, 500, popularity_exponent=0.0, seed=0)
    assert np.sort(flat.item_counts())[::-1][:50].sum() / len(flat) < top_decile


def _hit_rate_at_10(scores: np.ndarray, train_csr, test) -> float:
    scores = np.array(scores, dtype=np.float64)
    scores[train_csr.nonzero()] = -np.inf
    top = np.argsort(-scores, axis=1)[:, :10]
    return float((top[test.users] == test.items[:, None]).any(axis=1).mean())


def test_collaborative_signal_beats_popularity():
    """A rank-16 SVD of the training matrix must clearly beat popularity on held-out items."""
    d = generate_synthetic(1000, 500, seed=0)
    split = leave_one_out(d, validation=False)
    x = split.train.implicit().to_csr().astype(np.float64)
    v0 = np.full(min(x.shape), 1.0 / np.sqrt(min(x.shape)))  # deterministic svds start
    u, s, vt = sla.svds(x, k=16, v0=v0)
    svd_hr = _hit_rate_at_10((u * s) @ vt, x, split.test)
    popularity = np.asarray(x.sum(axis=0)).ravel()
    pop_hr = _hit_rate_at_10(np.tile(popularity, (x.shape[0], 1)), x, split.test)
    assert svd_hr > pop_hr + 0.05, (svd_hr, pop_hr)


def test_ratings_carry_item_and_user_signal():
    # If ratings were pure noise, an item's (or user's) mean rating in one
    # random half of the data would not predict its mean in the other half.
    d = generate_synthetic(2000, 200, seed=2)
    halves = random_split(d, test_ratio=0.5, seed=0)
    for key, n in (("items", d.num_items), ("users", d.num_users)):
        means, counts = [], []
        for part in (halves.train, halves.test):
            idx = getattr(part, key)
            c = np.bincount(idx, minlength=n)
            means.append(np.bincount(idx, weights=part.ratings, minlength=n) / np.maximum(c, 1))
            counts.append(c)
        both = (counts[0] > 5) & (counts[1] > 5)
        assert np.corrcoef(means[0][both], means[1][both])[0, 1] > 0.3, key
    assert 3.2 < d.ratings.mean() < 3.9  # MovieLens-like average


def test_heavy_users_use_exact_path():
    # With few items every user is "heavy" (pool >= num_items): exact sampling.
    d = generate_synthetic(50, 20, mean_interactions=8, min_interactions=2, seed=0)
    counts = d.user_counts()
    assert counts.min() >= 2 and counts.max() <= 10
    assert len(np.unique(d.users * 20 + d.items)) == len(d)


def test_scale_smoke():
    d = generate_synthetic(20_000, 2_000, seed=0)
    assert d.num_users == 20_000 and d.user_counts().min() >= 5
    assert 25 < len(d) / d.num_users < 35


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_items": 8, "min_interactions": 5},
        {"num_users": 0},
        {"mean_interactions": 0},
        {"dim": 0},
    ],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        generate_synthetic(**kwargs)
