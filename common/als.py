"""Federated implicit-feedback ALS (Hu, Koren & Volinsky 2008), private as in Private ALS (Chien et al., ICML 2021).

A round is one ALS sweep split across the federation. Each device solves its own user factor
in closed form against the item factors it received (it never leaves the device and is not
kept), and uploads the item-side sufficient statistics of that factor as one dense vector:

* ``G``: ``x x^T`` (the "every item is a zero with confidence 1" term, summed over all users),
* ``A_i``: ``alpha x x^T`` for each item ``i`` the user has (the extra confidence),
* ``b_i``: ``(1 + alpha) x`` for each such item,

each symmetric block as its upper triangle. The server only needs their *sum* (what FedAvg
or SecAgg+ computes) and solves every item exactly: ``(G + A_i + reg I) y_i = b_i``. With every
device in every round this is exactly the centralized ALS sweep (tests/test_als.py).

Under user-level DP (Private ALS) a device bounds its contribution before it uploads: at most
``max_items`` of its items, drawn on the device; its factor scaled to unit norm; and the
whole vector weighted by ``omega = C / bound(k)``, the largest norm a unit factor with ``k``
items can give, so the upload's L2 norm is at most ``C`` *by construction* (the clip that
follows is the accountant's guarantee and measured in tests). Heavy users thus weigh less per
item. The server adds the DP-FedAvg Gaussian noise ``z C`` to the sum (or the devices add
shares under SecAgg+), which the existing accountant covers as one clipped vector per user.
The noisy Gram matrices are made positive semi-definite and get a ridge proportional to the
noise's spectral norm before the items are solved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# The centralized yardstick's values (simulations/yardsticks.py), chosen there on
# MovieLens-100K's validation split; the federated model solves the same objective.
ALS_REGULARIZATION = 0.1
ALS_ALPHA = 5.0  # confidence of an observed item: 1 + alpha
# Private ALS: the weight of the global Gram block in the sensitivity budget (the block is
# only f(f+1)/2 coordinates but every user adds to it, so it is worth a larger share) and the
# ridge in units of the noise's spectral norm; chosen on MovieLens-100K's validation split
# (results/ml100k-federated-als.md), never on test items.
DP_GRAM_SCALE = 10.0
DP_RIDGE_FACTOR = 1.0


@dataclass(frozen=True)
class BlockScales:
    """What each block of the upload is multiplied by (the server divides it out again)."""

    gram: float = 1.0
    item_gram: float = 1.0
    rhs: float = 1.0


PLAIN = BlockScales()
PRIVATE = BlockScales(gram=DP_GRAM_SCALE)


def triangle_size(factors: int) -> int:
    """Coordinates of a symmetric ``factors x factors`` block's upper triangle."""
    return factors * (factors + 1) // 2


def statistics_size(num_items: int, factors: int) -> int:
    """Length of one device's upload: ``G``, every item's ``A_i``, every item's ``b_i``."""
    return triangle_size(factors) * (num_items + 1) + num_items * factors


def solve_user(
    item_factors: np.ndarray, items: np.ndarray, reg: float = ALS_REGULARIZATION, alpha: float = ALS_ALPHA,
    gram: np.ndarray | None = None,
) -> np.ndarray:
    """The user's factor in closed form: ``(Y^T Y + alpha Y_u^T Y_u + reg I) x = (1 + alpha) Y_u^T 1``.

    ``items``: the user's distinct items; ``gram``: ``Y^T Y`` if already computed (float64).
    """
    y = np.asarray(item_factors, np.float64)
    if gram is None:
        gram = y.T @ y
    rows = y[np.asarray(items, np.int64)]
    system = gram + alpha * rows.T @ rows + reg * np.eye(y.shape[1])
    return np.linalg.solve(system, (1.0 + alpha) * rows.sum(axis=0))


def contribution_bound(num_items: int, alpha: float, scales: BlockScales) -> float:
    """The largest L2 norm of an unweighted upload from a unit-norm factor and ``num_items`` items.

    ``||triu(x x^T)|| <= ||x||^2 = 1``, so each item adds at most ``(alpha s_A)^2 + ((1 + alpha) s_b)^2``
    to the squared norm and the global block ``s_G^2``.
    """
    per_item = (alpha * scales.item_gram) ** 2 + ((1.0 + alpha) * scales.rhs) ** 2
    return math.sqrt(scales.gram**2 + num_items * per_item)


def user_statistics(
    x: np.ndarray, items: np.ndarray, num_items: int, alpha: float = ALS_ALPHA, *,
    scales: BlockScales = PLAIN, weight: float = 1.0,
) -> np.ndarray:
    """One device's upload: ``weight`` x the scaled blocks ``G``, ``A_i``, ``b_i`` of factor ``x`` (float64)."""
    factors = len(x)
    tri = triangle_size(factors)
    upper = np.triu_indices(factors)
    outer = np.outer(x, x)[upper]
    items = np.asarray(items, np.int64)
    out = np.zeros(statistics_size(num_items, factors), np.float64)
    out[:tri] = weight * scales.gram * outer
    item_grams = out[tri : tri * (num_items + 1)].reshape(num_items, tri)
    item_grams[items] = weight * scales.item_gram * alpha * outer
    rhs = out[tri * (num_items + 1) :].reshape(num_items, factors)
    rhs[items] = weight * scales.rhs * (1.0 + alpha) * x
    return out


def _symmetric(upper_rows: np.ndarray, factors: int) -> np.ndarray:
    """``[..., f(f+1)/2]`` upper triangles to full symmetric ``[..., f, f]`` matrices."""
    full = np.zeros((*upper_rows.shape[:-1], factors, factors), np.float64)
    i, j = np.triu_indices(factors)
    full[..., i, j] = upper_rows
    full[..., j, i] = upper_rows
    return full


def factors_of(size: int, num_items: int) -> int:
    """The factor count ``f`` whose upload has ``size`` coordinates (ValueError if none)."""
    for factors in range(1, 4097):
        if statistics_size(num_items, factors) == size:
            return factors
        if statistics_size(num_items, factors) > size:
            break
    raise ValueError(f"{size} coordinates are no ALS upload for {num_items} items")


def solve_items(
    total: np.ndarray, num_items: int, factors: int, reg: float = ALS_REGULARIZATION, *,
    scales: BlockScales = PLAIN, noise_std: float = 0.0, ridge_factor: float = DP_RIDGE_FACTOR,
) -> np.ndarray:
    """Every item's factor from the *sum* of the devices' uploads: ``(G + A_i + reg I) y_i = b_i``.

    ``noise_std`` (> 0 under user-level DP): the per-coordinate std of the noise on ``total``.
    The noisy ``G + A_i`` is then projected onto the positive semi-definite cone and gets an
    extra ridge of ``ridge_factor`` x the expected spectral norm of its noise (``2 sqrt(f)``
    per unit std for a symmetric Gaussian matrix), so the solve stays well conditioned.
    """
    tri = triangle_size(factors)
    total = np.asarray(total, np.float64)
    if total.shape != (statistics_size(num_items, factors),):
        raise ValueError(f"ALS statistics of shape {total.shape}, expected ({statistics_size(num_items, factors)},)")
    gram = _symmetric(total[:tri], factors) / scales.gram
    item_grams = _symmetric(total[tri : tri * (num_items + 1)].reshape(num_items, tri), factors) / scales.item_gram
    rhs = total[tri * (num_items + 1) :].reshape(num_items, factors) / scales.rhs
    systems = gram[None] + item_grams
    ridge = reg
    if noise_std > 0:
        values, vectors = np.linalg.eigh(systems)
        systems = (vectors * np.clip(values, 0.0, None)[:, None, :]) @ np.swapaxes(vectors, 1, 2)
        ridge += ridge_factor * 2.0 * math.sqrt(factors) * noise_std * (1.0 / scales.gram + 1.0 / scales.item_gram)
    systems += ridge * np.eye(factors)
    return np.linalg.solve(systems, rhs[..., None])[..., 0]


def bounded_items(items: np.ndarray, max_items: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``max_items`` of the user's distinct items, drawn uniformly on the device (0: all)."""
    items = np.unique(np.asarray(items, np.int64))
    if max_items <= 0 or len(items) <= max_items:
        return items
    return np.sort(rng.choice(items, size=max_items, replace=False))


def private_statistics(
    item_factors: np.ndarray, items: np.ndarray, num_items: int, clip: float, max_items: int,
    rng: np.random.Generator, reg: float = ALS_REGULARIZATION, alpha: float = ALS_ALPHA,
    scales: BlockScales = PRIVATE,
) -> np.ndarray:
    """A user-level DP device's upload: L2 norm at most ``clip`` whatever its data.

    The factor is solved on all the user's items (it stays on the device), scaled to unit
    norm; the statistics cover at most ``max_items`` items drawn on the device and are
    weighted by ``clip / contribution_bound(k)``.
    """
    x = solve_user(item_factors, np.unique(items), reg, alpha)
    norm = float(np.linalg.norm(x))
    x = x / norm if norm > 0 else np.zeros_like(x)
    kept = bounded_items(items, max_items, rng)
    weight = clip / contribution_bound(len(kept), alpha, scales)
    return user_statistics(x, kept, num_items, alpha, scales=scales, weight=weight)
