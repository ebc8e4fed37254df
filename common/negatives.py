"""Negative item sampling for sampled-ranking evaluation (e.g. 1 positive + 99 negatives)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["sample_negatives"]

_CHUNK_ROWS = 8192  # users per vectorised batch: bounds temporaries to a few MB


def _distinct_ranks(rng: np.random.Generator, sizes: np.ndarray, k: int) -> np.ndarray:
    """Per row r, ``k`` distinct uniform draws from ``range(sizes[r])``, sorted (``sizes >= k``).

    Small ranges take the first ``k`` of a random permutation (argsort of
    noise). Large ones draw ``k`` values and redraw only the duplicates until
    none are left. Both procedures treat all values symmetrically, so every
    k-subset is equally likely.
    """
    out = np.empty((len(sizes), k), dtype=np.int64)
    if k == 0 or len(sizes) == 0:
        return out
    small = sizes < 4 * k
    idx = np.flatnonzero(small)
    if idx.size:
        width = int(sizes[idx].max())
        noise = rng.random((idx.size, width))
        noise[np.arange(width)[None, :] >= sizes[idx, None]] = np.inf
        out[idx] = np.argsort(noise, axis=1)[:, :k]
    big = np.flatnonzero(~small)
    if big.size:
        vals = rng.integers(0, sizes[big, None], size=(big.size, k))
        active = np.arange(big.size)
        while active.size:
            sub = np.sort(vals[active], axis=1)
            dup = np.zeros(sub.shape, dtype=bool)
            dup[:, 1:] = sub[:, 1:] == sub[:, :-1]
            has_dup = dup.any(axis=1)
            vals[active] = sub
            active, sub, dup = active[has_dup], sub[has_dup], dup[has_dup]
            rows, cols = np.nonzero(dup)
            sub[rows, cols] = rng.integers(0, sizes[big[active[rows]]])
            vals[active] = sub
        out[big] = vals
    out.sort(axis=1)
    return out


def sample_negatives(
    known: sp.csr_matrix,
    users: np.ndarray,
    num_negatives: int = 99,
    *,
    seed: int = 0,
) -> np.ndarray:
    """Uniform random items each user has never interacted with.

    Returns ``[len(users), num_negatives]`` int64 item indices; row ``r``
    holds distinct items (ascending) outside ``known[users[r]]`` (every stored entry of
    ``known`` counts as known, even an explicit zero, so pass all of train +
    validation + test). Sampling is exact, not rejection of known items:
    each row draws distinct ranks among the user's unseen items and maps
    rank -> item id through the sorted known items, so heavy users cost no
    more than light ones. Same inputs and seed give the same output.

    Raises ``ValueError`` if some user has fewer than ``num_negatives``
    unseen items.
    """
    if num_negatives < 0:
        raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
    known = sp.csr_matrix(known)
    if not known.has_canonical_format:
        known = known.copy()
        known.sum_duplicates()  # sorted, unique column indices per row
    num_users, num_items = known.shape
    users = np.asarray(users, dtype=np.int64).ravel()
    if users.size and (users.min() < 0 or users.max() >= num_users):
        raise ValueError(f"users must be in [0, {num_users}), got range [{users.min()}, {users.max()}]")
    indptr = known.indptr.astype(np.int64)
    indices = known.indices.astype(np.int64)
    num_known = indptr[users + 1] - indptr[users]
    unseen = num_items - num_known
    if users.size and unseen.min() < num_negatives:
        r = int(np.argmin(unseen))
        raise ValueError(
            f"user {users[r]} has only {unseen[r]} unseen items out of {num_items}, "
            f"cannot sample {num_negatives} distinct negatives"
        )

    rng = np.random.default_rng(seed)
    out = np.empty((users.size, num_negatives), dtype=np.int64)
    for start in range(0, users.size, _CHUNK_ROWS):
        chunk = users[start : start + _CHUNK_ROWS]
        lengths = num_known[start : start + _CHUNK_ROWS]
        ranks = _distinct_ranks(rng, unseen[start : start + _CHUNK_ROWS], num_negatives)
        # Known items of these rows, flattened. For sorted known items s_j of a
        # user, the unseen item with rank r is r + #{j : s_j - j <= r}; adding
        # row * (num_items + 1) makes one global sorted array for searchsorted.
        row_start = np.cumsum(lengths) - lengths
        row_of = np.repeat(np.arange(chunk.size, dtype=np.int64), lengths)
        within = np.arange(row_of.size, dtype=np.int64) - row_start[row_of]
        src = indptr[chunk][row_of] + within
        stride = num_items + 1
        shifted = indices[src] - within + row_of * stride
        query = ranks + (np.arange(chunk.size, dtype=np.int64) * stride)[:, None]
        below = np.searchsorted(shifted, query, side="right") - row_start[:, None]
        out[start : start + chunk.size] = ranks + below
    return out
