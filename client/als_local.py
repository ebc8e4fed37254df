"""A device's ALS round: solve its users' factors in closed form, upload only item-side statistics.

The user factors are never uploaded and never kept: they are solved again from the latest
item factors whenever the device needs them (a round, an evaluation, a recommendation).
The math is :mod:`common.als`; this module maps a device's data onto it.
"""

from __future__ import annotations

import time

import numpy as np

from common import als
from common.federation import ClientData
from common.updates import clip_deltas

_SAMPLING_STREAM = 17  # the device's draw of its bounded items, apart from every other seeded stream


def user_item_lists(data: ClientData) -> list[np.ndarray]:
    """Each local user's distinct training items."""
    return [np.unique(data.train_items[data.train_users == user]) for user in range(data.num_users)]


def user_factors(item_factors: np.ndarray, data: ClientData) -> np.ndarray:
    """The device's user factors, each solved in closed form against ``item_factors`` (float32)."""
    y = np.asarray(item_factors, np.float64)
    gram = y.T @ y
    rows = [als.solve_user(y, items, gram=gram) for items in user_item_lists(data)]
    return np.asarray(rows, np.float32).reshape(data.num_users, y.shape[1])


def als_statistics(
    item_factors: np.ndarray, data: ClientData, *, clip: float | None, max_items: int, rng: np.random.Generator
) -> np.ndarray:
    """The device's upload: the sum of its users' statistics.

    Plain: exact (the centralized sweep's sums). With ``clip`` (user-level DP): each user's
    bounded statistics (:func:`common.als.private_statistics`), and the device's sum clipped to
    ``clip``, so a device holding several users stays within the bound too.
    """
    y = np.asarray(item_factors, np.float64)
    num_items, factors = y.shape
    total = np.zeros(als.statistics_size(num_items, factors, private=clip is not None), np.float64)
    gram = y.T @ y
    for items in user_item_lists(data):
        if clip is None:
            total += als.user_statistics(als.solve_user(y, items, gram=gram), items, num_items)
        else:
            total += als.private_statistics(y, items, num_items, clip, max_items, rng)
    return total


def als_round(
    item_factors: np.ndarray, data: ClientData, *, clip: float | None, max_items: int, seed: list[int]
) -> tuple[list[np.ndarray], dict[str, float]]:
    """One round's upload (statistics, touched vector) and the device's metrics.

    The touched vector marks the device's items (the popularity the server publishes);
    under user-level DP it is all ones (which items a user has is what DP must not reveal).
    """
    started = time.perf_counter()
    rng = np.random.default_rng([*seed, _SAMPLING_STREAM])
    statistics = als_statistics(item_factors, data, clip=clip, max_items=max_items, rng=rng)
    items = np.unique(data.train_items)
    touched = np.zeros(data.num_items, np.float32)
    if clip is None:
        touched[items] = 1.0
    else:
        touched[:] = 1.0
    upload = [statistics.astype(np.float32), touched]
    metrics = {"items_touched": float(len(items))}
    if clip is not None:
        metrics["update_norm_before_clipping"] = clip_deltas(upload, clip)
    metrics.update({
        "train_seconds": time.perf_counter() - started,
        "upload_bytes": float(sum(a.nbytes for a in upload)),
        "download_bytes": float(np.asarray(item_factors).nbytes),
    })
    return upload, metrics
