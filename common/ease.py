"""EASE (Steck, WWW 2019): item-item weights in closed form from the item-item Gram matrix alone.

``B = I - P diag(1 / diag(P))`` with ``P = (G + lambda I)^-1`` and ``G = sum_u x_u x_u^T`` over
the users' binary interaction vectors; a user's scores are ``x_u B`` (diag(B) = 0, so an item
never recommends itself). ``G`` is the only statistic of the data and it is a *sum over
users*, which is what FedAvg with unit weights or SecAgg+ hands the server: a device uploads
the upper triangle of its own ``x x^T`` and the server's closed form on the sum is exactly the
centralized EASE (tests/test_ease.py). The centralized yardstick (simulations/yardsticks.py)
and the federated server both solve it here.
"""

from __future__ import annotations

import numpy as np

# Steck's value for MovieLens-20M, and a flat optimum on MovieLens-100K's validation split
# (HR@10 0.685-0.691 for lambda 250-1000, 0.670 at 100). Lambda is added to the item counts
# on the Gram diagonal; EASE's authors used 200-1000 from 20M to Netflix sizes, so one
# value is kept rather than a scaling rule.
EASE_LAMBDA = 500.0
# Items beyond this make the items x items matrix too big to invert here (float64).
EASE_MAX_ITEMS = 30_000


def gram_size(num_items: int) -> int:
    """Coordinates of the items x items Gram's upper triangle (diagonal included): one device's upload."""
    return num_items * (num_items + 1) // 2


def device_gram(item_lists: list[np.ndarray], num_items: int) -> np.ndarray:
    """The upper triangle of ``sum_u x_u x_u^T`` over a device's users (binary ``x_u``; float64 counts).

    ``item_lists``: each user's training items (repeats count once). A phone has one user, so
    every entry is 0 or 1; a kiosk's entries count its users who have both items.
    """
    gram = np.zeros((num_items, num_items), np.float64)
    for items in item_lists:
        items = np.unique(np.asarray(items, np.int64))
        gram[np.ix_(items, items)] += 1.0
    return gram[np.triu_indices(num_items)]


def symmetric_gram(upper: np.ndarray, num_items: int) -> np.ndarray:
    """The full symmetric Gram from its upper triangle (float64)."""
    upper = np.asarray(upper, np.float64)
    if upper.shape != (gram_size(num_items),):
        raise ValueError(f"EASE Gram of shape {upper.shape}, expected ({gram_size(num_items)},)")
    gram = np.zeros((num_items, num_items), np.float64)
    rows, cols = np.triu_indices(num_items)
    gram[rows, cols] = upper
    gram[cols, rows] = upper
    return gram


def gram_diagonal(upper: np.ndarray, num_items: int) -> np.ndarray:
    """The Gram's diagonal (users per item) read from its upper triangle, without building the matrix."""
    starts = np.concatenate([[0], np.cumsum(np.arange(num_items, 1, -1))]).astype(np.int64)
    return np.asarray(upper, np.float64)[starts]


def ease_weights(gram: np.ndarray, lam: float = EASE_LAMBDA) -> np.ndarray:
    """EASE's item-item weights ``B = -P / diag(P)`` (column-wise), ``P = (G + lambda I)^-1``, diag(B) = 0 (float64)."""
    if lam <= 0:
        raise ValueError(f"EASE lambda must be > 0, got {lam}")
    gram = np.array(gram, np.float64)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"EASE needs a square items x items Gram, got shape {gram.shape}")
    if gram.shape[0] > EASE_MAX_ITEMS:
        raise ValueError(f"EASE inverts an items x items matrix: {gram.shape[0]} items is more than {EASE_MAX_ITEMS}")
    gram[np.diag_indices_from(gram)] += lam
    precision = np.linalg.inv(gram)
    weights = -precision / np.diag(precision)[None, :]
    np.fill_diagonal(weights, 0.0)
    return weights


def solve_from_sum(total: np.ndarray, num_items: int, lam: float = EASE_LAMBDA) -> np.ndarray:
    """The shared table ``B^T`` (float32) from the sum of the devices' Gram triangles.

    Every device's entries are whole counts, so the sum is rounded to whole counts first:
    that removes the float error of the mean times the device count and SecAgg+'s
    stochastic rounding (under half a count, which the config check guarantees).
    """
    gram = symmetric_gram(np.rint(np.asarray(total, np.float64)), num_items)
    return np.ascontiguousarray(ease_weights(gram, lam).T).astype(np.float32)
