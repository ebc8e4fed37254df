"""Robust aggregation of client uploads with Flower's own rules, before the row-wise decode.

A device's upload is a list of deltas (zero on untouched item rows) plus its touched
vector, and the mean of uploads is what :func:`common.updates.decode_mean_update` turns
into the next model. Each rule here replaces that mean by a robust statistic of the same
uploads, computed by Flower's aggregate functions (those behind ``FedMedian``,
``FedTrimmedAvg``, ``Krum`` and ``Bulyan``), so the decode and the Flower server step that
follow stay the same:

- ``median`` / ``trimmed-mean``: coordinate-wise, over deltas and touched flags alike; an
  item row most devices did not touch gets a median touched flag of 0 and keeps its value
  (the price of coordinate-wise statistics on sparse updates, measured in the README);
- ``krum`` / ``multi-krum``: pick the one (or the ``multi-krum-keep``) uploads closest to
  their neighbours and average those, row-wise as usual;
- ``bulyan``: Krum selection, then a coordinate-wise trimmed mean around the median.

``norm-bound`` clips every upload's deltas to that norm first (norm bounding), and works
with every rule. None of this can run under SecAgg+, which only ever reveals the sum.
"""

from __future__ import annotations

import numpy as np
from flwr.server.strategy.aggregate import (
    aggregate,
    aggregate_bulyan,
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)
from flwr.supercore.differential_privacy import clip_inputs_inplace

from common.config import FedRecConfig
from common.updates import delta_norm


def bound_norm(upload: list[np.ndarray], bound: float) -> list[np.ndarray]:
    """A copy of the upload whose deltas have L2 norm at most ``bound`` (touched vector kept)."""
    deltas = [a.astype(np.float64) for a in upload[:-1]]
    if bound > 0 and delta_norm(upload) > bound:
        clip_inputs_inplace(deltas, bound)
    return [*deltas, upload[-1].astype(np.float64)]


def robust_mean(config: FedRecConfig, uploads: list[list[np.ndarray]], weights: list[int]) -> list[np.ndarray]:
    """The aggregate that stands in for the weighted mean of ``uploads`` under ``config.aggregation``."""
    results = [(bound_norm(u, config.norm_bound), w) for u, w in zip(uploads, weights, strict=True)]
    rule = config.aggregation
    if rule == "mean":
        return aggregate(results)
    if rule == "median":
        return aggregate_median(results)
    if rule == "trimmed-mean":
        return aggregate_trimmed_avg(results, config.trim_fraction)
    f = config.num_malicious
    if rule == "krum":
        return aggregate_krum(results, num_malicious=f, to_keep=0)
    if rule == "multi-krum":
        keep = config.multi_krum_keep or max(1, len(results) - f)
        return aggregate_krum(results, num_malicious=f, to_keep=min(keep, len(results)))
    if len(results) < 4 * f + 3:
        raise ValueError(f"bulyan needs at least 4 x num-malicious + 3 = {4 * f + 3} updates, got {len(results)}")
    return aggregate_bulyan(results, num_malicious=f, aggregation_rule=aggregate_krum, to_keep=0)
