import numpy as np
import pytest

from common.interactions import Interactions
from common.partition import (
    fixed_size_groups,
    groups_by_attribute,
    index_rows_by_user,
    one_user_per_client,
    rows_for_client,
    rows_for_clients,
)


def assert_covers_once(parts, num_users: int) -> None:
    everyone = np.concatenate([p.users for p in parts])
    assert sorted(everyone.tolist()) == list(range(num_users))
    assert [p.client_id for p in parts] == list(range(len(parts)))
    assert all(p.users.dtype == np.int64 for p in parts)


def test_one_user_per_client():
    parts = one_user_per_client(4)
    assert [p.users.tolist() for p in parts] == [[0], [1], [2], [3]]
    assert_covers_once(parts, 4)


def test_fixed_size_groups_sizes_cover_and_seed():
    parts = fixed_size_groups(10, 4, seed=0)
    assert [len(p.users) for p in parts] == [4, 4, 2]
    assert_covers_once(parts, 10)
    assert all(np.all(np.diff(p.users) > 0) for p in parts)
    again = fixed_size_groups(10, 4, seed=0)
    assert [p.users.tolist() for p in parts] == [p.users.tolist() for p in again]
    other = fixed_size_groups(10, 4, seed=1)
    assert [p.users.tolist() for p in parts] != [p.users.tolist() for p in other]
    with pytest.raises(ValueError):
        fixed_size_groups(10, 0)


def test_groups_by_attribute_ordered_by_key():
    attribute = np.array(["b", "a", "b", "c", "a"])
    parts = groups_by_attribute(attribute)
    assert [p.users.tolist() for p in parts] == [[1, 4], [0, 2], [3]]  # keys a, b, c
    assert_covers_once(parts, 5)
    numeric = groups_by_attribute(np.array([20, 10, 20]))
    assert [p.users.tolist() for p in numeric] == [[1], [0, 2]]


@pytest.fixture
def data() -> Interactions:
    users = np.array([2, 0, 1, 2, 0, 3, 2])
    return Interactions(
        users=users,
        items=np.arange(7) % 3,
        ratings=np.ones(7),
        timestamps=np.arange(7),
        user_ids=np.arange(5),  # user 4 has no rows
        item_ids=np.arange(3),
    )


def test_index_rows_by_user(data):
    order, offsets = index_rows_by_user(data)
    assert offsets.tolist() == [0, 2, 3, 6, 7, 7]
    assert order[offsets[2] : offsets[3]].tolist() == [0, 3, 6]
    assert order[offsets[4] : offsets[5]].tolist() == []


def test_rows_for_client_with_and_without_index(data):
    parts = fixed_size_groups(data.num_users, 2, seed=0)
    index = index_rows_by_user(data)
    all_rows = []
    for p in parts:
        rows = rows_for_client(data, p, index=index)
        np.testing.assert_array_equal(rows, rows_for_client(data, p))
        assert np.all(np.diff(rows) > 0)
        assert set(data.users[rows].tolist()) <= set(p.users.tolist())
        all_rows.extend(rows.tolist())
    assert sorted(all_rows) == list(range(len(data)))
    grouped = rows_for_clients(data, parts)
    assert [g.tolist() for g in grouped] == [rows_for_client(data, p).tolist() for p in parts]


def test_client_subset_keeps_global_item_space(data):
    part = groups_by_attribute(np.array([0, 0, 1, 1, 1]))[0]  # users 0, 1
    rows = rows_for_client(data, part)
    assert rows.tolist() == [1, 2, 4]
    client = data.subset(rows)
    assert client.num_items == data.num_items and client.num_users == data.num_users
    empty = rows_for_client(data, groups_by_attribute(np.array([0, 0, 0, 0, 1]))[1])
    assert empty.size == 0 and len(data.subset(empty)) == 0
