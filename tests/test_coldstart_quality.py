"""Fold-in quality: a newcomer fitted against a trained global item side beats popularity.

MovieLens-100K-shaped synthetic data (943 users, 1,682 items, about 100 interactions per
user, the embedded generator's defaults otherwise). A fifth of the users are newcomers: the
global model is trained without them, then each is folded in from only their 10 latest
training interactions, with the fold-in settings the README's MovieLens-100K run uses.
"""

import numpy as np
import torch

from client.coldstart import fold_in
from client.local import build_local_model
from common.config import parse_run_config
from common.evaluation import evaluate_model, evaluate_ranking, popularity_scorers
from common.federation import ClientData, EvalData, prepare
from common.models import build_model
from common.training import PositiveSet, TrainConfig, build_examples, make_optimizer, train_epoch
from simulations.engine import fused_run_config

HANDFUL = 10


def test_a_folded_in_newcomer_beats_the_popularity_fallback_on_movielens_100k_shaped_data():
    config = parse_run_config(fused_run_config({
        "synthetic-users": 943, "synthetic-items": 1682, "synthetic-mean-interactions": 100, "embedding-dim": 16,
    }))
    prepared = prepare(config)
    train = prepared.split.train
    rng = np.random.default_rng(0)
    newcomer = np.zeros(prepared.num_users, bool)
    newcomer[rng.choice(prepared.num_users, prepared.num_users // 5, replace=False)] = True
    warm = ~newcomer[train.users]

    # The global model, trained on everyone else (centrally: only its item side is used).
    model = build_model(config.model_config, prepared.num_users, prepared.num_items, seed=0)
    central = TrainConfig(batch_size=256, learning_rate=5e-3, num_negatives=4)
    positives = PositiveSet(train.users, train.items, prepared.num_items)
    optimizer, generator = make_optimizer(model, central), torch.Generator().manual_seed(0)
    for _ in range(5):
        examples = build_examples(train.users[warm], train.items[warm], train.ratings[warm], positives, central, rng)
        train_epoch(model, examples, optimizer, central, generator)
    shared = list(model.shared_state().values())

    # One device holding every newcomer with their last HANDFUL interactions (rows are by user, then time).
    users = np.flatnonzero(newcomer)
    local = {int(user): i for i, user in enumerate(users)}
    kept = np.concatenate([np.flatnonzero(train.users == user)[-HANDFUL:] for user in users])
    held = np.isin(prepared.test.users, users)
    test = EvalData(np.array([local[int(u)] for u in prepared.test.users[held]]), prepared.test.items[held],
                    prepared.test.negatives[held])
    empty = EvalData(np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, 0), np.int64))
    data = ClientData(global_users=users, train_users=np.array([local[int(u)] for u in train.users[kept]]),
                      train_items=train.items[kept], train_ratings=train.ratings[kept], test=test,
                      validation=empty, num_items=prepared.num_items)
    fresh = build_model(config.model_config, len(users), prepared.num_items, seed=1).local_state()
    # The ML-100K command's device settings: learning-rate 0.02, user-learning-rate 0.005, max(4, 16) epochs.
    refit = TrainConfig(epochs=16, batch_size=32, learning_rate=0.02, user_learning_rate=0.005, num_negatives=4)
    folded = fold_in(config.model_config, refit, data, shared, dict(fresh), np.ones(len(users), bool), seed=0)

    seen = data.seen_items(include_validation=True)
    def hit_rate(rows) -> float:
        device = build_local_model(config.model_config, data, shared, rows, seed=0)
        return float(evaluate_model(device, test.users, test.items, test.negatives, seen, 10)["sampled_hr@10"].mean())

    popularity = np.bincount(train.items[warm], minlength=prepared.num_items).astype(np.float64)
    by_popularity = evaluate_ranking(*popularity_scorers(popularity), test.users, test.items, test.negatives, seen, k=10)
    popular_hr = float(by_popularity["sampled_hr@10"].mean())
    folded_hr, fresh_hr = hit_rate(folded), hit_rate(dict(fresh))
    print(f"HR@10 over {len(test.users)} newcomers: fold-in {folded_hr:.4f}, ItemPop {popular_hr:.4f}, fresh {fresh_hr:.4f}")
    assert len(test.users) > 150
    assert fresh_hr < 0.25  # a random row ranks the held-out item about as chance does (0.10)
    assert folded_hr > popular_hr + 0.03, (folded_hr, popular_hr)
