"""Leave-one-out evaluation shared by clients, the centralized baselines and benchmarks.

Each user with a held-out item is scored twice: against its 99 sampled negatives (the
NCF protocol, comparable with the literature) and against every item it has not seen
in training (full ranking, which sampled metrics are known to flatter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from common.metrics import (
    full_ranking_metrics,
    hit_at_k,
    intra_list_diversity,
    mmr_rerank,
    ndcg_at_k,
    sampled_metrics,
    top_k_items,
)
from common.models import RecModel
from common.user_groups import activity_labels

PairScorer = Callable[[np.ndarray, np.ndarray], np.ndarray]
AllScorer = Callable[[np.ndarray], np.ndarray]


def evaluate_ranking(
    score_pairs: PairScorer,
    score_all: AllScorer | None,
    users: np.ndarray,
    held_out: np.ndarray,
    negatives: np.ndarray,
    seen: list[np.ndarray] | None,
    *,
    k: int = 10,
    chunk: int = 512,
    full: bool = True,
) -> dict[str, np.ndarray]:
    """Per-user ``sampled_*`` and (if ``full``) ``full_*`` metrics; ``seen[u]`` is excluded from full ranking.

    ``score_all`` and ``seen`` are only read for the full ranking.
    """
    if len(users) == 0:
        return {}
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, len(users), chunk):
        u, pos, neg = users[start : start + chunk], held_out[start : start + chunk], negatives[start : start + chunk]
        candidates = np.concatenate([pos[:, None], neg], axis=1)
        scores = score_pairs(np.repeat(u, candidates.shape[1]), candidates.reshape(-1)).reshape(candidates.shape)
        result = {f"sampled_{key}": value for key, value in sampled_metrics(scores[:, 0], scores[:, 1:], k=k).items()}
        if full:
            assert score_all is not None and seen is not None
            ranked = full_ranking_metrics(score_all(u), [np.array([i]) for i in pos], k=k, exclude=[seen[x] for x in u])
            result.update({f"full_{key}": value for key, value in ranked.items()})
        parts.append(result)
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def model_scorers(model: RecModel) -> tuple[PairScorer, AllScorer]:
    """Score functions of a trained model (eval mode, no gradients)."""
    model.eval()

    @torch.no_grad()
    def pairs(users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(users), torch.from_numpy(items)).numpy()

    @torch.no_grad()
    def all_items(users: np.ndarray) -> np.ndarray:
        return model.score_all_items(torch.from_numpy(users)).numpy()

    return pairs, all_items


def scored_once(score_all: AllScorer) -> AllScorer:
    """``score_all`` that scores each user's catalogue row once and hands out copies after.

    A device's evaluation asks for the same users' rows up to three times (full ranking,
    the lists it would show, the exposure of an attacked item); the model does not change
    in between.
    """
    rows: dict[int, np.ndarray] = {}

    def score(users: np.ndarray) -> np.ndarray:
        missing = np.array([u for u in dict.fromkeys(users.tolist()) if u not in rows], dtype=np.int64)
        if len(missing):
            rows.update(zip(missing.tolist(), score_all(missing), strict=True))
        return np.stack([rows[u] for u in users.tolist()]) if len(users) else score_all(users)

    return score


def popularity_scorers(popularity: np.ndarray) -> tuple[PairScorer, AllScorer]:
    """ItemPop: every user gets the same score per item, its training interaction count."""
    pop = popularity.astype(np.float64)
    return (lambda users, items: pop[items]), (lambda users: np.broadcast_to(pop, (len(users), len(pop))))


def evaluate_model(
    model: RecModel,
    users: np.ndarray,
    held_out: np.ndarray,
    negatives: np.ndarray,
    seen: list[np.ndarray],
    k: int = 10,
    *,
    full: bool = True,
) -> dict[str, np.ndarray]:
    """:func:`evaluate_ranking` with a model's scores."""
    pairs, all_items = model_scorers(model)
    return evaluate_ranking(pairs, all_items, users, held_out, negatives, seen, k=k, full=full)


def exposure_hits(
    score_all: AllScorer, users: np.ndarray, interacted: list[np.ndarray], item: int, *, k: int = 10
) -> dict[str, float]:
    """Sums for the exposure ratio ER@k of one item: the share of users who never interacted
    with it and still find it in their top-k of the items they have not interacted with.

    The measure of item-promotion attacks (FedRecAttack, PipAttack); ``interacted[u]`` is
    everything user ``u`` interacted with, held-out items included.
    """
    eligible = [u for u in users if item not in set(interacted[u].tolist())]
    if not eligible:
        return {}
    scores = score_all(np.asarray(eligible)).astype(np.float64)
    hits = 0
    for row, user in zip(scores, eligible, strict=True):
        row[interacted[user]] = -np.inf
        threshold = np.partition(row, -k)[-k] if len(row) > k else -np.inf
        hits += int(row[item] >= threshold and np.isfinite(row[item]))
    return {"count": float(len(eligible)), f"er@{k}": float(hits)}


def evaluate_new_items(
    model: RecModel, users: np.ndarray, held_out: np.ndarray, negatives: np.ndarray, features: np.ndarray, k: int = 10
) -> dict[str, np.ndarray]:
    """Per-user sampled metrics for items no one trained on: each user's held-out new item
    against ``negatives`` drawn from the other new items, scored from content alone.

    ``held_out`` and ``negatives`` index ``features`` (the new items' content rows). Only
    sampled metrics: the candidates are new items, so a full ranking against the known
    catalogue would measure how new items compete with old ones, a different question.
    """
    model.eval()

    def pairs(pair_users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return model.score_new_pairs(torch.from_numpy(pair_users), features[items]).numpy()

    return evaluate_ranking(pairs, None, users, held_out, negatives, None, k=k, full=False)


@dataclass(frozen=True)
class ListMetrics:
    """What a device measures beyond accuracy on the top-k lists it would show (run-config keys)."""

    rerank_diversity: float = 0.0  # MMR weight; 0: the plain top-k
    catalogue_metrics: bool = True  # send how often each item is in the lists (coverage, novelty)
    groups: bool = True  # sums per group of users (activity, and demographics where the data has them)
    activity_bands: tuple[int, ...] = (50, 150)


GROUP_PREFIX = "grp/"  # a device's per-group sums: "grp/<dimension>=<label>/<metric>"
RECOMMENDED_ITEMS_KEY = "rec_items"  # int32 bytes: the items of a device's top-k lists, with repeats
GROUP_METRICS = ("sampled_hr@10", "sampled_ndcg@10", "full_hr@10", "full_ndcg@10")


def shown_lists(
    scores: np.ndarray, seen: list[np.ndarray], k: int, catalogue: np.ndarray | None, diversity: float
) -> np.ndarray:
    """[n, k] the lists users would see: top-k unseen items, MMR re-ranked when ``diversity`` > 0."""
    if diversity > 0 and catalogue is not None:
        return mmr_rerank(scores, catalogue, k, diversity, exclude=seen)
    return top_k_items(scores, k, exclude=seen)


def list_sums(
    scores: np.ndarray,
    users: np.ndarray,
    held_out: np.ndarray,
    seen: list[np.ndarray],
    per_user: dict[str, np.ndarray],
    train_counts: np.ndarray,
    groups: dict[str, np.ndarray],
    catalogue: np.ndarray | None,
    options: ListMetrics,
    k: int = 10,
) -> dict[str, float | bytes]:
    """A device's beyond-accuracy sums for its evaluated users (rows of ``scores``, ``users`` local ids).

    ``per_user``: the accuracy metrics of these users (evaluate_ranking's order), summed per
    group; ``train_counts`` and ``groups`` are per local user.
    """
    lists = shown_lists(scores, [seen[u] for u in users], k, catalogue, options.rerank_diversity)
    out: dict[str, float | bytes] = {}
    if catalogue is not None:
        out[f"test_ild@{k}"] = float(intra_list_diversity(lists, catalogue).sum())
    if options.rerank_diversity > 0:
        hit_at = np.where(lists == held_out[:, None])
        position = np.full(len(users), k)
        position[hit_at[0]] = hit_at[1]
        out[f"test_shown_hr@{k}"] = float(hit_at_k(position, k).sum())
        out[f"test_shown_ndcg@{k}"] = float(ndcg_at_k(position, k).sum())
    if options.catalogue_metrics:
        out[RECOMMENDED_ITEMS_KEY] = np.asarray(lists, dtype="<i4").tobytes()
    if options.groups:
        labels = {"activity": activity_labels(train_counts[users], options.activity_bands),
                  **{name: values[users] for name, values in groups.items()}}
        for dimension, values in labels.items():
            for label in np.unique(values):
                rows = values == label
                key = f"{GROUP_PREFIX}{dimension}={label}/"
                out[key + "count"] = float(rows.sum())
                out.update({key + m: float(per_user[m][rows].sum()) for m in GROUP_METRICS if m in per_user})
    return out
