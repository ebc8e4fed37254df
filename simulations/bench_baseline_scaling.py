"""Benchmark: seconds per epoch of the centralized GMF/NeuMF baseline as the ratings grow.

An epoch of :func:`simulations.baselines.run_trained` (fresh negatives, one pass of Adam
over the examples, the validation ranking) should cost time in proportion to the ratings.
It does not with dense Adam (the default), which reads and writes every row of the user
and item tables on every step: with users growing with the ratings an epoch costs ratings
x (users + items). ``fedrec baseline --lazy-adam`` trains the tables with row-sparse Adam
(:class:`common.training.LazyAdam`), whose step costs O(batch); ``--optimizers
lazy,dense`` measures both in one run.

Synthetic data (:mod:`common.synthetic`): 100 interactions per user on average, users
growing with the ratings, MovieLens-1M's catalogue of 3,706 items; the same split and
evaluation as ``fedrec baseline``. Seconds per epoch are the time between the ends of
consecutive epochs (model setup and the final test evaluation excluded), median over the
epochs after the first, in wall and in CPU seconds (the process computes on one thread, so
its CPU seconds hardly depend on what else runs). Linear means the CPU microseconds per
rating stay flat from the smallest size to the largest.

    python -m simulations.bench_baseline_scaling                       # 100k, 500k, 2M ratings
    python -m simulations.bench_baseline_scaling --ratings 100000 --epochs 2   # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from itertools import pairwise

from common.config import parse_run_config
from common.federation import prepare
from common.models import ModelConfig
from common.training import TrainConfig
from simulations import baselines
from simulations.engine import fused_run_config

MEAN_INTERACTIONS = 100
ITEMS = 3706  # MovieLens-1M's catalogue


def epoch_seconds(prepared, model: str, train_config: TrainConfig, dense: bool, seed: int) -> tuple[float, float]:
    """Median wall and CPU seconds of the epochs after the first, from ``run_trained``'s progress lines.

    CPU seconds (one thread) hardly change when other processes share the cores; wall seconds do.
    """
    marks: list[tuple[float, float]] = []
    baselines.run_trained(prepared, ModelConfig(name=model), train_config, seed=seed, lazy_adam=not dense,
                          progress=lambda _: marks.append((time.perf_counter(), time.process_time())))
    wall = statistics.median(b[0] - a[0] for a, b in pairwise(marks))
    cpu = statistics.median(b[1] - a[1] for a, b in pairwise(marks))
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratings", default="100000,500000,2000000", help="comma-separated target rating counts")
    parser.add_argument("--model", default="gmf", choices=baselines.TORCH_MODELS)
    parser.add_argument("--epochs", type=int, default=3, help="per size; the first is not timed (>= 2)")
    parser.add_argument("--optimizers", default="lazy,dense", help="lazy (fedrec baseline --lazy-adam) and/or dense (the default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        sizes = [int(part) for part in args.ratings.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--ratings must be comma-separated integers; got {args.ratings!r}")
    modes = [part.strip() for part in args.optimizers.split(",") if part.strip()]
    if args.epochs < 2 or not sizes or min(sizes) < MEAN_INTERACTIONS * 10 or not set(modes) <= {"lazy", "dense"} or not modes:
        parser.error("--epochs must be >= 2, --ratings at least 1000 each, --optimizers from lazy,dense")
    train_config = TrainConfig(epochs=args.epochs, batch_size=256, learning_rate=1e-3, num_negatives=4)
    print(f"{args.model}, batch 256, 4 negatives, {args.epochs} epochs per size (first untimed), ~{MEAN_INTERACTIONS} "
          f"interactions per user, {ITEMS} items", file=sys.stderr)
    header = "| ratings | users | items | " + " | ".join(
        f"{m} wall s/epoch | {m} CPU s/epoch | {m} CPU us/rating" for m in modes) + " |"
    rows = [header, "|---" * (3 + 3 * len(modes)) + "|"]
    per_rating: dict[str, list[float]] = {m: [] for m in modes}
    for size in sizes:
        overrides = {"synthetic-users": max(1, size // MEAN_INTERACTIONS), "synthetic-items": ITEMS,
                     "synthetic-mean-interactions": MEAN_INTERACTIONS, "seed": args.seed}
        prepared = prepare(parse_run_config(fused_run_config(overrides)))
        ratings = len(prepared.split.train)
        cells = []
        for mode in modes:
            wall, cpu = epoch_seconds(prepared, args.model, train_config, mode == "dense", args.seed)
            per_rating[mode].append(cpu / ratings * 1e6)
            cells.append(f"{wall:.1f} | {cpu:.1f} | {per_rating[mode][-1]:.1f}")
            print(f"  {ratings} ratings, {mode}: {wall:.1f} s/epoch wall, {cpu:.1f} s CPU", file=sys.stderr, flush=True)
        rows.append(f"| {ratings} | {prepared.num_users} | {prepared.num_items} | " + " | ".join(cells) + " |")
    print("\n".join(rows))
    for mode in modes:
        spread = per_rating[mode][-1] / per_rating[mode][0]
        print(f"{mode}: CPU us per rating at the largest size / at the smallest = {spread:.2f} (1.00 = linear)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
