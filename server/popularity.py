"""The popularity fallback the server publishes: per item, example-weighted sums over rounds.

``touched``: the sum of every round's touched vector; ``positives`` (``popularity =
"positives"``): users with a positive per item (under SecAgg+ only the sum is known).
Under either DP (or whole-table averaging) the touched vector is all ones and says nothing,
so nothing is published.
"""

from __future__ import annotations

import numpy as np

from common.config import FedRecConfig
from common.privacy import UserLevelDP
from common.updates import encode_item_list, popular_items


def publishes_popularity(config: FedRecConfig, user_dp: UserLevelDP | None) -> bool:
    """Whether this run publishes popular items at all."""
    return config.popular_items > 0 and config.row_wise_aggregation and user_dp is None and not config.record_dp


def accumulate(
    touched: np.ndarray, positives: np.ndarray, mean_upload: list[np.ndarray], total: int, *, count_positives: bool
) -> None:
    """Add a round's mean touched vector (and positives counts) times its example total, in place."""
    touched += mean_upload[-1].astype(np.float64) * total
    if count_positives:
        positives += mean_upload[-2].astype(np.float64) * total


def published_items(totals: np.ndarray, count: int) -> bytes | None:
    """The encoded most popular items, None while nothing has been counted."""
    if not totals.any():
        return None
    return encode_item_list(popular_items(totals, count))
