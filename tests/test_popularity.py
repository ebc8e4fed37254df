"""The published popularity fallback on kiosks: ranked by users with a positive per item, not by touched rows.

A kiosk trains its users' positives plus sampled negatives, so with ten users it touches
nearly every item: the summed touched vectors tie at the maximum and the "popular" list
degenerates to ascending item ids. With ``popularity = "positives"`` each device adds, to
its summed upload, how many of its users have a positive on each item (over its weight), so
the server's weighted mean sums to exact counts, and SecAgg+ would reveal only that sum.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest

from common.config import ConfigError, parse_run_config
from common.federation import slicer_cached
from common.updates import (
    UpdateLayout,
    UpdateRejected,
    decode_mean_update,
    encode_update,
    popular_items,
    positive_counts,
    validate_upload,
)
from simulations.cli import main as fedrec
from simulations.engine import fused_run_config

KIOSKS = {"synthetic-users": 60, "partitioning": "group", "users-per-client": 10, "eval-negatives": 20,
          "embedding-dim": 8, "report": False, "evaluate-every": 2, "popularity": "positives"}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation with ties shared (sums of float32 uploads differ from integers by ~1e-7)."""
    from scipy.stats import spearmanr

    return float(spearmanr(np.round(a), np.round(b)).statistic)


@pytest.mark.parametrize("secagg", [False, True], ids=["plain", "secagg+"])
def test_on_kiosks_the_published_list_ranks_by_positives_and_is_not_id_ordered(tmp_path, secagg):
    run_dir = tmp_path / "kiosks"
    settings = {**KIOSKS, "secure-aggregation": secagg}
    overrides = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}" for k, v in settings.items())
    assert fedrec(["simulate", "--rounds", "2", "--run-dir", str(run_dir), "-c", overrides]) == 0
    with np.load(run_dir / "server-state.npz") as state:
        positives, touched = state["positives_totals"], state["touched_totals"]
    config = parse_run_config(fused_run_config(KIOSKS))
    train = slicer_cached(config).prepared.split.train
    truth = positive_counts(train.users, train.items, config.synthetic_items)  # users per item, the true popularity
    # Every kiosk trained in both rounds: the server summed twice the true counts (SecAgg+:
    # up to its quantization, 16 / 2**22 per device and value, times max-weight).
    np.testing.assert_allclose(positives, 2 * truth, rtol=1e-4, atol=0.05 if secagg else 1e-3)
    published = popular_items(positives, config.popular_items)
    assert spearman(positives, truth) > 0.99
    top = np.argsort(-truth, kind="stable")[:10]
    assert set(published[:10]) <= set(np.flatnonzero(truth >= truth[top].min()))  # the most popular items lead
    assert published.tolist() != sorted(published.tolist())  # not item ids in ascending order
    # What the touched totals would have published instead: ties at the maximum, ordered by id
    # (under SecAgg+ the ties are broken by quantization noise instead).
    assert spearman(touched, truth) < spearman(positives, truth)
    if not secagg:
        by_touched = popular_items(touched, config.popular_items)
        assert np.sum(touched == touched.max()) > 10 and by_touched[:10].tolist() == sorted(by_touched[:10].tolist())


def test_the_weighted_mean_of_uploads_sums_the_devices_counts_exactly():
    shared = OrderedDict(item_embedding=np.zeros((5, 2), np.float32), output=np.zeros(2, np.float32))
    layout = UpdateLayout.from_state(shared, ["item_embedding"], 5, positives=True)
    counts = [np.array([3, 0, 1, 0, 0.0]), np.array([1, 2, 0, 0, 0.0])]
    weights = [40, 7]  # the devices' aggregation weights (their examples)
    uploads = [encode_update(layout, shared, shared, np.array([0, 2]), positives=c / w) for c, w in zip(counts, weights, strict=True)]
    mean = [sum(u[i] * w for u, w in zip(uploads, weights, strict=True)) / sum(weights) for i in range(len(uploads[0]))]
    np.testing.assert_allclose(mean[-2] * sum(weights), counts[0] + counts[1], rtol=1e-6)
    assert len(decode_mean_update(layout, list(shared.values()), mean)) == 2
    assert positive_counts(np.array([0, 0, 1, 1]), np.array([2, 2, 2, 4]), 5).tolist() == [0, 0, 2, 0, 1]
    # A device weighted by its examples cannot claim more positives than it has examples.
    validate_upload(layout, uploads[0], positives_per_example=True)
    inflated = [*uploads[0][:-2], uploads[0][-2] * 50, uploads[0][-1]]
    with pytest.raises(UpdateRejected, match="item_positives sums to 5 > 1 per example"):
        validate_upload(layout, inflated, positives_per_example=True)


@pytest.mark.parametrize("dp", ["user-dp", "record-dp"])
def test_counts_of_positives_are_refused_under_dp_with_the_reason(dp):
    with pytest.raises(ConfigError, match="not available under user-dp or record-dp: .* own noise"):
        parse_run_config(fused_run_config({"popularity": "positives", dp: True}))
