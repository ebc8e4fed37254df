"""A device's EASE round: upload the upper triangle of its own item-item Gram, nothing else.

EASE's weights are a closed form of ``G = sum_u x_u x_u^T`` (:mod:`common.ease`), so the
device's whole contribution is its share of that sum: one dense vector, computed from its
own interactions alone, with no state kept between messages. Its scores are ``x_u B`` with
the ``B`` it downloads, ``x_u`` rebuilt from its interactions whenever it needs them.
"""

from __future__ import annotations

import time

import numpy as np

from client.als_local import user_item_lists
from common import ease
from common.federation import ClientData


def user_vectors(data: ClientData) -> np.ndarray:
    """The device's users' binary training vectors ``x_u`` (users x items, float32): EASE's "user rows"."""
    vectors = np.zeros((data.num_users, data.num_items), np.float32)
    vectors[data.train_users, data.train_items] = 1.0
    return vectors


def ease_round(data: ClientData, shared: list[np.ndarray]) -> tuple[list[np.ndarray], dict[str, float]]:
    """One round's upload (the Gram's upper triangle; its diagonal is the device's items) and metrics."""
    started = time.perf_counter()
    gram = ease.device_gram(user_item_lists(data), data.num_items).astype(np.float32)
    upload = [gram]
    metrics = {
        "items_touched": float(len(np.unique(data.train_items))),
        "train_seconds": time.perf_counter() - started,
        "upload_bytes": float(gram.nbytes),
        "download_bytes": float(sum(np.asarray(a).nbytes for a in shared)),
    }
    return upload, metrics
