import pickle

import numpy as np
import pytest

from common.errors import DataError
from common.interactions import Interactions, from_raw


def _one_line(err: DataError) -> str:
    text = str(err)
    assert "\n" not in text and "\r" not in text
    return text


# --- DataError ------------------------------------------------------------


def test_data_error_formats():
    assert str(DataError("bad", "a.csv", 3)) == "a.csv:3: bad"
    assert str(DataError("bad", "a.csv")) == "a.csv: bad"
    assert str(DataError("bad")) == "bad"
    err = DataError("bad", "a.csv", 3)
    assert (err.message, err.path, err.line) == ("bad", "a.csv", 3)
    assert isinstance(err, ValueError)


def test_data_error_is_one_line_and_picklable():
    err = DataError("two\nlines\r", "f.txt", 1)
    assert _one_line(err) == "f.txt:1: two lines "
    back = pickle.loads(pickle.dumps(err))
    assert (back.message, back.path, back.line) == (err.message, "f.txt", 1)


# --- from_raw ---------------------------------------------------------------


def test_from_raw_builds_sorted_dense_id_maps_that_round_trip():
    raw_u = np.array([30, 10, 20, 10])
    raw_i = np.array([7, 5, 5, 9])
    d = from_raw(raw_u, raw_i, np.array([1, 2, 3, 4.0]), np.array([1, 2, 3, 4]))
    assert d.user_ids.tolist() == [10, 20, 30]
    assert d.item_ids.tolist() == [5, 7, 9]
    assert d.users.tolist() == [2, 0, 1, 0]
    assert d.items.tolist() == [1, 0, 0, 2]
    assert (d.num_users, d.num_items, len(d)) == (3, 3, 4)
    np.testing.assert_array_equal(d.user_ids[d.users], raw_u)
    np.testing.assert_array_equal(d.item_ids[d.items], raw_i)
    assert d.users.dtype == np.int64 and d.ratings.dtype == np.float32
    assert d.timestamps.dtype == np.int64


def test_from_raw_handles_huge_sparse_ids():
    raw_u = np.array([10**15, -5, 10**15])
    raw_i = np.array([2**40, 1, 3])
    d = from_raw(raw_u, raw_i, None, None)
    assert d.user_ids.tolist() == [-5, 10**15]
    np.testing.assert_array_equal(d.user_ids[d.users], raw_u)
    np.testing.assert_array_equal(d.item_ids[d.items], raw_i)


def test_from_raw_defaults_ratings_to_one_and_time_to_row_order():
    d = from_raw(np.array([1, 2, 3]), np.array([1, 1, 1]), None, None)
    assert d.ratings.tolist() == [1.0, 1.0, 1.0]
    assert d.timestamps.tolist() == [0, 1, 2]


def test_from_raw_keeps_latest_duplicate_and_later_row_on_ties():
    # (u1, i10) appears 3 times: ts 5, 7, 7 -> the last row with ts 7 wins.
    # (u2, i10) appears twice: ts 9 then 3 -> the earlier row (ts 9) wins.
    d = from_raw(
        np.array([1, 1, 2, 1, 1, 2]),
        np.array([10, 10, 10, 10, 20, 10]),
        np.array([1, 2, 3, 4, 5, 6.0]),
        np.array([5, 7, 9, 7, 0, 3]),
    )
    assert len(d) == 3
    # Kept rows stay in input order: rows 2, 3, 4.
    assert d.ratings.tolist() == [3.0, 4.0, 5.0]
    assert d.timestamps.tolist() == [9, 7, 0]
    pairs = set(zip(d.user_ids[d.users].tolist(), d.item_ids[d.items].tolist(), strict=True))
    assert pairs == {(1, 10), (2, 10), (1, 20)}


def test_from_raw_without_timestamps_keeps_last_row():
    d = from_raw(np.array([1, 1]), np.array([2, 2]), np.array([4.0, 1.0]), None)
    assert d.ratings.tolist() == [1.0]


def test_from_raw_rejects_empty_input():
    with pytest.raises(DataError) as exc:
        from_raw(np.array([], dtype=np.int64), np.array([], dtype=np.int64), None, None, source="x.csv")
    assert _one_line(exc.value) == "x.csv: no interactions"


def test_from_raw_rejects_bad_ids_and_ratings():
    with pytest.raises(DataError, match="user ids must be integers"):
        from_raw(np.array(["a", "b"]), np.array([1, 2]), None, None)
    with pytest.raises(DataError, match="item ids must be integers"):
        from_raw(np.array([1, 2]), np.array([1.5, 2.0]), None, None)
    with pytest.raises(DataError, match="not finite"):
        from_raw(np.array([1, 2]), np.array([1, 2]), np.array([1.0, np.nan]), None)
    with pytest.raises(DataError, match="2 user ids but 1 item ids"):
        from_raw(np.array([1, 2]), np.array([1]), None, None)


def test_from_raw_accepts_integral_float_ids():
    d = from_raw(np.array([1.0, 2.0]), np.array([3.0, 3.0]), None, None)
    assert d.user_ids.tolist() == [1, 2]


# --- Interactions methods ---------------------------------------------------


@pytest.fixture
def small() -> Interactions:
    # users 0..3 (user 3 has no rows), items 0..4
    return Interactions(
        users=np.array([0, 0, 1, 2, 2, 2]),
        items=np.array([3, 1, 1, 4, 0, 2]),
        ratings=np.array([5, 3, 4, 1, 2, 5], dtype=np.float32),
        timestamps=np.array([10, 11, 12, 13, 14, 15]),
        user_ids=np.array([100, 101, 102, 103]),
        item_ids=np.arange(5) * 10,
    )


def test_subset_by_mask_index_and_empty_keeps_id_space(small):
    by_mask = small.subset(small.users == 2)
    assert by_mask.items.tolist() == [4, 0, 2]
    by_index = small.subset(np.array([5, 0]))
    assert by_index.items.tolist() == [2, 3]
    assert by_index.ratings.tolist() == [5.0, 5.0]
    for empty in (small.subset(np.zeros(6, dtype=bool)), small.subset(np.array([], dtype=int)), small.subset([])):
        assert len(empty) == 0
        assert (empty.num_users, empty.num_items) == (4, 5)
        assert empty.to_csr().shape == (4, 5)
    assert (by_mask.num_users, by_mask.num_items) == (4, 5)
    assert by_mask.user_ids is small.user_ids


def test_subset_rejects_wrong_mask_length(small):
    with pytest.raises(ValueError, match="mask has shape"):
        small.subset(np.ones(3, dtype=bool))


def test_to_csr(small):
    m = small.to_csr()
    assert m.shape == (4, 5) and m.dtype == np.float32
    assert m[0, 3] == 5.0 and m[2, 4] == 1.0 and m[3].nnz == 0
    assert m.nnz == 6


def test_items_per_user_sorted_with_empty_users(small):
    per_user = small.items_per_user()
    assert [p.tolist() for p in per_user] == [[1, 3], [1], [0, 2, 4], []]
    assert small.user_counts().tolist() == [2, 1, 3, 0]
    assert small.item_counts().tolist() == [1, 2, 1, 1, 1]


def test_implicit_threshold(small):
    imp = small.implicit(4.0)
    assert imp.items.tolist() == [3, 1, 2]
    assert imp.ratings.tolist() == [1.0, 1.0, 1.0]
    assert imp.num_users == 4 and imp.num_items == 5
    assert len(small.implicit()) == 6


def test_constructor_validates_lengths_and_ranges():
    with pytest.raises(ValueError, match="rows"):
        Interactions(np.array([0, 1]), np.array([0]), np.ones(2), np.zeros(2), np.arange(2), np.arange(1))
    with pytest.raises(ValueError, match="items out of range"):
        Interactions(np.array([0]), np.array([3]), np.ones(1), np.zeros(1), np.arange(1), np.arange(2))
