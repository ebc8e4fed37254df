"""Federation partitioners: which users live on which client.

A client's data is just the rows of its users, in the same global user/item
index space as the whole dataset, so the server's item embeddings line up
across clients without any id translation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.interactions import Interactions

__all__ = [
    "ClientPartition",
    "one_user_per_client",
    "fixed_size_groups",
    "groups_by_attribute",
    "index_rows_by_user",
    "rows_for_client",
    "rows_for_clients",
]


@dataclass(frozen=True, eq=False)
class ClientPartition:
    """The users (dense global indices, sorted) held by one client."""

    client_id: int
    users: np.ndarray


def one_user_per_client(num_users: int) -> list[ClientPartition]:
    """Cross-device setting: client ``u`` holds exactly user ``u``."""
    return [ClientPartition(u, np.array([u], dtype=np.int64)) for u in range(num_users)]


def fixed_size_groups(num_users: int, group_size: int, *, seed: int = 0) -> list[ClientPartition]:
    """Users shuffled (seeded) into groups of ``group_size``; the last group may be smaller."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    perm = np.random.default_rng(seed).permutation(num_users).astype(np.int64)
    return [
        ClientPartition(cid, np.sort(perm[start : start + group_size]))
        for cid, start in enumerate(range(0, num_users, group_size))
    ]


def groups_by_attribute(attribute: np.ndarray) -> list[ClientPartition]:
    """One client per distinct ``attribute[user]`` value (e.g. zip prefix, kiosk id).

    Clients are numbered in sorted key order, so the mapping is stable across
    runs; ``np.unique(attribute)[client_id]`` recovers a client's key.
    """
    attribute = np.asarray(attribute)
    if attribute.ndim != 1:
        raise ValueError(f"attribute must be 1-D (one value per user), got shape {attribute.shape}")
    _, group = np.unique(attribute, return_inverse=True)
    group = group.ravel()
    order = np.argsort(group, kind="stable")  # users ascending within a group
    bounds = np.cumsum(np.bincount(group))[:-1]
    return [
        ClientPartition(cid, users.astype(np.int64))
        for cid, users in enumerate(np.split(order, bounds))
    ]


def index_rows_by_user(data: Interactions) -> tuple[np.ndarray, np.ndarray]:
    """``(order, offsets)``: rows of user ``u`` are ``order[offsets[u]:offsets[u + 1]]``.

    Compute once per split part and pass it to :func:`rows_for_client` when
    looping over many clients; each lookup is then O(rows of the client).
    """
    order = np.argsort(data.users, kind="stable").astype(np.int64)
    offsets = np.zeros(data.num_users + 1, dtype=np.int64)
    np.cumsum(data.user_counts(), out=offsets[1:])
    return order, offsets


def rows_for_client(
    split_part: Interactions,
    partition: ClientPartition,
    *,
    index: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Ascending row indices of ``split_part`` whose user is on the client.

    Use as ``split_part.subset(rows_for_client(...))``. Without ``index``
    this is one O(rows) mask over the whole part, fine for a single client.
    """
    users = np.asarray(partition.users, dtype=np.int64)
    if index is None:
        member = np.zeros(split_part.num_users, dtype=bool)
        member[users] = True
        return np.flatnonzero(member[split_part.users])
    order, offsets = index
    starts, stops = offsets[users], offsets[users + 1]
    lengths = stops - starts
    total = int(lengths.sum())
    # Concatenate the slices order[start:stop] without a Python loop.
    pos = np.arange(total, dtype=np.int64) + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return np.sort(order[pos])


def rows_for_clients(
    split_part: Interactions, partitions: list[ClientPartition]
) -> list[np.ndarray]:
    """:func:`rows_for_client` for every partition, indexing the part once."""
    index = index_rows_by_user(split_part)
    return [rows_for_client(split_part, p, index=index) for p in partitions]
