"""Beyond accuracy: diversity, MMR re-ranking, coverage, novelty, quality per group."""

from __future__ import annotations

import numpy as np
import pytest

from common import metrics as M
from common.config import ConfigError, parse_run_config
from common.evaluation import GROUP_PREFIX, RECOMMENDED_ITEMS_KEY, ListMetrics
from common.federation import slicer_cached
from common.updates import decode_item_list
from common.user_groups import activity_labels, age_band, movielens_user_groups
from server.list_metrics import catalogue_summary, counts_from_replies, group_summary
from server.report import beyond_accuracy
from simulations.engine import fused_run_config

GENRES = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [0, 1]], np.float32)  # items 0-2 one genre, 3-4 another


def test_intra_list_diversity_by_hand():
    assert M.intra_list_diversity(np.array([[0, 1]]), GENRES).tolist() == [0.0]  # same genre
    assert M.intra_list_diversity(np.array([[0, 3]]), GENRES).tolist() == [1.0]  # disjoint genres
    # [0, 1, 3]: 6 ordered pairs, 2 alike (0-1, 1-0) -> mean distance 4/6.
    assert M.intra_list_diversity(np.array([[0, 1, 3]]), GENRES)[0] == pytest.approx(4 / 6)


def test_mmr_is_the_plain_top_k_at_weight_zero_and_diversifies_above():
    scores = np.array([[5.0, 4.9, 4.8, 1.0, 0.9]])
    assert M.mmr_rerank(scores, GENRES, 3, 0.0).tolist() == M.top_k_items(scores, 3).tolist() == [[0, 1, 2]]
    diverse = M.mmr_rerank(scores, GENRES, 3, 0.7)
    assert diverse[0, 0] == 0 and 3 in diverse[0]  # the best item first, then the other genre gets in
    assert M.intra_list_diversity(diverse, GENRES)[0] > M.intra_list_diversity(np.array([[0, 1, 2]]), GENRES)[0]
    assert 0 not in M.mmr_rerank(scores, GENRES, 3, 0.7, exclude=[np.array([0])])[0]
    with pytest.raises(ValueError, match="weight must be in"):
        M.mmr_rerank(scores, GENRES, 3, 1.5)


def test_coverage_and_novelty_from_summed_counts_equal_the_list_versions():
    rng = np.random.default_rng(0)
    lists = np.stack([rng.choice(30, 5, replace=False) for _ in range(12)])
    popularity = rng.integers(0, 40, 30)
    counts = M.recommended_counts(lists[:7], 30) + M.recommended_counts(lists[7:], 30)  # two devices
    assert M.coverage_from_counts(counts) == pytest.approx(M.catalogue_coverage(lists, 30))
    assert M.novelty_from_counts(counts, popularity, 40) == pytest.approx(M.novelty(lists, popularity, 40))
    blobs = [{RECOMMENDED_ITEMS_KEY: np.asarray(part, "<i4").tobytes()} for part in (lists[:7], lists[7:])]
    summary = catalogue_summary(counts_from_replies([*blobs, {RECOMMENDED_ITEMS_KEY: b"bad"}, {}], 30), popularity, 40, k=5)
    assert summary == pytest.approx({"coverage@5": M.catalogue_coverage(lists, 30),
                                     "novelty@5": M.novelty(lists, popularity, 40)})


def test_groups_under_the_minimum_are_suppressed_and_the_rest_are_exact_means():
    def device(group: str, hits: list[float]) -> dict[str, float]:
        key = f"{GROUP_PREFIX}{group}/"
        return {key + "count": float(len(hits)), key + "sampled_hr@10": float(sum(hits)), "test_count": 9.0}

    replies = [device("gender=F", [1, 0]), device("gender=F", [1]), device("gender=M", [0, 1, 1, 1]),
               device("age=45+", [1, 1])]
    out = group_summary(replies, min_users=3)
    assert out["group/gender=F/sampled_hr@10"] == pytest.approx(2 / 3) and out["group/gender=F/count"] == 3
    assert out["group/gender=M/sampled_hr@10"] == pytest.approx(3 / 4)
    assert not any(k.startswith("group/age=") for k in out)  # 2 users: suppressed, not published
    assert out["groups_reported"] == 2 and out["groups_suppressed"] == 1
    assert group_summary(replies, min_users=5)["groups_suppressed"] == 3


def test_activity_and_demographic_groups(tmp_path):
    assert activity_labels(np.array([1, 50, 51, 150, 151]), (50, 150)).tolist() == \
        ["<=50", "<=50", "51-150", "51-150", ">150"]
    assert [age_band(a) for a in (18, 25, 44, 56)] == ["<25", "25-34", "35-44", "45+"]
    (tmp_path / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    groups = movielens_user_groups(tmp_path / "u.data", np.array([2, 1, 3]))
    assert groups["gender"].tolist() == ["F", "M", "unknown"] and groups["age"].tolist() == ["45+", "<25", "unknown"]
    (tmp_path / "u.user").write_text("1|x|M|technician|85711\n")
    with pytest.raises(Exception, match=r"u\.user:1: expected user id, age and gender"):
        movielens_user_groups(tmp_path / "u.data", np.array([1]))
    with pytest.raises(ConfigError, match="activity-bands must be increasing"):
        parse_run_config(fused_run_config({"activity-bands": "150,50"}))


def test_a_kiosk_reports_sums_per_group_and_the_items_of_its_lists_never_its_users_labels():
    from client.local import evaluate_client
    from common.models import build_model

    config = parse_run_config(fused_run_config({"synthetic-users": 120, "synthetic-items": 300, "partitioning": "group",
                                                "users-per-client": 12, "rerank-diversity": 0.5}))
    slicer = slicer_cached(config)
    data = slicer.client(0)
    model = build_model(config.model_config, data.num_users, data.num_items, seed=0)
    shared = list(model.shared_state().values())
    metrics = evaluate_client(config.model_config, data, shared, dict(model.local_state()), seed=0,
                              lists=config.list_metrics)
    users = len(data.test.users)
    groups = {k for k in metrics if k.startswith(GROUP_PREFIX) and k.endswith("/count")}
    assert groups and sum(metrics[k] for k in groups) == users  # every evaluated user in one activity group
    assert len(decode_item_list(metrics[RECOMMENDED_ITEMS_KEY])) == 10 * users
    assert 0 <= metrics["test_ild@10"] <= users and 0 <= metrics["test_shown_hr@10"] <= users
    quiet = evaluate_client(config.model_config, data, shared, dict(model.local_state()), seed=0,
                            lists=ListMetrics(catalogue_metrics=False, groups=False))
    assert RECOMMENDED_ITEMS_KEY not in quiet and not any(k.startswith(GROUP_PREFIX) for k in quiet)
    assert "test_shown_hr@10" not in quiet  # no re-ranking: the shown list is the top-10


def test_the_audit_report_lists_only_published_groups():
    final = {"test_ild@10": 0.7, "coverage@10": 0.4, "novelty@10": 9.1, "groups_suppressed": 2,
             "group/gender=F/count": 30, "group/gender=F/sampled_hr@10": 0.6, "group/gender=F/sampled_ndcg@10": 0.3}
    report = beyond_accuracy(final, {"group-min-users": 20, "rerank-diversity": 0.0})
    assert report["groups"] == [{"dimension": "gender", "label": "F", "users": 30, "hr@10": 0.6, "ndcg@10": 0.3,
                                 "full_hr@10": None, "full_ndcg@10": None}]
    assert report["groups_suppressed"] == 2 and report["coverage@10"] == 0.4 and report["devices_sent_lists"]
    assert beyond_accuracy({"test_sampled_hr@10": 0.5}, {}) is None


def test_a_device_scores_each_users_catalogue_once_per_evaluation(monkeypatch):
    """Full ranking, the shown lists and the exposure of an item share one scoring per user."""
    from client.local import evaluate_client
    from common.models import build_model

    config = parse_run_config(fused_run_config({"synthetic-users": 120, "synthetic-items": 300, "partitioning": "group",
                                                "users-per-client": 12}))
    data = slicer_cached(config).client(0)
    model = build_model(config.model_config, data.num_users, data.num_items, seed=0)
    scored: list[int] = []
    real = type(model).score_all_items
    monkeypatch.setattr(type(model), "score_all_items", lambda self, users, **kw: scored.extend(users.tolist()) or real(self, users, **kw))
    shared, rows = list(model.shared_state().values()), dict(model.local_state())
    once = evaluate_client(config.model_config, data, shared, rows, seed=0, lists=config.list_metrics, exposure_item=3)
    evaluated = set(data.test.users.tolist()) | set(data.validation.users.tolist())
    assert sorted(scored) == sorted(evaluated), "each evaluated user's catalogue scored exactly once"
    assert once["exposure_count"] > 0 and len(decode_item_list(once[RECOMMENDED_ITEMS_KEY])) == 10 * len(data.test.users)
