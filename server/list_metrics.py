"""The server's side of beyond-accuracy evaluation: coverage, novelty and quality per group.

Devices send sums (:func:`common.evaluation.list_sums`); only aggregates leave this module.
A group whose evaluation covered fewer than ``group-min-users`` users is **suppressed**:
its figures are dropped, not published, and only the number of suppressed groups is
reported, because a metric over a handful of users says more about those users than
about the group (one user's hit or miss, with a known group, is that user's result).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.common import Scalar

from common.evaluation import GROUP_PREFIX, RECOMMENDED_ITEMS_KEY
from common.metrics import coverage_from_counts, merge_sums, novelty_from_counts
from common.updates import decode_item_list

__all__ = ["catalogue_summary", "counts_from_replies", "group_summary"]


def group_summary(metrics: list[Mapping[str, Scalar]], min_users: int) -> dict[str, float]:
    """Per-group means over every device's sums; groups under ``min_users`` users suppressed.

    Output keys: ``group/<dimension>=<label>/<metric>`` (and ``/count``), plus
    ``groups_reported`` and ``groups_suppressed``.
    """
    parts: dict[str, list[dict[str, float]]] = {}
    for m in metrics:
        by_group: dict[str, dict[str, float]] = {}
        for key, value in m.items():
            if key.startswith(GROUP_PREFIX):
                group, _, metric = key[len(GROUP_PREFIX):].rpartition("/")
                by_group.setdefault(group, {})[metric] = float(value)  # type: ignore[arg-type]
        for group, sums in by_group.items():
            if sums.get("count", 0) > 0:
                parts.setdefault(group, []).append(sums)
    out: dict[str, float] = {"groups_reported": 0.0, "groups_suppressed": 0.0}
    for group in sorted(parts):
        merged = merge_sums(parts[group])
        if merged["count"] < min_users:
            out["groups_suppressed"] += 1
            continue
        out["groups_reported"] += 1
        out.update({f"group/{group}/{metric}": value for metric, value in merged.items()})
    return out


def counts_from_replies(metrics: list[Mapping[str, Scalar]], num_items: int) -> np.ndarray | None:
    """How often each item is in the lists the devices sent (None if none sent any)."""
    counts = np.zeros(num_items, np.int64)
    sent = False
    for m in metrics:
        blob = m.get(RECOMMENDED_ITEMS_KEY)
        if blob is None:
            continue
        try:
            items = decode_item_list(blob)  # type: ignore[arg-type]
        except ValueError:
            continue  # a malformed reply costs its own contribution, never the evaluation
        if items.size and (items.min() < 0 or items.max() >= num_items):
            continue
        counts += np.bincount(items, minlength=num_items)
        sent = True
    return counts if sent else None


def catalogue_summary(counts: np.ndarray, popularity: np.ndarray | None, num_users: int, k: int = 10) -> dict[str, float]:
    """Catalogue coverage and novelty of every list the devices would show (empty if the lists were empty).

    ``counts``: how often each item is in the lists, summed over the devices (from their
    lists in the clear, or from SecAgg+'s sum of their count vectors). Novelty is the mean
    self-information of the recommended items, ``-log2(users who interacted with the item
    / users)``, against the training popularity the server holds.
    """
    if counts.sum() == 0:
        return {}
    out = {f"coverage@{k}": coverage_from_counts(counts)}
    if popularity is not None:
        out[f"novelty@{k}"] = novelty_from_counts(counts, popularity, num_users)
    return out
