"""Per-user train/validation/test splits.

All splits are per user (every user with enough history is evaluated, which
is what federated per-client evaluation needs) and keep the input's id space,
so a model trained on ``train`` can score ``test`` users/items directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.interactions import Interactions

__all__ = [
    "NewItemSplit", "Split", "hold_out_items", "leave_one_out", "random_leave_one_out", "temporal_split", "random_split",
]

_TRAIN, _VALIDATION, _TEST = 0, 1, 2


@dataclass(frozen=True, eq=False)
class Split:
    """Disjoint parts of one dataset; ``validation`` may have zero rows."""

    train: Interactions
    validation: Interactions
    test: Interactions


def _position_from_end(data: Interactions, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows visited in ``order`` (grouped by user): (rows after it, user's row count).

    ``order`` must list rows grouped by user; within a user, later entries are
    "later" for the split. Both outputs are indexed like ``order``.
    """
    counts = data.user_counts()
    sorted_users = data.users[order]
    ends = np.cumsum(counts)
    from_end = ends[sorted_users] - 1 - np.arange(len(order))
    return from_end, counts[sorted_users]


def _assemble(data: Interactions, order: np.ndarray, n_test: np.ndarray, n_val: np.ndarray) -> Split:
    """Label the last ``n_test[u]`` rows of each user test, the ``n_val[u]`` before validation."""
    from_end, _ = _position_from_end(data, order)
    users = data.users[order]
    t, v = n_test[users], n_val[users]
    labels_sorted = np.where(from_end < t, _TEST, np.where(from_end < t + v, _VALIDATION, _TRAIN))
    labels = np.empty(len(data), dtype=np.int8)
    labels[order] = labels_sorted
    return Split(
        train=data.subset(labels == _TRAIN),
        validation=data.subset(labels == _VALIDATION),
        test=data.subset(labels == _TEST),
    )


def _chronological_order(data: Interactions) -> np.ndarray:
    # lexsort is stable, so equal timestamps keep row order (later row = later).
    return np.lexsort((data.timestamps, data.users))


def leave_one_out(data: Interactions, *, validation: bool = True) -> Split:
    """Latest interaction of each user -> test, the one before -> validation.

    Order is by timestamp, ties broken by row order (a later row counts as
    later). A user needs 2 rows to get a test row and 3 to also get a
    validation row, so training always keeps at least one row per user;
    single-interaction users stay entirely in train.
    """
    counts = data.user_counts()
    n_test = (counts >= 2).astype(np.int64)
    n_val = ((counts >= 3) & validation).astype(np.int64)
    return _assemble(data, _chronological_order(data), n_test, n_val)


def random_leave_one_out(data: Interactions, *, seed: int, validation: bool = True) -> Split:
    """A seeded random interaction of each user -> test, another -> validation.

    For data without time: there, the latest row is only the last in the file, and a file
    sorted by item id would hold out every user's highest item id. Same per-user counts
    as :func:`leave_one_out`.
    """
    counts = data.user_counts()
    n_test = (counts >= 2).astype(np.int64)
    n_val = ((counts >= 3) & validation).astype(np.int64)
    shuffle = np.random.default_rng(seed).permutation(len(data))
    return _assemble(data, np.lexsort((shuffle, data.users)), n_test, n_val)


def _ratio_counts(counts: np.ndarray, test_ratio: float, validation_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-user test/validation sizes: round-half-up of the ratios, always leaving >= 1 train row.

    When the cap bites, validation gives way before test.
    """
    for name, value in (("test_ratio", test_ratio), ("validation_ratio", validation_ratio)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if test_ratio + validation_ratio >= 1.0:
        raise ValueError(
            f"test_ratio + validation_ratio must be < 1, got {test_ratio + validation_ratio}"
        )
    room = np.maximum(counts - 1, 0)
    n_test = np.minimum(np.floor(counts * test_ratio + 0.5).astype(np.int64), room)
    n_val = np.minimum(np.floor(counts * validation_ratio + 0.5).astype(np.int64), room - n_test)
    return n_test, n_val


def temporal_split(
    data: Interactions, *, test_ratio: float = 0.2, validation_ratio: float = 0.0
) -> Split:
    """Per-user chronological split: each user's latest rows form test, the ones before validation.

    Sizes per user are ``round(count * ratio)`` (halves up), capped so train
    keeps at least one row; ties in time are broken by row order.
    """
    n_test, n_val = _ratio_counts(data.user_counts(), test_ratio, validation_ratio)
    return _assemble(data, _chronological_order(data), n_test, n_val)


def random_split(
    data: Interactions, *, test_ratio: float = 0.2, validation_ratio: float = 0.0, seed: int = 0
) -> Split:
    """Per-user random split with the same per-user sizes as :func:`temporal_split`."""
    n_test, n_val = _ratio_counts(data.user_counts(), test_ratio, validation_ratio)
    shuffle = np.random.default_rng(seed).permutation(len(data))
    order = np.lexsort((shuffle, data.users))
    return _assemble(data, order, n_test, n_val)


@dataclass(frozen=True, eq=False)
class NewItemSplit:
    """The catalogue cut in two: items training may see, and items held out as new.

    ``known`` keeps the interactions with the known items, re-indexed ``0..k-1``;
    ``new`` the interactions with the held-out items, indexed ``0..n-1`` over its own
    ``item_ids``. Both keep the input's users (the same index in both).
    """

    known: Interactions
    new: Interactions
    known_items: np.ndarray  # dense index in the input of each known item, in the new order
    new_items: np.ndarray  # dense index in the input of each held-out item


def _reindexed(data: Interactions, rows: np.ndarray, items: np.ndarray) -> Interactions:
    position = np.full(data.num_items, -1, np.int64)
    position[items] = np.arange(len(items))
    return Interactions(users=data.users[rows], items=position[data.items[rows]], ratings=data.ratings[rows],
                        timestamps=data.timestamps[rows], user_ids=data.user_ids, item_ids=data.item_ids[items])


def hold_out_items(data: Interactions, fraction: float, *, seed: int = 0) -> NewItemSplit:
    """Hold a random ``fraction`` of the interacted items out of training entirely (new-item cold start).

    Every interaction with a held-out item leaves the training data, so a model trained on
    ``known`` has never seen those items: not as positives, not as sampled negatives, not
    as rows. Items without any interaction stay known (they hold nothing to evaluate).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    interacted = np.flatnonzero(data.item_counts() > 0)
    count = int(round(fraction * len(interacted)))
    rng = np.random.default_rng([seed, 0x1AE])
    new_items = np.sort(rng.choice(interacted, size=count, replace=False)) if count else np.empty(0, np.int64)
    known_items = np.setdiff1d(np.arange(data.num_items), new_items)
    is_new = np.isin(data.items, new_items)
    return NewItemSplit(
        known=_reindexed(data, np.flatnonzero(~is_new), known_items),
        new=_reindexed(data, np.flatnonzero(is_new), new_items),
        known_items=known_items,
        new_items=new_items,
    )
