"""Accuracy against diversity: MMR re-ranking weights on one centrally trained model, and quality per group.

Trains a model once on the federated split (``fedrec baseline``'s loop), then shows every
test user the top-10 of each MMR weight and measures what a device would: HR@10 and
NDCG@10 of the list shown, intra-list diversity by the catalogue's features, catalogue
coverage and novelty. It also prints HR@10 per group of users at weight 0, with the
suppression rule the server applies.

    python -m simulations.diversity --data ../shared/datasets/ml-100k --weights 0,0.2,0.4,0.6,0.8
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import numpy as np
import torch

from common.config import fused_run_config, parse_run_config
from common.evaluation import shown_lists
from common.federation import prepare, seen_items
from common.metrics import (
    catalogue_coverage,
    hit_at_k,
    intra_list_diversity,
    ndcg_at_k,
    novelty,
    sampled_metrics,
)
from common.models import RecModel
from common.training import TrainConfig
from common.user_groups import activity_labels
from simulations.baselines import item_popularity, run_trained, stderr_progress


def list_table(model: RecModel, prepared, weights: list[float], k: int = 10) -> list[dict[str, float]]:
    """One row per MMR weight: accuracy and beyond-accuracy of the lists every test user would see."""
    t = prepared.test
    train = prepared.split.train
    seen = seen_items(train.users, train.items, prepared.num_users, prepared.validation)
    with torch.no_grad():
        scores = model.score_all_items(torch.from_numpy(t.users)).numpy()
    popularity = item_popularity(prepared)
    rows = []
    for weight in weights:
        lists = shown_lists(scores, [seen[u] for u in t.users], k, prepared.catalogue, weight)
        position = np.full(len(t.users), k)
        hit_rows, hit_slots = np.where(lists == t.items[:, None])
        position[hit_rows] = hit_slots
        rows.append({
            "weight": weight, "hr@10": float(hit_at_k(position, k).mean()), "ndcg@10": float(ndcg_at_k(position, k).mean()),
            "ild@10": float(intra_list_diversity(lists, prepared.catalogue).mean()),
            "coverage@10": catalogue_coverage(lists, prepared.num_items),
            "novelty@10": novelty(lists, popularity, prepared.num_users),
        })
        print(f"[diversity] weight {weight}: HR@10 {rows[-1]['hr@10']:.4f} ILD@10 {rows[-1]['ild@10']:.4f}",
              file=sys.stderr, flush=True)
    return rows


def group_table(model: RecModel, prepared, min_users: int, bands: tuple[int, ...]) -> list[tuple[str, str, int, float]]:
    """Sampled HR@10 per group of test users; groups under ``min_users`` suppressed (None)."""
    t = prepared.test
    with torch.no_grad():
        candidates = np.concatenate([t.items[:, None], t.negatives], axis=1)
        users = torch.from_numpy(np.repeat(t.users, candidates.shape[1]))
        scores = model(users, torch.from_numpy(candidates.reshape(-1))).numpy().reshape(candidates.shape)
    hits = sampled_metrics(scores[:, 0], scores[:, 1:])["hr@10"]
    counts = np.bincount(prepared.split.train.users, minlength=prepared.num_users)
    labels = {"activity": activity_labels(counts[t.users], bands),
              **{name: values[t.users] for name, values in prepared.user_groups.items()}}
    rows = []
    for dimension, values in labels.items():
        for label in np.unique(values):
            members = values == label
            n = int(members.sum())
            rows.append((dimension, str(label), n, float(hits[members].mean()) if n >= min_users else None))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="MovieLens-100K directory")
    parser.add_argument("--model", default="gmf")
    parser.add_argument("--weights", default="0,0.2,0.4,0.6,0.8")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("-c", "--run-config", default="", help="extra run-config overrides, TOML pairs")
    args = parser.parse_args(argv)
    from flwr.common.config import parse_config_args

    overrides = {"dataset": "movielens-100k", "data-path": args.data, "model": args.model,
                 **(parse_config_args([args.run_config]) if args.run_config else {})}
    config = parse_run_config(fused_run_config(overrides))
    prepared = prepare(config)
    if prepared.catalogue is None:
        parser.error("this dataset has no item catalogue to measure diversity by")
    trained: list[RecModel] = []
    train = TrainConfig(epochs=args.epochs, batch_size=256, learning_rate=1e-3, num_negatives=4)
    run_trained(prepared, replace(config.model_config, name=args.model), train, seed=config.seed,
                progress=stderr_progress, on_trained=trained.append)
    model = trained[0].eval()
    print("| MMR weight | HR@10 | NDCG@10 | ILD@10 | coverage@10 | novelty@10 |\n|---|---|---|---|---|---|")
    for row in list_table(model, prepared, [float(w) for w in args.weights.split(",")]):
        print(f"| {row['weight']:g} | {row['hr@10']:.4f} | {row['ndcg@10']:.4f} | {row['ild@10']:.4f} | "
              f"{row['coverage@10']:.4f} | {row['novelty@10']:.2f} |")
    print(f"\n| group | label | test users | HR@10 (sampled; suppressed under {config.group_min_users} users) |"
          "\n|---|---|---|---|")
    for dimension, label, n, hr in group_table(model, prepared, config.group_min_users,
                                               config.list_metrics.activity_bands):
        print(f"| {dimension} | {label} | {n} | {'suppressed' if hr is None else f'{hr:.4f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
