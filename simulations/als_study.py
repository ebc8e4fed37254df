"""Tuning aid for federated (Private) ALS: the same math as the Flower path, in one process, in seconds.

Every user takes part in every round (the Poisson rate 1 of the Flower runs), uploads
:func:`common.als.private_statistics` (or the plain statistics), the sum gets the Gaussian
noise ``z C`` with ``z`` calibrated by the project's accountant for the target epsilon, and the
items are solved by :func:`common.als.solve_items` (plain) or :func:`common.als.solve_items_private`.
It reports validation HR@10 (what settings are chosen on) and test HR@10 after every round,
and with ``--draws`` or several ``--seeds`` their means over every (split seed, noise draw):
one noise draw moves HR@10 by about 0.01, more than most settings do. The figures of record
come from ``fedrec simulate``; this only narrows the grid. Its start is numpy's draw, not the
torch draw of ``fedrec simulate``, so its figures differ a little.

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
from common.privacy import ACCOUNTANTS, calibrate_noise


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
    seeds = [int(seed) for seed in str(args.seed).split(",")]
    finals = np.array([run_draw(args, seed, draw) for seed in seeds for draw in range(args.draws)])
    if len(finals) > 1:
        spread = finals[:, 1].std(ddof=1) / np.sqrt(len(finals))
        print(f"mean of {len(finals)} (seeds {args.seed}, {args.draws} noise draws each): val HR@10 "
              f"{finals[:, 0].mean():.4f} test HR@10 {finals[:, 1].mean():.4f} (standard error {spread:.4f})")


def run_draw(args: argparse.Namespace, seed: int, draw: int) -> tuple[float, float]:
    """One split seed and noise draw; the last round's validation and test HR@10."""
    overrides = dict(item.split("=", 1) for item in args.run_config.split())
    config = parse_run_config(fused_run_config({**overrides, "dataset": args.dataset, "data-path": args.data_path,
                                                "seed": seed}))
    prepared = prepare(config)
    n_users, n_items = prepared.num_users, prepared.num_items
    train = prepared.split.train
    items_of = user_items(train.users, train.items, n_users)
    rng = np.random.default_rng(seed if draw == 0 else [seed, draw])
    y = (rng.standard_normal((n_items, args.factors)) * 0.01)
    z = 0.0
    scales = als.BlockScales(gram=args.gram_scale, count=args.count_scale)
    if args.epsilon > 0:
        z = calibrate_noise(args.epsilon, args.rounds, args.accountant, clipping_norm=1.0, num_clients=n_users,
                            sampling="poisson", sampling_rate=1.0, delta=1e-5, first_round_noise=args.first_round_noise)
    val = test = 0.0
    for r in range(1, args.rounds + 1):
        noise = z * (args.first_round_noise if r == 1 else 1.0)
        total = np.zeros(als.statistics_size(n_items, args.factors, private=z > 0))
        for items in items_of:
            if z > 0:
                total += als.private_statistics(y, items, n_items, 1.0, args.max_items, rng, alpha=args.alpha,
                                                scales=scales)
            else:
                total += als.user_statistics(als.solve_user(y, items), items, n_items)
        if z > 0:
            total += rng.normal(0.0, noise, total.shape)
            y = als.solve_items_private(total, n_items, args.factors, noise, args.alpha, scales=scales,
                                        ridge_factor=args.ridge_factor)
        else:
            y = als.solve_items(total, n_items, args.factors)
        val, test = hit_rates(prepared, items_of, y)
        print(f"seed {seed} draw {draw} eps {args.epsilon} ({args.accountant}) z {z:.3f} x {args.first_round_noise:g} "
              f"in round 1, f {args.factors} K {args.max_items} sG {args.gram_scale} sc {args.count_scale} "
              f"ridge {args.ridge_factor} alpha {args.alpha} round {r}/{args.rounds}: "
              f"val HR@10 {val:.4f} test HR@10 {test:.4f}", flush=True)
    return val, test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="movielens-100k")
    parser.add_argument("--data-path", default="")
    parser.add_argument("--seed", default="42", help="split seed, or several separated by commas")
    parser.add_argument("--draws", type=int, default=1, help="noise draws per seed (the first is the seed's own)")
    parser.add_argument("--accountant", default="rdp", choices=ACCOUNTANTS)
    parser.add_argument("--first-round-noise", type=float, default=1.0,
                        help="round 1's noise multiplier over the others' (user-dp-first-round-noise)")
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
