"""Benchmark: cost of a federated round with a fixed number of clients per round.

Runs the real app on the Simulation Engine and prints seconds per round, client updates
per second and bytes per client update (up and down), read from the run directory.

    python -m simulations.bench_rounds --dataset movielens-100k \\
        --data-path ../shared/datasets/ml-100k --clients-per-round 100 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common.config import parse_run_config
from common.federation import slicer_cached
from simulations.engine import fused_run_config, run_in_process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--data-path", default="")
    parser.add_argument("--model", default="gmf")
    parser.add_argument("--clients-per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {
            "dataset": args.dataset,
            "data-path": args.data_path,
            "model": args.model,
            "clients-per-round": args.clients_per_round,
            "num-server-rounds": args.rounds,
            "evaluate-every": args.rounds + 1,
            "final-full-evaluation": False,
            "fraction-evaluate": 0.01,
            "run-dir": tmp,
        }
        config = parse_run_config(fused_run_config(overrides))
        num_clients = len(slicer_cached(config))
        run_in_process(overrides, num_clients)
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    fits = [r for r in rows if r["phase"] == "fit"][1:]  # round 1 includes actor start-up
    seconds = statistics.median(r["round_seconds"] for r in fits)
    clients = statistics.median(r["clients_ok"] for r in fits)
    print(f"dataset {args.dataset}, model {args.model}, {num_clients} clients, {args.clients_per_round} per round")
    print(f"seconds per round (median of rounds 2..{args.rounds}): {seconds:.2f}")
    print(f"client updates per second:                 {clients / seconds:.1f}")
    print(f"bytes per client update (upload):           {fits[-1]['upload_bytes_per_client']:.0f}")
    print(f"bytes per client update (download):         {fits[-1]['download_bytes_per_client']:.0f}")
    print(f"client training seconds per update (mean):  {statistics.mean(r['client_train_seconds'] for r in fits):.4f}")


if __name__ == "__main__":
    main()
