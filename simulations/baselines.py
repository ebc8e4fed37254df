"""Centralized baselines on the exact split the federation uses: the yardstick.

ItemPop ranks by training popularity; Random by chance. EASE (closed form) and ALS
(implicit-feedback matrix factorization) are the yardsticks of the recommender libraries
(:mod:`simulations.yardsticks`): they read the binary training matrix, ALS keeps the
sweep with the best validation HR@10. MF/GMF/MLP/NeuMF (hybrid with ``item-features``)
train on all training rows in one place with the shared training loop (with ``lazy_adam``,
only the embedding rows of a batch take an Adam step: an epoch's time is then linear in
the ratings), select the epoch with the best validation HR@10, and report test metrics
of that epoch.

With ``new-items``, each also reports the held-out new items (no training popularity, no
collaborative row): ItemPop then ranks them by the popularity their content predicts (a
least-squares fit of log popularity on the known items' features), the non-personalised
yardstick a hybrid model must beat.
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from common.evaluation import evaluate_model, evaluate_new_items, evaluate_ranking, popularity_scorers
from common.federation import PreparedData, seen_items
from common.interactions import Interactions
from common.metrics import mae, rmse, summarize
from common.models import ModelConfig, RecModel, build_model
from common.training import (
    PositiveSet,
    TrainConfig,
    build_examples,
    dense_embedding_gradients,
    make_optimizer,
    make_sparse_row_optimizer,
    train_epoch,
)
from simulations import yardsticks

TORCH_MODELS = ("mf", "gmf", "mlp", "neumf")
BASELINES = ("random", "itempop", "ease", "als", *TORCH_MODELS)


@dataclass
class BaselineResult:
    """Test (and validation) metric means of one baseline, plus how it got there."""

    model: str
    test: dict[str, float]
    validation: dict[str, float]
    seconds: float
    best_epoch: int = 0
    epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    new_items: dict[str, float] = field(default_factory=dict)  # held-out new items (new-items > 0)


def _exclusions(prepared: PreparedData) -> tuple[list[np.ndarray], list[np.ndarray]]:
    train = prepared.split.train
    val_seen = seen_items(train.users, train.items, prepared.num_users)
    test_seen = seen_items(train.users, train.items, prepared.num_users, prepared.validation)
    return val_seen, test_seen


def item_popularity(prepared: PreparedData) -> np.ndarray:
    """Training interactions per item."""
    return np.bincount(prepared.split.train.items, minlength=prepared.num_items)


def content_popularity(prepared: PreparedData) -> np.ndarray:
    """The popularity each new item's content predicts: log1p(popularity) ~ features, fitted on the known items."""
    assert prepared.item_features is not None and prepared.new_item_features is not None
    design = np.hstack([prepared.item_features, np.ones((prepared.num_items, 1), np.float32)])
    coef, *_ = np.linalg.lstsq(design, np.log1p(item_popularity(prepared)), rcond=None)
    return np.hstack([prepared.new_item_features, np.ones((len(prepared.new_item_features), 1))]) @ coef


def _new_items(prepared: PreparedData, score: Callable[[np.ndarray, np.ndarray], np.ndarray], k: int) -> dict[str, float]:
    """Sampled metrics on the held-out new items, ``score(users, new item ids)`` per pair."""
    n = prepared.new_items
    if len(n.users) == 0:
        return {}
    return summarize(evaluate_ranking(score, None, n.users, n.items, n.negatives, None, k=k, full=False))


def _evaluate_scorers(prepared: PreparedData, pairs, all_items, k: int) -> tuple[dict[str, float], dict[str, float]]:
    val_seen, test_seen = _exclusions(prepared)
    t, v = prepared.test, prepared.validation
    test = summarize(evaluate_ranking(pairs, all_items, t.users, t.items, t.negatives, test_seen, k=k))
    val = summarize(evaluate_ranking(pairs, all_items, v.users, v.items, v.negatives, val_seen, k=k))
    return test, val


def run_itempop(prepared: PreparedData, k: int = 10) -> BaselineResult:
    started = time.perf_counter()
    test, val = _evaluate_scorers(prepared, *popularity_scorers(item_popularity(prepared)), k)
    new = {}
    if len(prepared.new_items.users) and prepared.new_item_features is not None:
        predicted = content_popularity(prepared)
        new = _new_items(prepared, lambda users, items: predicted[items], k)
    return BaselineResult("itempop", test, val, time.perf_counter() - started, new_items=new)


def run_random(prepared: PreparedData, k: int = 10, seed: int = 0) -> BaselineResult:
    """Uniformly random scores: the floor every model must clear (HR@10 about 0.10 against 99 negatives)."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    test, val = _evaluate_scorers(
        prepared, lambda users, items: rng.random(len(users)), lambda users: rng.random((len(users), prepared.num_items)), k
    )
    new = _new_items(prepared, lambda users, items: rng.random(len(users)), k)
    return BaselineResult("random", test, val, time.perf_counter() - started, new_items=new)


def row_scorers(score_rows: Callable[[np.ndarray], np.ndarray]) -> tuple[Callable, Callable]:
    """Pair and full-catalogue scorers from ``score_rows(users) -> [len(users), num_items]``."""

    def pairs(users: np.ndarray, items: np.ndarray) -> np.ndarray:
        unique, where = np.unique(users, return_inverse=True)
        return score_rows(unique)[where, items]

    return pairs, score_rows


def training_matrix(prepared: PreparedData):
    """The binary users x items matrix of the training split."""
    train = prepared.split.train
    return yardsticks.interaction_matrix(train.users, train.items, prepared.num_users, prepared.num_items)


def run_ease(prepared: PreparedData, k: int = 10, lam: float = yardsticks.EASE_LAMBDA) -> BaselineResult:
    """EASE: ``score(u) = x_u B``, B the closed-form item-item weights (no epochs, no selection)."""
    started = time.perf_counter()
    matrix = training_matrix(prepared)
    weights = yardsticks.ease_weights(matrix, lam)
    test, val = _evaluate_scorers(prepared, *row_scorers(lambda users: np.asarray(matrix[users] @ weights)), k)
    return BaselineResult("ease", test, val, time.perf_counter() - started)


def run_als(
    prepared: PreparedData,
    k: int = 10,
    *,
    factors: int = yardsticks.ALS_FACTORS,
    iterations: int = yardsticks.ALS_ITERATIONS,
    reg: float = yardsticks.ALS_REGULARIZATION,
    alpha: float = yardsticks.ALS_ALPHA,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> BaselineResult:
    """Implicit-feedback ALS; test metrics of the sweep with the best validation HR@10 (as for the trained models)."""
    if factors < 1 or iterations < 1 or reg < 0 or alpha < 0:
        raise ValueError(f"ALS needs factors >= 1, iterations >= 1, reg >= 0, alpha >= 0; got {factors}, "
                         f"{iterations}, {reg}, {alpha}")
    started = time.perf_counter()
    matrix = training_matrix(prepared)
    transposed = matrix.T.tocsr()
    user_f, item_f = yardsticks.als_init(prepared.num_users, prepared.num_items, factors, seed)
    v = prepared.validation
    best_score, best_iteration, best = -1.0, 0, (user_f, item_f)
    history = []
    for iteration in range(1, iterations + 1):
        user_f, item_f = yardsticks.als_sweep(matrix, transposed, user_f, item_f, reg, alpha)
        pairs, _ = row_scorers(lambda users, u=user_f, i=item_f: u[users] @ i.T)
        val = summarize(evaluate_ranking(pairs, None, v.users, v.items, v.negatives, None, k=k, full=False)) \
            if len(v.users) else {}
        history.append({"epoch": iteration, **val})
        score = val.get(f"sampled_hr@{k}", float(iteration))  # no validation split: the last sweep
        if score > best_score:
            best_score, best_iteration, best = score, iteration, (user_f, item_f)
        if progress:
            progress(f"  sweep {iteration:3d}/{iterations}  val HR@{k} {val.get(f'sampled_hr@{k}', float('nan')):.4f}  "
                     f"[{time.perf_counter() - started:.0f}s]")
    user_f, item_f = best
    test, _ = _evaluate_scorers(prepared, *row_scorers(lambda users: user_f[users] @ item_f.T), k)
    val_best = {key: value for key, value in history[best_iteration - 1].items() if key != "epoch"}
    return BaselineResult("als", test, val_best, time.perf_counter() - started, best_iteration, iterations, history)


def run_trained(
    prepared: PreparedData,
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    seed: int = 0,
    k: int = 10,
    progress: Callable[[str], None] | None = None,
    on_trained: Callable[[RecModel], None] | None = None,
    lazy_adam: bool = False,
) -> BaselineResult:
    """Train centrally for ``train_config.epochs``; report test metrics at the best validation epoch.

    ``on_trained`` receives the model of that epoch (for measurements beyond this table).
    ``lazy_adam``: the embedding tables train with :class:`common.training.LazyAdam` (Adam only).
    """
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    train = prepared.split.train
    model = build_model(model_config, prepared.num_users, prepared.num_items, seed=seed)
    if model.content_features:
        model.set_item_features(prepared.item_features)
    # Dense Adam moves every row of the user and item tables on every step, so an epoch costs
    # ratings x (users + items); lazy Adam moves the rows of the batch only (linear in ratings)
    # but, at the same learning rate, converges in more epochs (see LazyAdam).
    optimizer = make_sparse_row_optimizer(model, train_config) if lazy_adam else make_optimizer(model, train_config)
    positives = PositiveSet(train.users, train.items, prepared.num_items)
    val_seen, test_seen = _exclusions(prepared)
    v = prepared.validation
    best_score, best_epoch, best_state = -1.0, 0, copy.deepcopy(model.state_dict())
    history = []
    for epoch in range(1, train_config.epochs + 1):
        examples = build_examples(train.users, train.items, train.ratings, positives, train_config, rng)
        loss = train_epoch(model, examples, optimizer, train_config, generator)
        val = summarize(evaluate_model(model, v.users, v.items, v.negatives, val_seen, k, full=False)) if len(v.users) else {}
        score = val.get(f"sampled_hr@{k}", -loss)
        history.append({"epoch": epoch, "loss": loss, **val})
        if score > best_score:
            best_score, best_epoch, best_state = score, epoch, copy.deepcopy(model.state_dict())
        if progress:
            progress(
                f"  epoch {epoch:3d}/{train_config.epochs}  loss {loss:.4f}  "
                f"val HR@{k} {val.get(f'sampled_hr@{k}', float('nan')):.4f}  "
                f"NDCG@{k} {val.get(f'sampled_ndcg@{k}', float('nan')):.4f}  "
                f"[{time.perf_counter() - started:.0f}s]"
            )
    dense_embedding_gradients(model)
    model.load_state_dict(best_state)
    if on_trained is not None:
        on_trained(model)
    t = prepared.test
    test = summarize(evaluate_model(model, t.users, t.items, t.negatives, test_seen, k))
    if train_config.loss == "mse":  # explicit feedback: also how well ratings are predicted
        test.update(rating_errors(model, prepared.split.test))
    val_best = {key: value for key, value in history[best_epoch - 1].items() if key not in ("epoch", "loss")}
    new = {}
    if model.content_features and len(prepared.new_items.users):
        n = prepared.new_items
        new = summarize(evaluate_new_items(model, n.users, n.items, n.negatives, prepared.new_item_features, k))
    name = model_config.name + ("+content" if model.content_features else "")
    return BaselineResult(
        name, test, val_best, time.perf_counter() - started, best_epoch, train_config.epochs, history, new_items=new
    )


@torch.no_grad()
def rating_errors(model: RecModel, part: Interactions) -> dict[str, float]:
    """RMSE and MAE of predicted ratings on held-out (user, item, rating) rows."""
    model.eval()
    predicted = model(torch.from_numpy(part.users), torch.from_numpy(part.items)).numpy()
    return {"rmse": rmse(predicted, part.ratings), "mae": mae(predicted, part.ratings)}


def stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
