"""Tuning aid for federated (Private) ALS: the same math as the Flower path, in one process, in seconds.

Every user takes part in every round (the Poisson rate 1 of the Flower runs), uploads
:func:`common.als.private_statistics` (or the plain statistics), the sum gets the Gaussian
noise ``z C`` with ``z`` calibrated by the project's accountant for the target epsilon, and the
items are solved by :func:`common.als.solve_items` (plain) or :func:`common.als.solve_items_private`.
It reports validation HR@10 (what settings are chosen on) and test HR@10 after every round.
The figures of record come from ``fedrec simulate``; this only narrows the grid. Its start is
numpy's draw, not the torch draw of ``fedrec simulate``, so its figures differ a little.

    python -m simulations.als_study --data-path ../shared/datasets/ml-100k --epsilon 3 --rounds 3 --factors 16
"""

from __future__ import annotations

import argparse

import numpy as np

from common import als
from common.config import fused_run_config, parse_run_config
from common.evaluation import evaluate_ranking
from common.federation import prepare
from common.metrics import summarize
from common.privacy import calibrate_noise


def user_items(train_users: np.ndarray, train_items: np.ndarray, num_users: int) -> list[np.ndarray]:
    """Each user's distinct training items."""
    order = np.argsort(train_users, kind="stable")
    bounds = np.searchsorted(train_users[order], np.arange(num_users + 1))
    return [np.unique(train_items[order[a:b]]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def hit_rates(prepared, items_of: list[np.ndarray], item_factors: np.ndarray) -> tuple[float, float]:
    """Validation and test HR@10 (sampled), user factors solved on each user's training items."""
    y = item_factors.astype(np.float64)
    gram = y.T @ y
    users = np.stack([als.solve_user(y, items, gram=gram) for items in items_of])
    scores = lambda u, i: np.einsum("nf,nf->n", users[u], y[i])  # noqa: E731
    out = []
    for part in (prepared.validation, prepared.test):
        per_user = evaluate_ranking(scores, None, part.users, part.items, part.negatives, None, k=10, full=False)
        out.append(summarize(per_user)["sampled_hr@10"])
    return out[0], out[1]


def run(args: argparse.Namespace) -> None:
    overrides = dict(item.split("=", 1) for item in args.run_config.split())
    config = parse_run_config(fused_run_config({**overrides, "dataset": args.dataset, "data-path": args.data_path,
                                                "seed": args.seed}))
    prepared = prepare(config)
    n_users, n_items = prepared.num_users, prepared.num_items
    train = prepared.split.train
    items_of = user_items(train.users, train.items, n_users)
    rng = np.random.default_rng(args.seed)
    y = (rng.standard_normal((n_items, args.factors)) * 0.01)
    z = 0.0
    scales = als.BlockScales(gram=args.gram_scale, count=args.count_scale)
    if args.epsilon > 0:
        z = calibrate_noise(args.epsilon, args.rounds, clipping_norm=1.0, num_clients=n_users, sampling="poisson",
                            sampling_rate=1.0, delta=1e-5)
    for r in range(1, args.rounds + 1):
        total = np.zeros(als.statistics_size(n_items, args.factors, private=z > 0))
        for items in items_of:
            if z > 0:
                total += als.private_statistics(y, items, n_items, 1.0, args.max_items, rng, alpha=args.alpha,
                                                scales=scales)
            else:
                total += als.user_statistics(als.solve_user(y, items), items, n_items)
        if z > 0:
            total += rng.normal(0.0, z, total.shape)
            y = als.solve_items_private(total, n_items, args.factors, z, args.alpha, scales=scales,
                                        ridge_factor=args.ridge_factor)
        else:
            y = als.solve_items(total, n_items, args.factors)
        val, test = hit_rates(prepared, items_of, y)
        print(f"eps {args.epsilon} z {z:.3f} f {args.factors} K {args.max_items} sG {args.gram_scale} "
              f"sc {args.count_scale} ridge {args.ridge_factor} alpha {args.alpha} round {r}/{args.rounds}: "
              f"val HR@10 {val:.4f} test HR@10 {test:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="movielens-100k")
    parser.add_argument("--data-path", default="")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--run-config", "-c", default="", help="other run-config keys, KEY=VALUE separated by spaces")
    parser.add_argument("--epsilon", type=float, default=0.0, help="0: non-private")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--factors", type=int, default=16)
    parser.add_argument("--max-items", type=int, default=100)
    parser.add_argument("--gram-scale", type=float, default=als.DP_GRAM_SCALE)
    parser.add_argument("--count-scale", type=float, default=als.DP_COUNT_SCALE)
    parser.add_argument("--ridge-factor", type=float, default=als.DP_RIDGE_FACTOR)
    parser.add_argument("--alpha", type=float, default=als.ALS_ALPHA)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
