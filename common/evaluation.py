"""Leave-one-out evaluation shared by clients, the centralized baselines and benchmarks.

Each user with a held-out item is scored twice: against its 99 sampled negatives (the
NCF protocol, comparable with the literature) and against every item it has not seen
in training (full ranking, which sampled metrics are known to flatter).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from common.metrics import full_ranking_metrics, sampled_metrics
from common.models import RecModel

PairScorer = Callable[[np.ndarray, np.ndarray], np.ndarray]
AllScorer = Callable[[np.ndarray], np.ndarray]


def evaluate_ranking(
    score_pairs: PairScorer,
    score_all: AllScorer,
    users: np.ndarray,
    held_out: np.ndarray,
    negatives: np.ndarray,
    seen: list[np.ndarray],
    *,
    k: int = 10,
    chunk: int = 512,
    full: bool = True,
) -> dict[str, np.ndarray]:
    """Per-user ``sampled_*`` and (if ``full``) ``full_*`` metrics; ``seen[u]`` is excluded from full ranking."""
    if len(users) == 0:
        return {}
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, len(users), chunk):
        u, pos, neg = users[start : start + chunk], held_out[start : start + chunk], negatives[start : start + chunk]
        candidates = np.concatenate([pos[:, None], neg], axis=1)
        scores = score_pairs(np.repeat(u, candidates.shape[1]), candidates.reshape(-1)).reshape(candidates.shape)
        result = {f"sampled_{key}": value for key, value in sampled_metrics(scores[:, 0], scores[:, 1:], k=k).items()}
        if full:
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
    for row, user in zip(scores, eligible):
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
    if len(users) == 0:
        return {}
    model.eval()
    candidates = np.concatenate([held_out[:, None], negatives], axis=1)
    flat_users = torch.from_numpy(np.repeat(users, candidates.shape[1]))
    scores = model.score_new_pairs(flat_users, features[candidates.reshape(-1)]).numpy().reshape(candidates.shape)
    return {f"sampled_{key}": value for key, value in sampled_metrics(scores[:, 0], scores[:, 1:], k=k).items()}
