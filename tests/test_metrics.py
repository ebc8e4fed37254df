"""Tests for common.metrics: hand-computed cases plus a brute-force reference."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest

from common import metrics as M

LOG2_3 = math.log2(3)


# --------------------------------------------------------------------------
# sampled ranking
# --------------------------------------------------------------------------


def test_positive_beaten_by_three_negatives():
    pos = np.array([0.5])
    neg = np.array([[0.9, 0.8, 0.7, 0.1, 0.2]])
    ranks = M.sampled_ranks(pos, neg)
    assert ranks.tolist() == [3]
    assert M.hit_at_k(ranks, 3).tolist() == [0.0]
    assert M.hit_at_k(ranks, 4).tolist() == [1.0]
    assert M.ndcg_at_k(ranks, 10) == pytest.approx([1 / math.log2(5)])
    assert M.reciprocal_rank(ranks) == pytest.approx([0.25])
    assert M.sampled_auc(pos, neg) == pytest.approx([2 / 5])


def test_sampled_ties_count_against_positive_but_half_in_auc():
    pos = np.array([0.5])
    neg = np.array([[0.5, 0.5, 0.1]])
    assert M.sampled_ranks(pos, neg).tolist() == [2]
    # below: 1, tied: 2 -> (1 + 0.5 * 2) / 3
    assert M.sampled_auc(pos, neg) == pytest.approx([2 / 3])


def test_constant_scorer_gets_no_hits():
    pos = np.zeros(4)
    neg = np.zeros((4, 99))
    out = M.sampled_metrics(pos, neg, k=10)
    assert M.sampled_ranks(pos, neg).tolist() == [99] * 4
    assert out["hr@10"].tolist() == [0.0] * 4
    assert out["ndcg@10"].tolist() == [0.0] * 4
    assert out["mrr"] == pytest.approx([0.01] * 4)
    assert out["auc"] == pytest.approx([0.5] * 4)


def test_perfect_and_inverted_scorers():
    rng = np.random.default_rng(0)
    neg = rng.random((50, 99))
    perfect = M.sampled_metrics(np.full(50, 2.0), neg, k=10)
    for key in ("hr@10", "ndcg@10", "mrr", "auc"):
        assert perfect[key] == pytest.approx(np.ones(50)), key
    inverted = M.sampled_metrics(np.full(50, -1.0), neg, k=10)
    assert inverted["auc"] == pytest.approx(np.zeros(50))
    assert inverted["hr@10"].sum() == 0
    assert inverted["mrr"] == pytest.approx(np.full(50, 1 / 100))


def test_random_scorer_hr10_on_100_candidates_is_one_tenth():
    # Continuous scores: rank is uniform on 0..99, so E[HR@10] = 0.1,
    # E[AUC] = 0.5, E[RR] = H_100 / 100.  n = 50_000 gives sd(HR) ~ 0.0013;
    # the tolerance (~3.7 sd) still rejects an off-by-one rank (HR = 0.09).
    rng = np.random.default_rng(12345)
    n = 50_000
    out = M.sampled_metrics(rng.random(n), rng.random((n, 99)), k=10)
    assert out["hr@10"].mean() == pytest.approx(0.10, abs=0.005)
    assert out["auc"].mean() == pytest.approx(0.5, abs=0.005)
    harmonic_100 = sum(1 / i for i in range(1, 101))
    assert out["mrr"].mean() == pytest.approx(harmonic_100 / 100, abs=0.002)


def test_ndcg_and_hit_at_boundary():
    ranks = np.array([0, 1, 9, 10])
    assert M.ndcg_at_k(ranks, 10) == pytest.approx([1.0, 1 / LOG2_3, 1 / math.log2(11), 0.0])
    assert M.hit_at_k(ranks, 10).tolist() == [1.0, 1.0, 1.0, 0.0]
    assert M.reciprocal_rank(ranks) == pytest.approx([1.0, 0.5, 0.1, 1 / 11])


def test_sampled_metrics_keys_follow_k():
    out = M.sampled_metrics(np.array([1.0, 0.0]), np.array([[0.5, 0.2], [0.5, 0.2]]), k=5)
    assert set(out) == {"hr@5", "ndcg@5", "mrr", "auc"}
    assert out["auc"].tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    ("pos", "neg"),
    [
        (np.array([np.nan]), np.array([[0.1, 0.2]])),
        (np.array([0.3]), np.array([[0.1, np.nan]])),
        (np.array([0.3, 0.4]), np.array([[0.1, 0.2]])),  # row mismatch
        (np.array([0.3]), np.zeros((1, 0))),  # no negatives
    ],
)
def test_sampled_rejects_bad_input(pos, neg):
    with pytest.raises(ValueError):
        M.sampled_ranks(pos, neg)
    with pytest.raises(ValueError):
        M.sampled_auc(pos, neg)


def test_rank_metrics_reject_bad_k_and_ranks():
    with pytest.raises(ValueError):
        M.hit_at_k(np.array([0]), 0)
    with pytest.raises(ValueError):
        M.ndcg_at_k(np.array([-1]), 10)
    with pytest.raises(ValueError):
        M.reciprocal_rank(np.array([0.5]))


# --------------------------------------------------------------------------
# full ranking
# --------------------------------------------------------------------------

SCORES_8 = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]])


def test_full_ranking_two_relevant_by_hand():
    # Item 0 is a training item: excluded.  Ranking is then 1,2,3,4,5,6,7,
    # so relevant item 2 sits at position 1 and item 5 at position 4.
    out = M.full_ranking_metrics(SCORES_8, [np.array([2, 5])], k=3, exclude=[np.array([0])])
    assert out["hr@3"] == pytest.approx([1.0])
    assert out["precision@3"] == pytest.approx([1 / 3])
    assert out["recall@3"] == pytest.approx([1 / 2])
    assert out["ndcg@3"] == pytest.approx([(1 / LOG2_3) / (1 + 1 / LOG2_3)])
    assert out["mrr"] == pytest.approx([1 / 2])
    # Negatives 1,3,4,6,7: item 2 beats 4 of them, item 5 beats 2 -> 6/10.
    assert out["auc"] == pytest.approx([0.6])


def test_full_ranking_without_exclusion_shifts_positions():
    # Item 0 now competes as a negative: positions become 2 and 5.
    out = M.full_ranking_metrics(SCORES_8, [np.array([2, 5])], k=3)
    assert out["precision@3"] == pytest.approx([1 / 3])
    assert out["ndcg@3"] == pytest.approx([(1 / 2) / (1 + 1 / LOG2_3)])
    assert out["mrr"] == pytest.approx([1 / 3])
    # Negatives 0,1,3,4,6,7: item 2 beats 4, item 5 beats 2 -> 6/12.
    assert out["auc"] == pytest.approx([0.5])


def test_full_ranking_idcg_uses_min_of_relevant_and_k():
    # 3 relevant items all in the top 3 but k=2: IDCG over 2 positions -> NDCG 1.
    out = M.full_ranking_metrics(SCORES_8, [np.array([0, 1, 2])], k=2)
    assert out["ndcg@2"] == pytest.approx([1.0])
    assert out["precision@2"] == pytest.approx([1.0])
    assert out["recall@2"] == pytest.approx([2 / 3])


def test_excluded_item_with_top_score_is_never_a_hit():
    # Item 0 has the highest score and is listed as relevant, but it is a
    # training item: it is dropped, so k=1 shows item 1, a miss.
    out = M.full_ranking_metrics(SCORES_8, [np.array([0, 2])], k=1, exclude=[np.array([0])])
    assert out["hr@1"] == pytest.approx([0.0])
    assert out["recall@1"] == pytest.approx([0.0])
    assert out["mrr"] == pytest.approx([1 / 2])  # item 2 is second after item 1
    out3 = M.full_ranking_metrics(SCORES_8, [np.array([0, 2])], k=3, exclude=[np.array([0])])
    assert out3["recall@3"] == pytest.approx([1.0])  # denominator is 1, not 2


def test_full_ranking_ties_are_pessimistic():
    # Constant model: every relevant item goes behind all 7 non-relevant ones.
    out = M.full_ranking_metrics(np.zeros((1, 8)), [np.array([3])], k=5)
    assert out["hr@5"] == pytest.approx([0.0])
    assert out["mrr"] == pytest.approx([1 / 8])
    assert out["auc"] == pytest.approx([0.5])
    # Items 0,1,2 tie; 0 and 1 relevant.  Worst case order: 2, 0, 1, 3.
    out = M.full_ranking_metrics(np.array([[1.0, 1.0, 1.0, 0.0]]), [np.array([0, 1])], k=2)
    assert out["precision@2"] == pytest.approx([1 / 2])
    assert out["ndcg@2"] == pytest.approx([(1 / LOG2_3) / (1 + 1 / LOG2_3)])
    assert out["mrr"] == pytest.approx([1 / 2])
    assert out["auc"] == pytest.approx([3 / 4])


def test_relevant_items_tied_only_with_each_other_are_not_penalised():
    # Two relevant items share the top score: whichever goes first is relevant.
    out = M.full_ranking_metrics(np.array([[1.0, 1.0, 0.5, 0.0]]), [np.array([0, 1])], k=2)
    for key in ("hr@2", "precision@2", "recall@2", "ndcg@2", "mrr", "auc"):
        assert out[key] == pytest.approx([1.0]), key


def test_full_ranking_single_relevant_matches_sampled_metrics():
    # With one relevant item and every other candidate as a negative, the
    # full ranking must agree with the sampled metrics, ties included.
    rng = np.random.default_rng(3)
    n_users, n_items = 40, 30
    scores = rng.integers(0, 5, size=(n_users, n_items)).astype(float)
    relevant = [rng.integers(0, n_items, size=1) for _ in range(n_users)]
    exclude = [rng.choice(np.setdiff1d(np.arange(n_items), r), 5, replace=False) for r in relevant]
    full = M.full_ranking_metrics(scores, relevant, k=5, exclude=exclude)
    pos = np.array([scores[u, r[0]] for u, r in enumerate(relevant)])
    neg = np.stack(  # [n_users, n_items - 6]: every other candidate is a negative
        [
            np.delete(scores[u], np.concatenate([r, e]))
            for u, (r, e) in enumerate(zip(relevant, exclude, strict=True))
        ]
    )
    sampled = M.sampled_metrics(pos, neg, k=5)
    for key in ("hr@5", "ndcg@5", "mrr", "auc"):
        np.testing.assert_allclose(full[key], sampled[key], err_msg=key)
    assert sampled["hr@5"].sum() > 0 and sampled["hr@5"].sum() < n_users  # non-trivial case


def _reference_full_ranking(scores, relevant, k, exclude):
    """Slow, literal implementation: build the worst-case ordering and read it."""
    keys = (f"hr@{k}", f"precision@{k}", f"recall@{k}", f"ndcg@{k}", "mrr", "auc")
    out = {key: [] for key in keys}
    for u in range(scores.shape[0]):
        ex = set(exclude[u].tolist())
        rel = set(relevant[u].tolist()) - ex
        cands = [i for i in range(scores.shape[1]) if i not in ex]
        ranked = sorted(cands, key=lambda i: (-scores[u, i], i in rel, i))
        top = ranked[:k]
        hits = sum(i in rel for i in top)
        dcg = sum(1 / math.log2(p + 2) for p, i in enumerate(top) if i in rel)
        idcg = sum(1 / math.log2(p + 2) for p in range(min(len(rel), k)))
        first = next(p for p, i in enumerate(ranked) if i in rel)
        negs = [i for i in cands if i not in rel]
        pairs = [
            1.0 if scores[u, r] > scores[u, j] else 0.5 if scores[u, r] == scores[u, j] else 0.0
            for r in rel
            for j in negs
        ]
        out[f"hr@{k}"].append(float(hits > 0))
        out[f"precision@{k}"].append(hits / k)
        out[f"recall@{k}"].append(hits / len(rel))
        out[f"ndcg@{k}"].append(dcg / idcg)
        out["mrr"].append(1 / (first + 1))
        out["auc"].append(sum(pairs) / len(pairs))
    return {key: np.array(v) for key, v in out.items()}


@pytest.mark.parametrize("chunk", [None, 7])
def test_full_ranking_matches_brute_force_reference(monkeypatch, chunk):
    if chunk is not None:  # force many small chunks through the pair loop
        monkeypatch.setattr(M, "_PAIR_CHUNK_ELEMENTS", chunk)
    rng = np.random.default_rng(7)
    n_users, n_items, k = 25, 20, 4
    scores = rng.integers(0, 6, size=(n_users, n_items)).astype(float)  # many ties
    relevant = [rng.choice(n_items, size=rng.integers(1, 6), replace=False) for _ in range(n_users)]
    exclude = [
        np.setdiff1d(rng.choice(n_items, size=rng.integers(0, 6), replace=False), r)
        for r in relevant
    ]
    got = M.full_ranking_metrics(scores, relevant, k=k, exclude=exclude)
    want = _reference_full_ranking(scores, relevant, k, exclude)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], err_msg=key)


@pytest.mark.parametrize(
    ("relevant", "exclude"),
    [
        ([np.array([1]), np.array([], dtype=int)], None),  # empty row
        ([np.array([1]), np.array([2])], [np.array([]), np.array([2])]),  # all excluded
        ([np.array([1]), np.array([8])], None),  # out of range
        ([np.array([1])], None),  # wrong number of rows
        ([np.array([1.0]), np.array([2.0])], None),  # float indices
    ],
)
def test_full_ranking_rejects_bad_relevant(relevant, exclude):
    scores = np.random.default_rng(0).random((2, 8))
    with pytest.raises(ValueError):
        M.full_ranking_metrics(scores, relevant, k=3, exclude=exclude)


def test_full_ranking_rejects_nan_scores():
    scores = SCORES_8.copy()
    scores[0, 4] = np.nan
    with pytest.raises(ValueError):
        M.full_ranking_metrics(scores, [np.array([1])], k=3)


# --------------------------------------------------------------------------
# top-k
# --------------------------------------------------------------------------


def test_top_k_items_sorted_and_excluding():
    scores = np.array([[0.1, 0.9, 0.5, 0.7, 0.3], [5.0, 4.0, 3.0, 2.0, 1.0]])
    got = M.top_k_items(scores, 3, exclude=[np.array([1]), np.array([0, 2])])
    assert got.tolist() == [[3, 2, 4], [1, 3, 4]]
    assert M.top_k_items(scores, 2).tolist() == [[1, 3], [0, 1]]


def test_top_k_items_never_returns_excluded_even_among_minus_inf():
    # Excluded items must lose to genuine -inf scores, not tie with them.
    scores = np.full((1, 50), -np.inf)
    scores[0, 0] = 1.0
    keep = 37
    exclude = [np.setdiff1d(np.arange(50), [0, keep])]
    assert M.top_k_items(scores, 2, exclude=exclude).tolist() == [[0, keep]]


def test_top_k_items_agrees_with_full_ranking_hits():
    rng = np.random.default_rng(11)
    scores = rng.random((30, 40))
    relevant = [rng.choice(40, size=3, replace=False) for _ in range(30)]
    exclude = [np.setdiff1d(rng.choice(40, size=8, replace=False), r) for r in relevant]
    top = M.top_k_items(scores, 10, exclude=exclude)
    for u in range(30):
        assert not np.isin(top[u], exclude[u]).any()
        assert np.all(np.diff(scores[u, top[u]]) <= 0)
    hits = np.array([np.isin(top[u], relevant[u]).sum() for u in range(30)])
    full = M.full_ranking_metrics(scores, relevant, k=10, exclude=exclude)
    np.testing.assert_allclose(full["precision@10"] * 10, hits)


def test_top_k_items_rejects_too_few_candidates():
    with pytest.raises(ValueError):
        M.top_k_items(np.zeros((1, 4)), 3, exclude=[np.array([0, 1])])
    with pytest.raises(ValueError):
        M.top_k_items(np.zeros((1, 4)), 5)


# --------------------------------------------------------------------------
# rating prediction
# --------------------------------------------------------------------------


def test_rmse_mae_by_hand():
    p, t = np.array([1.0, 2.0, 3.0]), np.array([1.0, 4.0, 0.0])  # errors 0, -2, 3
    assert M.rmse(p, t) == pytest.approx(math.sqrt(13 / 3))
    assert M.mae(p, t) == pytest.approx(5 / 3)
    assert isinstance(M.rmse(p, t), float)


@pytest.mark.parametrize("fn", [M.rmse, M.mae])
def test_rmse_mae_errors(fn):
    with pytest.raises(ValueError):
        fn(np.array([]), np.array([]))
    with pytest.raises(ValueError):
        fn(np.array([1.0, 2.0]), np.array([1.0]))
    with pytest.raises(ValueError):
        fn(np.array([1.0, np.nan]), np.array([1.0, 2.0]))


# --------------------------------------------------------------------------
# beyond accuracy
# --------------------------------------------------------------------------


def test_catalogue_coverage_by_hand():
    assert M.catalogue_coverage(np.array([[0, 1], [1, 2]]), 10) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        M.catalogue_coverage(np.array([[0, 10]]), 10)


def test_average_popularity_by_hand():
    pop = np.array([10.0, 5.0, 1.0, 0.0])
    assert M.average_popularity(np.array([[0, 1], [1, 3]]), pop) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        M.average_popularity(np.array([[0, 4]]), pop)


def test_novelty_by_hand_with_zero_popularity_smoothed():
    pop = np.array([10, 5, 1, 0])
    # -log2(10/10)=0, -log2(5/10)=1, -log2(1/10), pop 0 -> 1 -> -log2(1/10)
    want = (0 + 1 + 2 * math.log2(10)) / 4
    assert M.novelty(np.array([[0, 1], [2, 3]]), pop, num_users=10) == pytest.approx(want)
    with pytest.raises(ValueError):  # counts larger than the user base
        M.novelty(np.array([[0, 1]]), pop, num_users=8)


# --------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------


def test_summarize_and_sums():
    per_row = {"a": np.array([1.0, 2.0, 3.0]), "b": np.array([0.0, 0.0, 1.0])}
    assert M.summarize(per_row) == pytest.approx({"a": 2.0, "b": 1 / 3, "count": 3.0})
    assert M.sums(per_row) == pytest.approx({"a": 6.0, "b": 1.0, "count": 3.0})
    with pytest.raises(ValueError):
        M.summarize({"a": np.array([1.0, 2.0]), "b": np.array([1.0])})
    with pytest.raises(ValueError):
        M.summarize({"a": np.array([])})


def test_merge_sums_equals_mean_over_concatenation():
    rng = np.random.default_rng(5)
    pos, neg = rng.random(100), rng.random((100, 99))
    per_row = M.sampled_metrics(pos, neg, k=10)
    cuts = [0, 3, 40, 40, 100]  # unequal parts, one empty
    parts = [
        M.sums({key: v[lo:hi] for key, v in per_row.items()}) for lo, hi in pairwise(cuts)
    ]
    assert M.merge_sums(parts) == pytest.approx(M.summarize(per_row))


def test_merge_sums_averages_missing_keys_over_reporting_parts():
    p1 = M.sums({"a": np.array([1.0, 3.0]), "b": np.array([4.0, 6.0])})
    p2 = M.sums({"a": np.array([5.0])})
    merged = M.merge_sums([p1, p2])
    assert merged == pytest.approx({"a": 3.0, "b": 5.0, "count": 3.0})
    with pytest.raises(ValueError):
        M.merge_sums([{"a": 1.0}])
