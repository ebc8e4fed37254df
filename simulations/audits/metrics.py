"""Attack metrics: ROC AUC, TPR at a fixed FPR, and precision/recall/F1 of a thresholded guess.

Written with numpy/scipy only (no scikit-learn in the environment). Every metric is for
"positive = member / interacted", higher score = more likely positive.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted as 1/2 (nan if one class is empty)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(scores)  # average ranks for ties
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float = 0.01) -> float:
    """Largest TPR among thresholds whose FPR is <= ``fpr`` (guess positive when score > threshold)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    negatives = np.sort(scores[~labels])[::-1]
    if len(negatives) == 0 or labels.sum() == 0:
        return float("nan")
    allowed = int(np.floor(fpr * len(negatives)))  # false positives we may admit
    # threshold: strictly above the (allowed+1)-th highest negative score
    threshold = negatives[allowed] if allowed < len(negatives) else -np.inf
    return float(np.mean(scores[labels] > threshold))


def guess_metrics(guessed: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Precision, recall and F1 of a boolean guess."""
    guessed = np.asarray(guessed, dtype=bool)
    labels = np.asarray(labels, dtype=bool)
    hits = int(np.count_nonzero(guessed & labels))
    precision = hits / guessed.sum() if guessed.sum() else 0.0
    recall = hits / labels.sum() if labels.sum() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1), "guessed": int(guessed.sum())}


def random_guess_metrics(num_guessed: int, num_positive: int, population: int) -> dict[str, float]:
    """What guessing ``num_guessed`` of ``population`` at random scores in expectation.

    Precision is the base rate; recall is the share guessed; F1 from those two.
    """
    base = num_positive / population if population else 0.0
    recall = num_guessed / population if population else 0.0
    f1 = 2 * base * recall / (base + recall) if base + recall > 0 else 0.0
    return {"precision": base, "recall": recall, "f1": f1, "auc": 0.5}
