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
whole vector weighted by ``w = C / bound(k)``, the largest norm a unit factor with ``k``
items can give, so the upload's L2 norm is at most ``C`` *by construction* (the clip that
follows is the accountant's guarantee, measured on real uploads in tests/test_als.py). Heavy
users thus weigh less per item. The private upload replaces each item's ``f x f`` block
``A_i`` by one weighted count (``A_i`` is estimated from it and ``G``), so the noise lands on
``f + 1`` numbers per item instead of ``f (f + 3) / 2``. The server adds the DP-FedAvg Gaussian
noise ``z C`` to the sum (or the devices add shares under SecAgg+), which the existing
accountant covers as one clipped vector per user (add or remove one user).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# The centralized yardstick's values (simulations/yardsticks.py), chosen there on
# MovieLens-100K's validation split; the federated model solves the same objective.
ALS_REGULARIZATION = 0.1
ALS_ALPHA = 5.0  # confidence of an observed item: 1 + alpha
# Private ALS: the weights of the global Gram block and of the per-item counts in the
# sensitivity budget (the Gram block is only f(f+1)/2 coordinates but every user adds to it,
# so it is worth a larger share), and the ridge in units of the expected noise norm of an
# item's b_i. Chosen on MovieLens-100K's validation split, never on test items; validation
# HR@10 is flat within noise for scales 1-30 and ridges 3-10, so these need no per-dataset
# tuning (results/ml100k-federated-als.md).
DP_GRAM_SCALE = 10.0
DP_COUNT_SCALE = 3.0
DP_RIDGE_FACTOR = 3.0


@dataclass(frozen=True)
class BlockScales:
    """Under user-level DP, what each block of the upload is multiplied by (the server divides it out again).

    The budget ``C`` is shared among the blocks in proportion to the squares of these scales;
    a larger scale buys its block a smaller relative noise at the others' expense.
    """

    gram: float = DP_GRAM_SCALE
    count: float = DP_COUNT_SCALE
    rhs: float = 1.0


PRIVATE = BlockScales()


def triangle_size(factors: int) -> int:
    """Coordinates of a symmetric ``factors x factors`` block's upper triangle."""
    return factors * (factors + 1) // 2


def statistics_size(num_items: int, factors: int, *, private: bool = False) -> int:
    """Length of one device's upload: ``G``, every item's ``A_i`` (private: its weighted count), every item's ``b_i``."""
    if private:
        return triangle_size(factors) + num_items + num_items * factors
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


def contribution_bound(num_items: int, alpha: float, scales: BlockScales = PRIVATE) -> float:
    """The largest L2 norm of an unweighted private upload from a unit-norm factor and ``num_items`` items.

    ``||triu(x x^T)|| <= ||x||^2 = 1``: the global block adds at most ``s_G^2`` to the squared
    norm, each item ``s_c^2 + ((1 + alpha) s_b)^2``.
    """
    per_item = scales.count**2 + ((1.0 + alpha) * scales.rhs) ** 2
    return math.sqrt(scales.gram**2 + num_items * per_item)


def user_statistics(x: np.ndarray, items: np.ndarray, num_items: int, alpha: float = ALS_ALPHA) -> np.ndarray:
    """One user's exact statistics: the blocks ``G``, ``A_i``, ``b_i`` of factor ``x`` (float64)."""
    factors = len(x)
    tri = triangle_size(factors)
    outer = np.outer(x, x)[np.triu_indices(factors)]
    items = np.asarray(items, np.int64)
    out = np.zeros(statistics_size(num_items, factors), np.float64)
    out[:tri] = outer
    out[tri : tri * (num_items + 1)].reshape(num_items, tri)[items] = alpha * outer
    out[tri * (num_items + 1) :].reshape(num_items, factors)[items] = (1.0 + alpha) * x
    return out


def _symmetric(upper_rows: np.ndarray, factors: int) -> np.ndarray:
    """``[..., f(f+1)/2]`` upper triangles to full symmetric ``[..., f, f]`` matrices."""
    full = np.zeros((*upper_rows.shape[:-1], factors, factors), np.float64)
    i, j = np.triu_indices(factors)
    full[..., i, j] = upper_rows
    full[..., j, i] = upper_rows
    return full


def solve_items(total: np.ndarray, num_items: int, factors: int, reg: float = ALS_REGULARIZATION) -> np.ndarray:
    """Every item's factor from the exact *sum* of the devices' uploads: ``(G + A_i + reg I) y_i = b_i``."""
    tri = triangle_size(factors)
    total = _checked(total, statistics_size(num_items, factors))
    gram = _symmetric(total[:tri], factors)
    item_grams = _symmetric(total[tri : tri * (num_items + 1)].reshape(num_items, tri), factors)
    rhs = total[tri * (num_items + 1) :].reshape(num_items, factors)
    systems = gram[None] + item_grams + reg * np.eye(factors)
    return np.linalg.solve(systems, rhs[..., None])[..., 0]


def solve_items_private(
    total: np.ndarray, num_items: int, factors: int, noise_std: float, alpha: float = ALS_ALPHA,
    reg: float = ALS_REGULARIZATION, *, scales: BlockScales = PRIVATE, ridge_factor: float = DP_RIDGE_FACTOR,
) -> np.ndarray:
    """Every item's factor from the *noisy* sum of private uploads (``noise_std`` per coordinate).

    Item ``i``'s extra-confidence Gram ``alpha sum_u w_u x_u x_u^T`` is estimated as ``alpha c_i G / tr G``
    from its noisy weighted count ``c_i`` (the users' factors have unit norm, so ``tr G`` is the
    total weight): one noisy scalar per item instead of a noisy ``f x f`` matrix. ``G`` is
    projected onto the positive semi-definite cone, and every item gets a ridge of
    ``ridge_factor`` x the expected norm of its ``b_i``'s noise, which shrinks the items too few
    users vouch for towards zero.
    """
    tri = triangle_size(factors)
    total = _checked(total, statistics_size(num_items, factors, private=True))
    values, vectors = np.linalg.eigh(_symmetric(total[:tri], factors) / scales.gram)
    gram = (vectors * np.clip(values, 0.0, None)) @ vectors.T
    counts = np.clip(total[tri : tri + num_items] / scales.count, 0.0, None)
    rhs = total[tri + num_items :].reshape(num_items, factors) / scales.rhs
    mean_gram = gram / max(float(np.trace(gram)), 1e-12)
    ridge = reg + ridge_factor * noise_std / scales.rhs * math.sqrt(factors)
    systems = gram[None] + alpha * counts[:, None, None] * mean_gram[None] + ridge * np.eye(factors)
    return np.linalg.solve(systems, rhs[..., None])[..., 0]


def _checked(total: np.ndarray, size: int) -> np.ndarray:
    total = np.asarray(total, np.float64)
    if total.shape != (size,):
        raise ValueError(f"ALS statistics of shape {total.shape}, expected ({size},)")
    return total


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
    """A user-level DP device's upload ``[s_G w triu(x x^T), s_c w 1_i, s_b w (1 + alpha) x 1_i]``: norm <= ``clip``.

    The factor is solved on all the user's items (it stays on the device) and scaled to unit
    norm; the statistics cover at most ``max_items`` items drawn on the device, with weight
    ``w = clip / contribution_bound(k)``, so the norm is at most ``clip`` whatever the data.
    """
    y = np.asarray(item_factors, np.float64)
    factors = y.shape[1]
    x = solve_user(y, np.unique(items), reg, alpha)
    norm = float(np.linalg.norm(x))
    x = x / norm if norm > 0 else np.zeros_like(x)
    kept = bounded_items(items, max_items, rng)
    weight = clip / contribution_bound(len(kept), alpha, scales)
    tri = triangle_size(factors)
    out = np.zeros(statistics_size(num_items, factors, private=True), np.float64)
    out[:tri] = weight * scales.gram * np.outer(x, x)[np.triu_indices(factors)]
    out[tri : tri + num_items][kept] = weight * scales.count
    out[tri + num_items :].reshape(num_items, factors)[kept] = weight * scales.rhs * (1.0 + alpha) * x
    return out
