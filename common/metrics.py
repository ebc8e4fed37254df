"""Evaluation metrics for fedrec.

Metrics are computed on clients and combined on the server, so every ranking
metric is returned *per evaluated row* (one value per user or per held-out
pair).  Clients send ``sums(...)`` (sums plus a row count); the server combines
them with ``merge_sums``, which yields exactly the mean over all rows of all
clients.  A mean of per-client means would weight small clients too heavily.

Tie policy: ties are always broken *against* the relevant item.  A model that
gives every item the same score therefore ranks the relevant item last and
scores HR = NDCG = 0, instead of looking good thanks to an arbitrary tie-break.
AUC is the exception: it is a pairwise probability, and the usual convention
counts a tied pair as 0.5.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "sampled_ranks",
    "hit_at_k",
    "ndcg_at_k",
    "reciprocal_rank",
    "sampled_auc",
    "sampled_metrics",
    "full_ranking_metrics",
    "top_k_items",
    "rmse",
    "mae",
    "catalogue_coverage",
    "average_popularity",
    "novelty",
    "intra_list_diversity",
    "mmr_rerank",
    "recommended_counts",
    "coverage_from_counts",
    "novelty_from_counts",
    "summarize",
    "sums",
    "merge_sums",
]

# Upper bound on the number of float comparisons materialised at once when
# ranking held-out items against the full catalogue (memory, not speed).
_PAIR_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------


def _check_k(k: int) -> int:
    if isinstance(k, (bool, np.bool_)):
        raise TypeError("k must be an integer, not bool")
    k = operator.index(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return k


def _float_array(x: ArrayLike, name: str, ndim: int) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    return arr


def _check_ranks(ranks: ArrayLike) -> np.ndarray:
    arr = np.asarray(ranks)
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"ranks must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if (arr < 0).any():
        raise ValueError("ranks must be >= 0")
    return arr


def _int_array(x: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.size == 0:
        return np.zeros(arr.shape, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer item indices, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _flatten_ragged(
    lists: Sequence[ArrayLike], n_rows: int, n_items: int, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """(row, item) pairs of a ragged per-row index list, deduplicated and sorted."""
    if len(lists) != n_rows:
        raise ValueError(f"{name} has {len(lists)} rows, scores has {n_rows}")
    cols = [_int_array(x, f"{name}[{i}]").ravel() for i, x in enumerate(lists)]
    lengths = np.array([c.size for c in cols], dtype=np.int64)
    flat = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= n_items):
        raise ValueError(f"{name} contains item indices outside [0, {n_items})")
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), lengths)
    keys = np.unique(rows * n_items + flat)
    return keys // n_items, keys % n_items


def _exclusion_mask(
    exclude: Sequence[ArrayLike] | None, n_rows: int, n_items: int
) -> np.ndarray:
    mask = np.zeros((n_rows, n_items), dtype=bool)
    if exclude is not None:
        rows, cols = _flatten_ragged(exclude, n_rows, n_items, "exclude")
        mask[rows, cols] = True
    return mask


# --------------------------------------------------------------------------
# sampled ranking (one positive vs m sampled negatives)
# --------------------------------------------------------------------------


def _check_sampled(
    positive_scores: ArrayLike, negative_scores: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    pos = _float_array(positive_scores, "positive_scores", 1)
    neg = _float_array(negative_scores, "negative_scores", 2)
    if neg.shape[0] != pos.shape[0]:
        raise ValueError(
            f"positive_scores has {pos.shape[0]} rows, negative_scores has {neg.shape[0]}"
        )
    if neg.shape[1] == 0:
        raise ValueError("negative_scores must have at least one negative per row")
    return pos, neg


def sampled_ranks(positive_scores: np.ndarray, negative_scores: np.ndarray) -> np.ndarray:
    """0-based rank of each positive among its m+1 candidates.

    rank_i = #{j : neg[i, j] > pos[i]} + #{j : neg[i, j] == pos[i]}.
    Ties count against the positive (pessimistic), so a constant scorer gets
    rank m rather than an optimistic 0.  NaN scores raise ValueError.
    """
    pos, neg = _check_sampled(positive_scores, negative_scores)
    return (neg >= pos[:, None]).sum(axis=1).astype(np.int64)


def hit_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-row hit rate: 1.0 if rank < k else 0.0 (ranks are 0-based)."""
    return (_check_ranks(ranks) < _check_k(k)).astype(np.float64)


def ndcg_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-row NDCG@k for a single relevant item.

    With one relevant item IDCG = 1, so NDCG = 1/log2(rank + 2) if rank < k
    else 0 (ranks are 0-based).
    """
    r = _check_ranks(ranks)
    k = _check_k(k)
    return np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0)


def reciprocal_rank(ranks: np.ndarray) -> np.ndarray:
    """Per-row reciprocal rank 1/(rank + 1); its mean is MRR."""
    return 1.0 / (_check_ranks(ranks) + 1.0)


def sampled_auc(positive_scores: np.ndarray, negative_scores: np.ndarray) -> np.ndarray:
    """Per-row AUC: fraction of negatives scored strictly below the positive.

    auc_i = (#{neg < pos} + 0.5 * #{neg == pos}) / m.  Ties count 0.5 (the
    probabilistic AUC definition), so a constant scorer gets exactly 0.5.
    """
    pos, neg = _check_sampled(positive_scores, negative_scores)
    below = (neg < pos[:, None]).sum(axis=1)
    tied = (neg == pos[:, None]).sum(axis=1)
    return (below + 0.5 * tied) / neg.shape[1]


def sampled_metrics(
    positive_scores: np.ndarray, negative_scores: np.ndarray, k: int = 10
) -> dict[str, np.ndarray]:
    """All sampled-ranking metrics per row: keys "hr@k", "ndcg@k", "mrr", "auc"."""
    ranks = sampled_ranks(positive_scores, negative_scores)
    return {
        f"hr@{k}": hit_at_k(ranks, k),
        f"ndcg@{k}": ndcg_at_k(ranks, k),
        "mrr": reciprocal_rank(ranks),
        "auc": sampled_auc(positive_scores, negative_scores),
    }


# --------------------------------------------------------------------------
# full ranking (every non-excluded item is a candidate)
# --------------------------------------------------------------------------


def full_ranking_metrics(
    scores: np.ndarray,
    relevant: list[np.ndarray],
    k: int = 10,
    *,
    exclude: list[np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Per-row ranking metrics against the whole catalogue.

    Candidates of row u are all items not in exclude[u] (typically the user's
    training items); excluded items are removed from the ranking entirely, so
    they are never hits and never count as negatives.  A relevant item that is
    also excluded is dropped from relevant[u].  Rows left with no relevant item
    raise ValueError (callers must drop them), as do NaN scores.

    The ranking is the worst case consistent with the scores: among equal
    scores, non-relevant candidates come first (relevant items tied with each
    other keep index order).  Hence a relevant item's 0-based position is
    #{non-relevant candidates with score >= its score} + #{relevant items
    before it}.  Every metric below is read off this single ordering:

    - "hr@k":        1 if any relevant item is in the top k
    - "precision@k": hits / k
    - "recall@k":    hits / len(relevant)
    - "ndcg@k":      binary-relevance DCG@k / IDCG, IDCG over min(len(relevant), k)
    - "mrr":         1 / (position of the first relevant item + 1)
    - "auc":         fraction of (relevant, non-relevant candidate) pairs with
                     the relevant item scored higher, ties counting 0.5
    """
    s = _float_array(scores, "scores", 2)
    k = _check_k(k)
    n_rows, n_items = s.shape
    excluded = _exclusion_mask(exclude, n_rows, n_items)

    rel_rows, rel_items = _flatten_ragged(relevant, n_rows, n_items, "relevant")
    n_given = np.bincount(rel_rows, minlength=n_rows)
    keep = ~excluded[rel_rows, rel_items]
    rel_rows, rel_items = rel_rows[keep], rel_items[keep]
    n_rel = np.bincount(rel_rows, minlength=n_rows)
    if (n_rel == 0).any():
        empty = np.flatnonzero(n_given == 0)
        all_excl = np.flatnonzero((n_rel == 0) & (n_given > 0))
        raise ValueError(
            "rows without relevant items must be dropped before evaluation: "
            f"empty rows {empty[:10].tolist()}, "
            f"rows whose relevant items are all excluded {all_excl[:10].tolist()}"
        )
    is_relevant = np.zeros((n_rows, n_items), dtype=bool)
    is_relevant[rel_rows, rel_items] = True
    n_neg = n_items - excluded.sum(axis=1) - n_rel
    if (n_neg == 0).any():
        raise ValueError(
            "AUC is undefined for rows with no non-relevant candidate: "
            f"{np.flatnonzero(n_neg == 0)[:10].tolist()}"
        )

    # Scores of the non-relevant candidates only; NaN compares False to everything.
    neg_scores = np.where(excluded | is_relevant, np.nan, s)
    rel_scores = s[rel_rows, rel_items]
    n_pairs = rel_rows.size
    neg_above = np.empty(n_pairs, dtype=np.int64)
    neg_tied = np.empty(n_pairs, dtype=np.int64)
    chunk = max(1, _PAIR_CHUNK_ELEMENTS // n_items)
    for start in range(0, n_pairs, chunk):
        sl = slice(start, start + chunk)
        row_neg = neg_scores[rel_rows[sl]]
        target = rel_scores[sl, None]
        neg_above[sl] = (row_neg > target).sum(axis=1)
        neg_tied[sl] = (row_neg == target).sum(axis=1)

    # Relevant items before each relevant item: sort pairs by (row, -score, item).
    order = np.lexsort((rel_items, -rel_scores, rel_rows))
    row_start = np.concatenate(([0], np.cumsum(n_rel)[:-1]))
    rel_before = np.empty(n_pairs, dtype=np.int64)
    rel_before[order] = np.arange(n_pairs) - row_start[rel_rows[order]]

    position = neg_above + neg_tied + rel_before
    hit = position < k
    hits = np.bincount(rel_rows, weights=hit, minlength=n_rows)

    discounts = 1.0 / np.log2(np.arange(k) + 2.0)
    gains = np.where(hit, 1.0 / np.log2(position + 2.0), 0.0)
    dcg = np.bincount(rel_rows, weights=gains, minlength=n_rows)
    idcg = np.cumsum(discounts)[np.minimum(n_rel, k) - 1]

    first = np.full(n_rows, np.iinfo(np.int64).max)
    np.minimum.at(first, rel_rows, position)

    pair_auc = (n_neg[rel_rows] - neg_above - 0.5 * neg_tied) / n_neg[rel_rows]
    auc = np.bincount(rel_rows, weights=pair_auc, minlength=n_rows) / n_rel

    return {
        f"hr@{k}": (hits > 0).astype(np.float64),
        f"precision@{k}": hits / k,
        f"recall@{k}": hits / n_rel,
        f"ndcg@{k}": dcg / idcg,
        "mrr": 1.0 / (first + 1.0),
        "auc": auc,
    }


def top_k_items(
    scores: np.ndarray, k: int, *, exclude: list[np.ndarray] | None = None
) -> np.ndarray:
    """[n_users, k] item indices by descending score, excluded items never returned.

    Uses argpartition (O(n_items) per row) and sorts only the k winners; equal
    scores within the k are ordered by item index, but which of several items
    tied at the k-th score gets in is unspecified.  Raises ValueError if a row
    has fewer than k non-excluded items, rather than padding with fake indices.
    """
    s = _float_array(scores, "scores", 2)
    k = _check_k(k)
    n_rows, n_items = s.shape
    if k > n_items:
        raise ValueError(f"k={k} exceeds the number of items {n_items}")
    excluded = _exclusion_mask(exclude, n_rows, n_items)
    short = np.flatnonzero(n_items - excluded.sum(axis=1) < k)
    if short.size:
        raise ValueError(f"rows {short[:10].tolist()} have fewer than k={k} candidates")
    # Excluded -> NaN, which argpartition/lexsort place after every real score,
    # including -inf, so they can never be selected.
    neg = np.where(excluded, np.nan, -s)
    if k < n_items:
        idx = np.argpartition(neg, k - 1, axis=1)[:, :k]
    else:
        idx = np.broadcast_to(np.arange(n_items), (n_rows, n_items))
    order = np.lexsort((idx, np.take_along_axis(neg, idx, axis=1)), axis=-1)
    return np.take_along_axis(idx, order, axis=1)


# --------------------------------------------------------------------------
# rating prediction
# --------------------------------------------------------------------------


def _errors(predictions: ArrayLike, targets: ArrayLike) -> np.ndarray:
    p = np.asarray(predictions, dtype=np.float64)
    t = np.asarray(targets, dtype=np.float64)
    if p.shape != t.shape:
        raise ValueError(f"shape mismatch: predictions {p.shape} vs targets {t.shape}")
    if p.size == 0:
        raise ValueError("predictions and targets are empty")
    if np.isnan(p).any() or np.isnan(t).any():
        raise ValueError("predictions or targets contain NaN")
    return p - t


def rmse(predictions: np.ndarray, targets: np.ndarray) -> float:
    """Root mean squared error sqrt(mean((p - t)^2)).

    Not additive across clients: to federate, send sums({"se": (p - t) ** 2})
    and take the square root of the merged mean.
    """
    return float(np.sqrt(np.mean(_errors(predictions, targets) ** 2)))


def mae(predictions: np.ndarray, targets: np.ndarray) -> float:
    """Mean absolute error mean(|p - t|)."""
    return float(np.mean(np.abs(_errors(predictions, targets))))


# --------------------------------------------------------------------------
# beyond accuracy, over top-k lists [n_users, k]
# --------------------------------------------------------------------------


def _check_top_k(top_k: ArrayLike, num_items: int) -> np.ndarray:
    arr = np.asarray(top_k)
    if arr.ndim != 2:
        raise ValueError(f"top_k must be 2-D [n_users, k], got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("top_k is empty")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"top_k must hold integer item indices, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= num_items:
        raise ValueError(f"top_k contains item indices outside [0, {num_items})")
    return arr


def _check_popularity(item_popularity: ArrayLike) -> np.ndarray:
    pop = _float_array(item_popularity, "item_popularity", 1)
    if (pop < 0).any():
        raise ValueError("item_popularity must be non-negative")
    return pop


def catalogue_coverage(top_k: np.ndarray, num_items: int) -> float:
    """Share of the catalogue recommended to anyone: #distinct items in top_k / num_items."""
    num_items = operator.index(num_items)
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    return np.unique(_check_top_k(top_k, num_items)).size / num_items


def average_popularity(top_k: np.ndarray, item_popularity: np.ndarray) -> float:
    """Average recommendation popularity (ARP), a popularity-bias measure.

    Mean training-interaction count over all recommended slots; with equal
    list lengths this equals the mean over users of each list's mean.
    """
    pop = _check_popularity(item_popularity)
    return float(pop[_check_top_k(top_k, pop.size)].mean())


def novelty(top_k: np.ndarray, item_popularity: np.ndarray, num_users: int) -> float:
    """Mean self-information of recommended items: mean of -log2(pop_i / num_users).

    pop_i is the number of training users who interacted with item i, so
    pop_i / num_users is the chance a random user knows it.  Items never seen
    in training (pop 0) are smoothed to pop 1 so the value stays finite.
    Raises ValueError if any pop_i > num_users (e.g. repeat-interaction counts).
    """
    num_users = operator.index(num_users)
    if num_users < 1:
        raise ValueError(f"num_users must be >= 1, got {num_users}")
    pop = _check_popularity(item_popularity)
    if (pop > num_users).any():
        raise ValueError("item_popularity exceeds num_users; pass distinct-user counts")
    p = np.maximum(pop[_check_top_k(top_k, pop.size)], 1.0) / num_users
    return float(np.mean(-np.log2(p)))


def intra_list_diversity(top_k: np.ndarray, item_features: np.ndarray) -> np.ndarray:
    """Per-list ILD: mean cosine distance between the feature vectors of every pair in the list.

    0 when all items look alike (same genres), up to 1 for pairwise disjoint ones; an item
    without features is treated as unlike every other.
    """
    features = _float_array(item_features, "item_features", 2)
    lists = _check_top_k(top_k, features.shape[0])
    if lists.shape[1] < 2:
        raise ValueError("intra-list diversity needs lists of at least 2 items")
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    unit = np.divide(features, norms, out=np.zeros_like(features), where=norms > 0)
    vectors = unit[lists]  # [n, k, f]
    similarity = np.einsum("nif,njf->nij", vectors, vectors)
    k = lists.shape[1]
    pairs = similarity[:, ~np.eye(k, dtype=bool)].reshape(len(lists), k * (k - 1))
    return 1.0 - pairs.mean(axis=1)


def mmr_rerank(scores: np.ndarray, item_features: np.ndarray, k: int, weight: float, *,
               exclude: list[np.ndarray] | None = None, pool: int = 100) -> np.ndarray:
    """Maximal marginal relevance (Carbonell & Goldstein 1998): [n_users, k] lists.

    Greedily picks, from the ``pool`` best-scored candidates, the item maximising
    ``(1 - weight) * relevance - weight * max cosine similarity to the items already picked``,
    relevance being the score min-max scaled to [0, 1] within the pool. ``weight`` 0 is
    the plain top-k; larger weights trade accuracy for diversity.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    fewest = scores.shape[1] - max((len(np.unique(e)) for e in exclude), default=0) if exclude else scores.shape[1]
    candidates = top_k_items(scores, max(k, min(pool, fewest)), exclude=exclude)
    if weight == 0.0:
        return candidates[:, :k]
    features = _float_array(item_features, "item_features", 2)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    unit = np.divide(features, norms, out=np.zeros_like(features), where=norms > 0)
    out = np.empty((len(candidates), k), dtype=np.int64)
    for row, items in enumerate(candidates):
        relevance = np.asarray(scores[row], np.float64)[items]
        span = relevance.max() - relevance.min()
        relevance = (relevance - relevance.min()) / span if span > 0 else np.zeros_like(relevance)
        similarity = unit[items] @ unit[items].T
        closest = np.full(len(items), -np.inf)  # max similarity to the picked items; none picked yet
        available = np.ones(len(items), dtype=bool)
        for slot in range(k):
            gain = (1.0 - weight) * relevance - weight * np.where(np.isinf(closest), 0.0, closest)
            gain[~available] = -np.inf
            pick = int(np.argmax(gain))
            out[row, slot] = items[pick]
            available[pick] = False
            closest = np.maximum(closest, similarity[pick])
    return out


def recommended_counts(top_k: np.ndarray, num_items: int) -> np.ndarray:
    """How often each item appears in the lists: what a client sends instead of the lists."""
    return np.bincount(_check_top_k(top_k, num_items).ravel(), minlength=num_items)


def coverage_from_counts(counts: np.ndarray) -> float:
    """:func:`catalogue_coverage` from summed :func:`recommended_counts`."""
    counts = np.asarray(counts)
    return float((counts > 0).sum() / counts.size)


def novelty_from_counts(counts: np.ndarray, item_popularity: np.ndarray, num_users: int) -> float:
    """:func:`novelty` from summed :func:`recommended_counts` (the same value)."""
    pop = _check_popularity(item_popularity)
    counts = np.asarray(counts, np.float64)
    if counts.sum() <= 0:
        raise ValueError("no recommended items to measure")
    information = -np.log2(np.maximum(pop, 1.0) / num_users)
    return float((counts * information).sum() / counts.sum())


# --------------------------------------------------------------------------
# aggregation (client -> server)
# --------------------------------------------------------------------------


def _row_count(per_row: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    if "count" in per_row:
        raise ValueError('"count" is reserved for the row count')
    arrays = {key: np.asarray(v, dtype=np.float64) for key, v in per_row.items()}
    lengths = {a.shape for a in arrays.values()}
    if any(a.ndim != 1 for a in arrays.values()) or len(lengths) > 1:
        raise ValueError(f"per-row metrics must be 1-D and equally long, got shapes {lengths}")
    n = next(iter(lengths))[0] if lengths else 0
    return arrays, n


def summarize(per_row: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean of each per-row metric, plus "count" = number of rows."""
    arrays, n = _row_count(per_row)
    if n == 0:
        raise ValueError("cannot summarize zero rows")
    out = {key: float(a.mean()) for key, a in arrays.items()}
    out["count"] = float(n)
    return out


def sums(per_row: dict[str, np.ndarray]) -> dict[str, float]:
    """Sum of each per-row metric, plus "count": what a client sends for merging.

    Zero rows is allowed (all sums 0, count 0) so a client with no test data
    can still report.
    """
    arrays, n = _row_count(per_row)
    out = {key: float(a.sum()) for key, a in arrays.items()}
    out["count"] = float(n)
    return out


def merge_sums(parts: Iterable[dict[str, float]]) -> dict[str, float]:
    """Combine clients' ``sums`` into means over all their rows.

    mean[key] = sum of part[key] / sum of part["count"] over the parts that
    report key, so a metric only some clients compute is averaged over their
    rows only.  "count" is the total row count.  A key whose reporting parts
    hold zero rows has no mean and is left out.
    """
    totals: dict[str, float] = {}
    counts: dict[str, float] = {}
    total_count = 0.0
    for part in parts:
        if "count" not in part:
            raise ValueError('every part needs a "count"')
        count = float(part["count"])
        if count < 0:
            raise ValueError(f"negative count {count}")
        total_count += count
        for key, value in part.items():
            if key == "count":
                continue
            totals[key] = totals.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0.0) + count
    out = {key: totals[key] / counts[key] for key in totals if counts[key] > 0}
    out["count"] = total_count
    return out
