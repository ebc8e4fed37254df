import numpy as np
import pytest
import scipy.sparse as sp

from common.interactions import Interactions
from common.negatives import sample_negatives
from common.splits import Split, leave_one_out, random_split, temporal_split


def make(users, items, timestamps, num_users=None, num_items=None) -> Interactions:
    users, items = np.asarray(users), np.asarray(items)
    nu = num_users if num_users is not None else int(users.max()) + 1
    ni = num_items if num_items is not None else int(items.max()) + 1
    return Interactions(
        users=users,
        items=items,
        ratings=np.arange(len(users), dtype=np.float32),  # rating == row number, to trace rows
        timestamps=np.asarray(timestamps),
        user_ids=np.arange(nu),
        item_ids=np.arange(ni),
    )


def rows_of(part: Interactions) -> list[int]:
    return sorted(part.ratings.astype(int).tolist())


def assert_partition(data: Interactions, split: Split) -> None:
    """Train/validation/test are disjoint, cover every row and share the id space."""
    rows = rows_of(split.train) + rows_of(split.validation) + rows_of(split.test)
    assert sorted(rows) == list(range(len(data)))
    for part in (split.train, split.validation, split.test):
        assert (part.num_users, part.num_items) == (data.num_users, data.num_items)


# --- leave_one_out ---------------------------------------------------------------


@pytest.fixture
def log() -> Interactions:
    # row: user, item, timestamp
    return make(
        users=[0, 0, 0, 0, 1, 1, 2, 3, 3, 3],
        items=[1, 2, 3, 4, 1, 2, 5, 1, 2, 3],
        timestamps=[30, 10, 40, 20, 5, 1, 7, 8, 8, 8],
    )


def test_leave_one_out_picks_latest_for_test_and_previous_for_validation(log):
    split = leave_one_out(log)
    assert_partition(log, split)
    # user 0: times 30,10,40,20 -> test row 2 (t=40), validation row 0 (t=30)
    # user 1: two rows -> test row 4 (t=5), no validation
    # user 2: one row -> stays in train
    # user 3: all t=8 -> row order breaks ties: test row 9, validation row 8
    assert rows_of(split.test) == [2, 4, 9]
    assert rows_of(split.validation) == [0, 8]
    assert rows_of(split.train) == [1, 3, 5, 6, 7]
    assert split.test.users.tolist() == [0, 1, 3]


def test_leave_one_out_without_validation(log):
    split = leave_one_out(log, validation=False)
    assert len(split.validation) == 0
    assert split.validation.num_users == log.num_users
    assert rows_of(split.test) == [2, 4, 9]
    assert rows_of(split.train) == [0, 1, 3, 5, 6, 7, 8]


def test_leave_one_out_every_user_keeps_training_data(log):
    split = leave_one_out(log)
    assert set(split.train.users.tolist()) == {0, 1, 2, 3}
    assert np.all(np.bincount(split.test.users, minlength=4) <= 1)


# --- temporal / random ------------------------------------------------------------


def test_temporal_split_sizes_and_order():
    # user 0: 10 rows at times 9..0 (reverse row order); user 1: 2 rows; user 2: 1 row
    data = make(
        users=[0] * 10 + [1, 1, 2],
        items=list(range(10)) + [0, 1, 0],
        timestamps=list(range(9, -1, -1)) + [1, 2, 0],
    )
    split = temporal_split(data, test_ratio=0.2, validation_ratio=0.1)
    assert_partition(data, split)
    # user 0: test = two latest (t=9, 8 -> rows 0, 1), validation = next (t=7 -> row 2)
    # user 1: round(0.4) = 0 test rows, round(0.2) = 0 validation rows
    assert rows_of(split.test) == [0, 1]
    assert rows_of(split.validation) == [2]
    assert rows_of(split.train) == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]


def test_temporal_split_always_leaves_one_training_row():
    data = make(users=[0, 0, 1, 1, 1], items=[0, 1, 0, 1, 2], timestamps=[1, 2, 1, 2, 3])
    split = temporal_split(data, test_ratio=0.5, validation_ratio=0.4)
    assert np.bincount(split.train.users, minlength=2).tolist() == [1, 1]
    # user 0: 2 rows -> 1 test (round 1.0), validation capped at 0
    # user 1: 3 rows -> test round(1.5)=2 capped to 2, validation capped at 0
    assert rows_of(split.test) == [1, 3, 4]
    assert len(split.validation) == 0


def test_random_split_is_per_user_seeded_and_partitions():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(50), 20)
    data = make(users=users, items=np.tile(np.arange(20), 50), timestamps=rng.integers(0, 100, 1000))
    a = random_split(data, test_ratio=0.2, validation_ratio=0.1, seed=1)
    b = random_split(data, test_ratio=0.2, validation_ratio=0.1, seed=1)
    c = random_split(data, test_ratio=0.2, validation_ratio=0.1, seed=2)
    assert_partition(data, a)
    assert rows_of(a.test) == rows_of(b.test)
    assert rows_of(a.test) != rows_of(c.test)
    assert np.bincount(a.test.users).tolist() == [4] * 50
    assert np.bincount(a.validation.users).tolist() == [2] * 50


@pytest.mark.parametrize("kwargs", [{"test_ratio": 1.0}, {"test_ratio": -0.1}, {"test_ratio": 0.6, "validation_ratio": 0.4}])
def test_split_ratio_validation(log, kwargs):
    with pytest.raises(ValueError):
        temporal_split(log, **kwargs)
    with pytest.raises(ValueError):
        random_split(log, **kwargs)


# --- negatives ---------------------------------------------------------------


def known_matrix(rows: list[list[int]], num_items: int) -> sp.csr_matrix:
    r = np.repeat(np.arange(len(rows)), [len(x) for x in rows])
    c = np.concatenate([np.asarray(x, dtype=np.int64) for x in rows])
    return sp.csr_matrix((np.ones(len(c)), (r, c)), shape=(len(rows), num_items))


def test_negatives_exclude_known_items_exactly():
    known = known_matrix([[0, 2, 4], [1], []], num_items=5)
    neg = sample_negatives(known, np.array([0, 1, 2]), num_negatives=2, seed=0)
    assert neg.shape == (3, 2) and neg.dtype == np.int64
    assert neg[0].tolist() == [1, 3]  # the only two unseen items of user 0
    assert set(neg[1].tolist()) <= {0, 2, 3, 4}
    assert len(set(neg[2].tolist())) == 2


def test_negatives_never_hit_known_and_are_distinct_and_reproducible():
    rng = np.random.default_rng(0)
    num_users, num_items = 300, 400
    dense = rng.random((num_users, num_items)) < np.linspace(0.01, 0.7, num_users)[:, None]
    known = sp.csr_matrix(dense.astype(np.float32))
    users = np.concatenate([np.arange(num_users), [5, 5, 299]])  # repeats allowed
    neg = sample_negatives(known, users, num_negatives=99, seed=3)
    assert neg.shape == (len(users), 99)
    assert not dense[users[:, None], neg].any()
    assert all(len(np.unique(row)) == 99 for row in neg)
    assert neg.min() >= 0 and neg.max() < num_items
    np.testing.assert_array_equal(neg, sample_negatives(known, users, num_negatives=99, seed=3))
    assert not np.array_equal(neg, sample_negatives(known, users, num_negatives=99, seed=4))


def test_negatives_cover_unseen_items_uniformly():
    # One user who knows items 0..9 of 30; 20 unseen, draw 5 each time.
    known = known_matrix([list(range(10))], num_items=30)
    neg = sample_negatives(known, np.zeros(4000, dtype=np.int64), num_negatives=5, seed=0)
    counts = np.bincount(neg.ravel(), minlength=30)
    assert counts[:10].sum() == 0
    # each unseen item expected 4000 * 5 / 20 = 1000 times
    assert counts[10:].min() > 850 and counts[10:].max() < 1150


def test_negatives_treat_explicit_zeros_as_known_and_unsorted_csr():
    m = sp.csr_matrix((np.array([0.0, 1.0]), np.array([3, 1]), np.array([0, 2])), shape=(1, 5))
    assert not m.has_sorted_indices
    neg = sample_negatives(m, np.array([0]), num_negatives=3)
    assert neg[0].tolist() == [0, 2, 4]


def test_negatives_raise_when_too_few_unseen_items():
    known = known_matrix([[0, 1, 2], [0]], num_items=5)
    with pytest.raises(ValueError, match="user 0 has only 2 unseen items out of 5, cannot sample 3"):
        sample_negatives(known, np.array([1, 0]), num_negatives=3)


def test_negatives_zero_and_empty():
    known = known_matrix([[0]], num_items=3)
    assert sample_negatives(known, np.array([0]), num_negatives=0).shape == (1, 0)
    assert sample_negatives(known, np.array([], dtype=np.int64), num_negatives=2).shape == (0, 2)
