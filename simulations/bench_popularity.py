"""How well the server's published popularity (summed touched vectors) ranks, against ItemPop.

The server publishes ``common.updates.popular_items`` of the example-weighted touched
vectors it receives every round. This replays what devices touch (their positives plus
freshly sampled negatives over the local epochs, exactly as ``common.training`` builds
them) for ROUNDS rounds of CLIENTS sampled devices, and prints HR@10 of that ranking and
of true ItemPop on the leave-one-out test items, and their top-20 overlap. No training.

    python -m simulations.bench_popularity --data-path ../shared/datasets/ml-100k --rounds 20 --clients 100
"""

from __future__ import annotations

import argparse

import numpy as np

from common.config import fused_run_config, parse_run_config
from common.evaluation import evaluate_ranking, popularity_scorers
from common.federation import slicer_cached
from common.training import PositiveSet, build_examples
from simulations.baselines import item_popularity


def touched_totals(slicer, config, rounds: int, clients: int, rng: np.random.Generator) -> np.ndarray:
    """Example-weighted sum of the touched vectors of ``rounds`` rounds of ``clients`` devices."""
    totals = np.zeros(slicer.prepared.num_items)
    for _ in range(rounds):
        for client in rng.choice(len(slicer), size=min(clients, len(slicer)), replace=False):
            data = slicer.client(int(client))
            positives = PositiveSet(data.train_users, data.train_items, data.num_items)
            touched = np.zeros(data.num_items)
            for _ in range(config.train_config.epochs):
                examples = build_examples(data.train_users, data.train_items, data.train_ratings, positives,
                                          config.train_config, rng)
                touched[np.unique(examples.items.numpy())] = 1.0
            totals += len(data.train_items) * touched
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="movielens-100k")
    parser.add_argument("--data-path", required=True)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--local-epochs", type=int, default=4)
    args = parser.parse_args()
    config = parse_run_config(fused_run_config(
        {"dataset": args.dataset, "data-path": args.data_path, "local-epochs": args.local_epochs}))
    slicer = slicer_cached(config)
    prepared = slicer.prepared
    published = touched_totals(slicer, config, args.rounds, args.clients, np.random.default_rng(config.seed))
    true = item_popularity(prepared).astype(np.float64)
    test = prepared.test
    seen = [np.empty(0, np.int64)] * prepared.num_users  # popularity ranks the same for every user
    for name, scores in (("ItemPop", true), ("published (touched sums)", published)):
        result = evaluate_ranking(*popularity_scorers(scores), test.users, test.items, test.negatives, seen, k=10,
                                  full=False)
        print(f"{name:>26}: HR@10 {result['sampled_hr@10'].mean():.4f}  NDCG@10 {result['sampled_ndcg@10'].mean():.4f}")
    overlap = len(set(np.argsort(-true)[:20]) & set(np.argsort(-published)[:20]))
    print(f"top-20 overlap with ItemPop: {overlap} of 20 ({args.rounds} rounds of {args.clients} devices)")


if __name__ == "__main__":
    main()
