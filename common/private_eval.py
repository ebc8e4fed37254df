"""Evaluation in private modes: a device's sums as one fixed-length vector, summed by SecAgg+.

A device's evaluation reply names what it measured: for a phone (one user) its sums are
that user's own metrics, its top-10 list and its group keys name what it holds out and
who it is. In a private run (secure aggregation, user-level DP or record-level DP) no list
and no group label leaves a device. Under secure aggregation the device's sums (counts,
hits, NDCG and the other ranking sums, per-group sums over *every possible* group, and
without DP how often each item is in its lists) are laid out in one vector whose length
and order depend only on the run-config and the public catalogue, so that vector can
travel through Flower's SecAgg+ like a model update and the server sees only the sum over
the devices. Without secure aggregation a private device sends its scalar sums alone.

SecAgg+ clips every coordinate to ``[-r, r]`` before quantizing: each value is scaled by
the public factor ``r / (PER_USER_MAX * max_users)``, where ``max_users`` bounds the users
a device evaluates, so no honest value is clipped.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np

from common.config import FedRecConfig
from common.evaluation import (
    GROUP_METRICS,
    GROUP_PREFIX,
    RECOMMENDED_ITEMS_KEY,
    ListMetrics,
)
from common.metrics import full_ranking_metrics, sampled_metrics
from common.updates import decode_item_list
from common.user_groups import activity_labels, age_band

__all__ = [
    "EVALUATE_ONLY_KEY",
    "CATALOGUE_COUNTS_KEY",
    "PER_USER_MAX",
    "EvalVectorLayout",
    "private_metrics",
    "group_labels",
    "is_private",
    "private_lists",
    "layout_for",
]

EVALUATE_ONLY_KEY = "fedrec.evaluate-only"  # fit config: this SecAgg+ round sums evaluation, it trains nothing
CATALOGUE_COUNTS_KEY = "catalogue_counts"  # decoded vector: how often each item was in the devices' lists
PER_USER_MAX = 2.0  # no per-user value exceeds it: hits, NDCG, MRR, AUC <= 1; a list's mean distance (ILD) <= 2
# The labels a demographic dimension can take (common.user_groups), fixed so the vector is too.
DEMOGRAPHIC_LABELS = {
    "gender": ("F", "M", "unknown"),
    "age": tuple(dict.fromkeys(age_band(a) for a in range(0, 100))) + ("unknown",),
}


def _ranking_keys(k: int) -> tuple[list[str], list[str]]:
    """The per-user metric names of sampled and full ranking, as the metric functions name them."""
    sampled = sampled_metrics(np.zeros(1), np.zeros((1, 1)), k=k)
    full = full_ranking_metrics(np.zeros((1, 2)), [np.array([0])], k=k)
    return list(sampled), list(full)


def group_labels(bands: tuple[int, ...]) -> dict[str, tuple[str, ...]]:
    """Every group a user can be in, per dimension: activity bands from the config, demographics fixed."""
    edges = np.array([0, *bands, bands[-1] + 1])
    return {"activity": tuple(dict.fromkeys(activity_labels(edges, bands).tolist())), **DEMOGRAPHIC_LABELS}


@dataclass(frozen=True)
class EvalVectorLayout:
    """Names of the vector's leading coordinates, then ``num_items`` catalogue counts (0: none)."""

    names: tuple[str, ...]
    num_items: int
    max_users: int
    clipping_range: float

    @classmethod
    def build(
        cls,
        lists: ListMetrics,
        *,
        has_catalogue: bool,
        num_items: int,
        max_users: int,
        clipping_range: float,
        k: int = 10,
    ) -> "EvalVectorLayout":
        """The layout every device of a run uses: a function of the run-config and the public catalogue."""
        sampled, full = _ranking_keys(k)
        names = [f"{p}_{m}" for p in ("test", "val") for m in ("count", *[f"sampled_{s}" for s in sampled],
                                                                 *[f"full_{f}" for f in full])]
        names += ["new_count", *[f"new_sampled_{s}" for s in sampled], "exposure_count", f"exposure_er@{k}"]
        if has_catalogue:
            names.append(f"test_ild@{k}")
        if lists.rerank_diversity > 0:
            names += [f"test_shown_hr@{k}", f"test_shown_ndcg@{k}"]
        if lists.groups:
            for dimension, labels in group_labels(lists.activity_bands).items():
                for label in labels:
                    key = f"{GROUP_PREFIX}{dimension}={label}/"
                    names += [key + "count", *[key + m for m in GROUP_METRICS]]
        counts = num_items if lists.catalogue_metrics else 0
        return cls(tuple(names), counts, max(int(max_users), 1), float(clipping_range))

    @property
    def length(self) -> int:
        return len(self.names) + self.num_items

    @property
    def scale(self) -> float:
        """Public factor taking a device's largest possible value to the clipping range."""
        return self.clipping_range / (PER_USER_MAX * self.max_users)

    def encode(self, metrics: Mapping[str, float | bytes]) -> np.ndarray:
        """A device's evaluation sums as the vector SecAgg+ masks.

        A key outside the layout is refused (it would be dropped silently otherwise): the
        layout and the device's evaluation must agree.
        """
        vector = np.zeros(self.length, dtype=np.float64)
        index = {name: i for i, name in enumerate(self.names)}
        for key, value in metrics.items():
            if key == RECOMMENDED_ITEMS_KEY:
                if self.num_items:
                    items = decode_item_list(value)  # type: ignore[arg-type]
                    vector[len(self.names):] = np.bincount(items, minlength=self.num_items)[: self.num_items]
                continue
            if key.startswith(GROUP_PREFIX) and key not in index:
                raise ValueError(f"evaluation group {key!r} is not one of the run's possible groups")
            if key not in index:
                raise ValueError(f"evaluation sum {key!r} has no place in the private evaluation vector")
            vector[index[key]] = float(value)  # type: ignore[arg-type]
        scaled = vector * self.scale
        if np.abs(scaled).max(initial=0.0) > self.clipping_range * (1 + 1e-9):
            raise ValueError(
                f"evaluation sums exceed the bound of {self.max_users} users per device x {PER_USER_MAX}: "
                "SecAgg+ would clip them; this device evaluates more users than the run-config allows"
            )
        return scaled

    def decode(self, mean: np.ndarray, devices: int) -> dict[str, float | np.ndarray]:
        """The sums over ``devices`` devices from SecAgg+'s mean of their vectors (weights all 1).

        Counts are integers and are rounded (SecAgg+'s quantization leaves ~1e-6 per device).
        """
        if mean.shape != (self.length,):
            raise ValueError(f"expected a private evaluation vector of {self.length} values, got shape {mean.shape}")
        total = mean.astype(np.float64) * devices / self.scale
        out: dict[str, float | np.ndarray] = {}
        for name, value in zip(self.names, total[: len(self.names)], strict=True):
            out[name] = float(round(value)) if name.endswith("count") else float(value)
        if self.num_items:
            out[CATALOGUE_COUNTS_KEY] = np.rint(total[len(self.names):]).clip(min=0).astype(np.int64)
        return out


def is_private(config: FedRecConfig) -> bool:
    """A run in which no per-user list or group label may leave a device."""
    return config.secure_aggregation or config.user_dp or config.record_dp


def private_lists(config: FedRecConfig) -> ListMetrics:
    """What devices measure beyond accuracy; under DP no list items, not even summed (nothing accounts for them)."""
    options = config.list_metrics
    if config.user_dp or config.record_dp:
        options = replace(options, catalogue_metrics=False)
    return options


def max_users_per_device(config: FedRecConfig) -> int:
    """Public bound on the users one device evaluates: 1 on phones, ``users-per-client`` on kiosks."""
    return 1 if config.partitioning == "user" else int(config.users_per_client)


def layout_for(config: FedRecConfig, *, has_catalogue: bool, num_items: int) -> EvalVectorLayout:
    """The run's private evaluation vector (the same on every device and on the server)."""
    return EvalVectorLayout.build(private_lists(config), has_catalogue=has_catalogue, num_items=num_items,
                                  max_users=max_users_per_device(config), clipping_range=config.secagg_clipping_range)


def private_metrics(metrics: Mapping[str, float | bytes]) -> dict[str, float]:
    """What a private device without SecAgg+ sends: its scalar sums, no list and no group key."""
    return {k: float(v) for k, v in metrics.items()  # type: ignore[arg-type]
            if k != RECOMMENDED_ITEMS_KEY and not k.startswith(GROUP_PREFIX)}
