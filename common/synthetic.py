"""Synthetic implicit/explicit feedback with a known collaborative structure.

Used for tests, CI and scale experiments where MovieLens is unavailable. The
data must reward collaborative filtering (a trained MF has to beat popularity
on it), so choices depend on hidden user/item factors, not only popularity.
"""

from __future__ import annotations

import numpy as np

from common.interactions import Interactions

__all__ = ["generate_synthetic", "synthetic_item_factors"]

_TEMPERATURE = 0.35  # softmax temperature on user.item affinity (std 1 by construction)
_ACTIVITY_SIGMA = 1.0  # lognormal sigma of per-user activity: heavy tail like MovieLens
_CANDIDATE_FACTOR = 4  # popularity-drawn candidates per wanted item (see _sample_light)
_CANDIDATE_EXTRA = 16
_CHUNK_ELEMENTS = 1 << 21  # user x item cells handled at once (bounds memory at ~100 MB)
_T0 = 1_000_000_000  # 2001-09-09, first possible timestamp
_SPAN = 3 * 365 * 86400  # users start within three years
_MEAN_GAP = 86400  # mean seconds between a user's consecutive interactions


def _gumbel(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    # -log(Exp(1)) is Gumbel(0, 1); float64 avoids log(0) from float32 underflow.
    return -np.log(rng.standard_exponential(shape))


def _dot_rows(u_vec: np.ndarray, rows: np.ndarray, v_vec: np.ndarray, items: np.ndarray) -> np.ndarray:
    """``u_vec[rows] . v_vec[items]`` pairwise.

    An explicit loop over the few factor dimensions is ~3x faster than einsum
    here and, unlike BLAS, gives the same bits on every machine.
    """
    u_cols = np.ascontiguousarray(u_vec.T)  # gathers from contiguous 1-D columns
    v_cols = np.ascontiguousarray(v_vec.T)
    acc = np.zeros(len(rows), dtype=np.float32)
    for d in range(len(u_cols)):
        acc += u_cols[d][rows] * v_cols[d][items]
    return acc


def _top_per_row(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of the ``counts[r]`` largest keys of each row r."""
    k = int(counts.max())
    if k < keys.shape[1]:
        part = np.argpartition(-keys, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(keys.shape[1]), keys.shape)
    order = np.argsort(-np.take_along_axis(keys, part, axis=1), axis=1, kind="stable")
    cols = np.take_along_axis(part, order, axis=1)
    take = np.arange(cols.shape[1]) < counts[:, None]
    rows = np.broadcast_to(np.arange(len(counts))[:, None], cols.shape)
    return rows[take], cols[take]


def _sample_exact(
    rng: np.random.Generator,
    u_vec: np.ndarray,
    v_vec: np.ndarray,
    log_pop: np.ndarray,
    counts: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plackett-Luce over all items via Gumbel-top-k (used for heavy users)."""
    aff = np.zeros((len(u_vec), len(v_vec)), dtype=np.float32)
    for d in range(u_vec.shape[1]):
        aff += u_vec[:, d, None] * v_vec[None, :, d]
    keys = log_pop[None, :] + aff / _TEMPERATURE + _gumbel(rng, aff.shape)
    rows, items = _top_per_row(keys, counts)
    return rows, items, aff[rows, items]


def _guide_table(cdf: np.ndarray) -> np.ndarray:
    """Lookup table for :func:`_inverse_cdf` (16 buckets per item)."""
    buckets = 16 * len(cdf)
    return np.searchsorted(cdf, np.arange(buckets) / buckets, side="right")


def _inverse_cdf(cdf: np.ndarray, guide: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``searchsorted(cdf, u, side="right")`` for ``cdf[-1] == 1``, u in [0, 1).

    Guide-table inversion: jump to the first item that can hold u's bucket,
    then step forward the few positions left. Several times faster than a
    binary search over millions of draws.
    """
    idx = guide[(u * len(guide)).astype(np.int64)]
    active = np.flatnonzero(cdf[idx] <= u)
    while active.size:
        idx[active] += 1
        active = active[cdf[idx[active]] <= u[active]]
    return idx


def _sample_light(
    rng: np.random.Generator,
    u_vec: np.ndarray,
    v_vec: np.ndarray,
    pop_cdf: np.ndarray,
    guide: np.ndarray,
    counts: np.ndarray,
    num_candidates: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Approximate Plackett-Luce for light users by sampling-importance-resampling.

    Candidates are drawn with replacement from the popularity distribution,
    then chosen without replacement by Gumbel-top-k on
    ``multiplicity * exp(affinity / T)``; as the candidate pool grows this
    converges to drawing with probability ∝ popularity * exp(affinity / T)
    at a fraction of the cost of scoring every item. Returns the rows that
    had too few distinct candidates so the caller can redo them exactly.
    """
    b = len(counts)
    # Sorted uniforms make each row's searchsorted output sorted too (grouping
    # duplicates for free) and let numpy's binary search reuse its last bound.
    uniform = rng.random((b, num_candidates))
    uniform.sort(axis=1)
    cand = _inverse_cdf(pop_cdf, guide, uniform.ravel()).reshape(uniform.shape)
    first = np.ones(cand.shape, dtype=bool)
    first[:, 1:] = cand[:, 1:] != cand[:, :-1]
    starts = np.flatnonzero(first.ravel())  # one entry per distinct candidate
    multiplicity = np.diff(np.append(starts, cand.size))
    start_rows = starts // num_candidates
    start_items = cand.ravel()[starts]
    aff = _dot_rows(u_vec, start_rows, v_vec, start_items)
    keys = np.full(cand.shape, -np.inf)
    keys.ravel()[starts] = (
        np.log(multiplicity) + aff / _TEMPERATURE + _gumbel(rng, (len(starts),))
    )
    short = first.sum(axis=1) < counts
    ok = np.flatnonzero(~short)
    if len(ok) == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, np.empty(0, dtype=np.float32), np.flatnonzero(short)
    rows, cols = _top_per_row(keys[ok], counts[ok])
    rows = ok[rows]
    # Map chosen cells back to their distinct-candidate entry for the affinity.
    chosen = np.searchsorted(starts, rows * num_candidates + cols)
    return rows, start_items[chosen], aff[chosen], np.flatnonzero(short)


def _draw_factors(rng: np.random.Generator, num_users: int, num_items: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The hidden user and item factors, the first draws of the generator's stream."""
    scale = dim**-0.25
    # float32 factors halve the memory traffic of the candidate gathers.
    u_vec = (rng.standard_normal((num_users, dim)) * scale).astype(np.float32)
    v_vec = (rng.standard_normal((num_items, dim)) * scale).astype(np.float32)
    return u_vec, v_vec


def synthetic_item_factors(num_users: int, num_items: int, *, dim: int = 16, seed: int = 0) -> np.ndarray:
    """The hidden item factors :func:`generate_synthetic` uses for these arguments.

    The synthetic catalogue's content features are derived from them
    (:func:`common.item_features.synthetic_item_features`).
    """
    return _draw_factors(np.random.default_rng(seed), num_users, num_items, dim)[1]


def generate_synthetic(
    num_users: int = 1000,
    num_items: int = 500,
    *,
    dim: int = 16,
    mean_interactions: float = 30,
    min_interactions: int = 5,
    popularity_exponent: float = 1.0,
    seed: int = 0,
) -> Interactions:
    """Seeded synthetic interactions with learnable collaborative signal.

    Model: Gaussian user/item factors scaled so ``user.item`` ~ N(0, 1);
    Zipf item popularity ``(rank+1)**-popularity_exponent`` over a random
    item order; per-user activity lognormal (sigma 1) with mean
    ``mean_interactions``, rounded and clipped to
    ``[min_interactions, num_items // 2]`` (so the realised mean is close to,
    not exactly, ``mean_interactions``). Each user's
    items are drawn without replacement with probability
    ∝ popularity * exp(user.item / 0.35) (exactly for heavy users, by
    candidate resampling for the rest). Ratings 1..5 grow with the affinity
    plus noise; timestamps strictly increase within a user in a random order
    of that user's items. Output rows are sorted by user, then time; ids are
    ``0..n-1`` and every item id exists even if never drawn. The same
    arguments give bit-identical arrays.
    """
    if num_users < 1 or num_items < 2:
        raise ValueError("need num_users >= 1 and num_items >= 2")
    if dim < 1:
        raise ValueError("dim must be >= 1")
    if not 1 <= min_interactions <= num_items // 2:
        raise ValueError(
            f"min_interactions must be in [1, num_items // 2 = {num_items // 2}], "
            f"got {min_interactions}"
        )
    if mean_interactions <= 0:
        raise ValueError("mean_interactions must be > 0")

    rng = np.random.default_rng(seed)
    u_vec, v_vec = _draw_factors(rng, num_users, num_items, dim)
    rank = rng.permutation(num_items)
    log_pop = -popularity_exponent * np.log1p(rank.astype(np.float64))
    pop = np.exp(log_pop - log_pop.max())
    pop_cdf = np.cumsum(pop / pop.sum())
    pop_cdf[-1] = 1.0  # exact upper end, so inverse-CDF sampling stays in range
    guide = _guide_table(pop_cdf)

    mu = np.log(mean_interactions) - _ACTIVITY_SIGMA**2 / 2
    counts = np.rint(rng.lognormal(mu, _ACTIVITY_SIGMA, num_users)).astype(np.int64)
    np.clip(counts, min_interactions, num_items // 2, out=counts)

    # Light users, grouped by activity so each chunk's candidate width fits.
    pool = _CANDIDATE_FACTOR * counts + _CANDIDATE_EXTRA
    light = np.flatnonzero(pool < num_items)
    light = light[np.argsort(counts[light], kind="stable")]
    light_pool = pool[light]
    heavy = [np.flatnonzero(pool >= num_items)]

    out_users: list[np.ndarray] = []
    out_items: list[np.ndarray] = []
    out_aff: list[np.ndarray] = []
    start = 0
    while start < len(light):
        # Largest chunk whose rows x widest-candidate-pool fits the budget;
        # light is sorted by activity, so the widest row is the last one.
        cells = np.arange(1, len(light) - start + 1) * light_pool[start:]
        stop = start + max(1, int(np.searchsorted(cells, _CHUNK_ELEMENTS, side="right")))
        width = int(light_pool[stop - 1])
        users = light[start:stop]
        rows, items, aff, short = _sample_light(
            rng, u_vec[users], v_vec, pop_cdf, guide, counts[users], width
        )
        out_users.append(users[rows])
        out_items.append(items)
        out_aff.append(aff)
        heavy.append(users[short])
        start = stop

    heavy_users = np.sort(np.concatenate(heavy))
    step = max(1, _CHUNK_ELEMENTS // num_items)
    for s in range(0, len(heavy_users), step):
        users = heavy_users[s : s + step]
        rows, items, aff = _sample_exact(rng, u_vec[users], v_vec, log_pop, counts[users])
        out_users.append(users[rows])
        out_items.append(items)
        out_aff.append(aff)

    users = np.concatenate(out_users).astype(np.int64)
    items = np.concatenate(out_items).astype(np.int64)
    aff = np.concatenate(out_aff)
    n = len(users)

    # Calibrated so the rating histogram resembles MovieLens (mean ~3.5, mode 4).
    noisy = 3.55 + 1.0 * (aff - 1.0) + 0.7 * rng.standard_normal(n)
    ratings = np.clip(np.rint(noisy), 1, 5).astype(np.float32)

    # Random order within each user, then strictly increasing times. One
    # float argsort on user + U[0, 1) is much cheaper than a two-key lexsort.
    order = np.argsort(users + rng.random(n))
    users, items, ratings = users[order], items[order], ratings[order]
    gaps = 1 + np.floor(rng.exponential(_MEAN_GAP, n)).astype(np.int64)
    elapsed = np.cumsum(gaps)
    group_start = np.ones(n, dtype=bool)
    group_start[1:] = users[1:] != users[:-1]
    before_group = np.maximum.accumulate(np.where(group_start, elapsed - gaps, 0))
    base = _T0 + rng.integers(0, _SPAN, num_users)
    timestamps = base[users] + elapsed - before_group

    return Interactions(
        users=users,
        items=items,
        ratings=ratings,
        timestamps=timestamps,
        user_ids=np.arange(num_users, dtype=np.int64),
        item_ids=np.arange(num_items, dtype=np.int64),
    )
