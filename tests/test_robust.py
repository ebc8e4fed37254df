"""Robust aggregation rules (Flower's) on fedrec uploads: what each keeps out, and norm bounding."""

from collections import OrderedDict

import numpy as np
import pytest

from common.config import parse_run_config
from common.updates import UpdateLayout, decode_mean_update, delta_norm, encode_update
from server.robust import bound_norm, robust_mean
from simulations.engine import fused_run_config

GLOBAL = OrderedDict(item_embedding=np.zeros((6, 2), np.float32), output=np.zeros(2, np.float32))
LAYOUT = UpdateLayout.from_state(GLOBAL, ["item_embedding"], num_items=6)
TARGET = 5  # the item a poisoner pushes


def _upload(rng, target_push=0.0):
    after = {"item_embedding": rng.normal(0.1, 0.01, (6, 2)).astype(np.float32),
             "output": rng.normal(0.1, 0.01, 2).astype(np.float32)}
    touched = [0, 1, 2, 3]
    if target_push:
        after["item_embedding"][TARGET] = target_push
        touched = [TARGET]
    return encode_update(LAYOUT, GLOBAL, after, np.array(touched))


def _fleet(num_honest=8, num_poisoners=1, push=20.0):
    rng = np.random.default_rng(0)
    return [_upload(rng) for _ in range(num_honest)] + [_upload(rng, push) for _ in range(num_poisoners)]


def _config(**overrides):
    return parse_run_config(fused_run_config(overrides))


def _target_row(config, uploads):
    mean = robust_mean(config, uploads, [1] * len(uploads))
    return decode_mean_update(LAYOUT, list(GLOBAL.values()), mean)[0][TARGET]


def test_plain_mean_lets_one_poisoner_own_a_row_nobody_else_touched():
    # Row-wise averaging divides by who touched the row: the poisoner alone sets it.
    np.testing.assert_allclose(_target_row(_config(), _fleet()), [20.0, 20.0], rtol=1e-6)


@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "krum", "multi-krum", "bulyan"])
def test_every_robust_rule_keeps_the_poisoned_row_out(rule):
    config = _config(aggregation=rule, **{"trim-fraction": 0.2, "num-malicious": 1})
    np.testing.assert_allclose(_target_row(config, _fleet()), [0.0, 0.0], atol=1e-6)


def test_multi_krum_averages_the_honest_uploads_row_wise():
    fleet = _fleet()
    config = _config(aggregation="multi-krum", **{"num-malicious": 1})
    mean = robust_mean(config, fleet, [1] * len(fleet))
    honest = [np.mean([u[i] for u in fleet[:-1]], axis=0) for i in range(len(fleet[0]))]
    for got, want in zip(mean, honest, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_bulyan_refuses_too_few_updates_for_its_assumption():
    with pytest.raises(ValueError, match="4 x num-malicious \\+ 3"):
        robust_mean(_config(aggregation="bulyan", **{"num-malicious": 2}), _fleet(num_honest=5), [1] * 6)


def test_norm_bound_clips_deltas_but_not_the_touched_vector():
    upload = _fleet()[-1]
    bounded = bound_norm(upload, 1.0)
    assert delta_norm(bounded) == pytest.approx(1.0)
    np.testing.assert_array_equal(bounded[-1], upload[-1])
    assert delta_norm(bound_norm(_fleet()[0], 1e6)) == pytest.approx(delta_norm(_fleet()[0]))
    row = _target_row(_config(**{"norm-bound": 1.0}), _fleet())
    assert np.linalg.norm(row) <= 1.0 + 1e-6, "the poisoner's row moves at most by the bound"


def test_exposure_ratio_counts_only_users_who_never_had_the_item():
    from common.evaluation import exposure_hits

    scores = np.array([[0.0, 1.0, 5.0, 2.0], [0.0, 9.0, 8.0, 1.0], [3.0, 2.0, 1.0, 0.0]])
    interacted = [np.array([3]), np.array([1]), np.array([2])]  # user 2 had item 2: not counted
    got = exposure_hits(lambda users: scores[users], np.array([0, 1, 2]), interacted, item=2, k=1)
    # user 0: best unseen is item 2 (hit); user 1: item 1 is seen, so item 2 is top (hit)
    assert got == {"count": 2.0, "er@1": 2.0}
    got = exposure_hits(lambda users: scores[users], np.array([0, 1]), [np.array([], int), np.array([], int)], item=2, k=1)
    assert got == {"count": 2.0, "er@1": 1.0}  # user 1 now ranks item 1 above it
