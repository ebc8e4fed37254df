"""Benchmark: server-side cost of each aggregation rule for one round of uploads.

Times :func:`server.robust.robust_mean` (Flower's median, trimmed mean, Krum, Multi-Krum and
Bulyan, and the plain weighted mean) on ``--clients`` uploads shaped like fedrec's GMF on
MovieLens-100K (1,682 items x 32 dims plus the touched vector), sparse as real ones are
(each device touches about a third of the item rows). Accuracy on clean data is measured by
``simulations/poisoning.py`` (its ``clean-*`` points); this is the time it adds per round.

    python -m simulations.bench_robust --clients 100 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from common.config import fused_run_config, parse_run_config
from server.robust import robust_mean


def fake_uploads(clients: int, items: int, dim: int, rng: np.random.Generator) -> list[list[np.ndarray]]:
    uploads = []
    for _ in range(clients):
        touched = (rng.random(items) < 0.33).astype(np.float32)
        delta = rng.normal(0, 0.05, (items, dim)).astype(np.float32) * touched[:, None]
        uploads.append([delta, rng.normal(0, 0.05, dim).astype(np.float32), touched])
    return uploads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--items", type=int, default=1682)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--num-malicious", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    uploads = fake_uploads(args.clients, args.items, args.dim, np.random.default_rng(0))
    weights = [100] * args.clients
    print(f"{args.clients} uploads of {args.items} x {args.dim} (+ touched), num-malicious {args.num_malicious}")
    print("| aggregation | seconds per round (median of repeats) |\n|---|---|")
    for rule in ("mean", "median", "trimmed-mean", "krum", "multi-krum", "bulyan"):
        config = parse_run_config(fused_run_config({"aggregation": rule, "num-malicious": args.num_malicious}))
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            robust_mean(config, [list(u) for u in uploads], weights)
            times.append(time.perf_counter() - started)
        print(f"| {rule} | {statistics.median(times):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
