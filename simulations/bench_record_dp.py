"""Benchmark: one client's DP-SGD epoch, Opacus hooks vs ghost clipping vs non-private.

Each configuration runs in a fresh subprocess so its peak resident memory
(``getrusage(RUSAGE_SELF).ru_maxrss``) is its own; the table also shows the resident
memory just before training (imports, data, model), so the training peak is the
difference. After a warm-up call on a 1-dimensional copy of the model (lazy imports, the
accountant's RDP curve for this sample rate), a 1-epoch and a 2-epoch call are timed:
seconds per epoch is their difference, and the fixed cost of a call (make_private,
accounting, negatives) is the rest of the 1-epoch call; both are noisy at the
millisecond level on a shared machine.

    python -m simulations.bench_record_dp
    python -m simulations.bench_record_dp --items 1682,20000 --models gmf,neumf --users 5
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

MODES = ("none", "hooks", "ghost")


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _client(users: int, interactions: int, num_items: int, seed: int):
    import numpy as np

    from common.federation import ClientData, EvalData

    rng = np.random.default_rng(seed)
    items = np.concatenate([rng.choice(num_items, size=interactions, replace=False) for _ in range(users)])
    empty = EvalData(np.array([], np.int64), np.array([], np.int64), np.empty((0, 1), np.int64))
    return ClientData(
        global_users=np.arange(users),
        train_users=np.repeat(np.arange(users), interactions),
        train_items=items.astype(np.int64),
        train_ratings=np.ones(len(items), np.float32),
        test=empty,
        validation=empty,
        num_items=num_items,
    )


def worker(args: argparse.Namespace) -> dict:
    """One configuration, in this process: returns its measurements."""
    import numpy as np
    import torch

    from client.private_training import RecordDPConfig, private_local_epochs
    from common.models import ModelConfig, build_model
    from common.training import PositiveSet, TrainConfig, build_examples, make_optimizer, train_epoch

    torch.set_num_threads(args.threads)
    data = _client(args.users, args.interactions, args.num_items, seed=0)
    model = build_model(ModelConfig(name=args.model, embedding_dim=args.dim), args.users, args.num_items, seed=0)
    positives = PositiveSet(data.train_users, data.train_items, data.num_items)
    rng = np.random.default_rng(0)
    before = _rss_mb()

    def call(model, epochs: int, round_seed: int) -> float:
        """One client round of ``epochs`` epochs, as the ClientApp would run it."""
        train = TrainConfig(epochs=epochs, batch_size=args.batch_size, num_negatives=args.negatives, learning_rate=1e-3)
        started = time.perf_counter()
        if args.mode == "none":  # client.local.local_epochs, inlined
            optimizer = make_optimizer(model, train)
            generator = torch.Generator().manual_seed(round_seed)
            for _ in range(epochs):
                examples = build_examples(data.train_users, data.train_items, data.train_ratings, positives, train, rng)
                train_epoch(model, examples, optimizer, train, generator)
        else:
            dp = RecordDPConfig(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=args.mode)
            private_local_epochs(model, data, train, dp, [], [0, round_seed, 0], secret_seed=round_seed)
        return time.perf_counter() - started

    call(build_model(ModelConfig(name=args.model, embedding_dim=1), args.users, args.num_items, seed=0), 1, 1)
    one, two = call(model, 1, 2), call(model, 2, 3)
    seconds = max(two - one, 0.0)
    num_examples = len(data.train_items) * (1 + args.negatives)
    return {
        "model": args.model,
        "items": args.num_items,
        "mode": args.mode,
        "examples": num_examples,
        "steps": -(-num_examples // args.batch_size),
        "seconds": seconds,
        "setup": max(one - seconds, 0.0),
        "rss_before_mb": before,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "finite": bool(all(torch.isfinite(p).all() for p in model.parameters())),
    }


def run_one(args: argparse.Namespace, model: str, num_items: int, mode: str) -> dict:
    command = [
        sys.executable, "-m", "simulations.bench_record_dp", "--worker",
        "--model", model, "--num-items", str(num_items), "--mode", mode,
        "--users", str(args.users), "--interactions", str(args.interactions),
        "--negatives", str(args.negatives), "--dim", str(args.dim),
        "--batch-size", str(args.batch_size), "--threads", str(args.threads),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{model}/{num_items}/{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict]) -> None:
    header = f"{'model':<6} {'items':>6} {'mode':<6} {'examples':>8} {'steps':>5} {'s/epoch':>8} {'x none':>7} {'setup s':>7} " \
             f"{'RSS before':>10} {'peak RSS':>9} {'train MB':>9}"  # fmt: skip
    print(header)
    print("-" * len(header))
    base = {(r["model"], r["items"]): r["seconds"] for r in rows if r["mode"] == "none"}
    for r in rows:
        ratio = r["seconds"] / base[(r["model"], r["items"])] if (r["model"], r["items"]) in base else float("nan")
        print(
            f"{r['model']:<6} {r['items']:>6} {r['mode']:<6} {r['examples']:>8} {r['steps']:>5} {r['seconds']:>8.3f} "
            f"{ratio:>7.1f} {r['setup']:>7.3f} {r['rss_before_mb']:>10.0f} {r['peak_mb']:>9.0f} {r['peak_mb'] - r['rss_before_mb']:>9.0f}"
            + ("" if r["finite"] else "  NON-FINITE")
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", default="1682,20000", help="comma-separated catalogue sizes")
    parser.add_argument("--models", default="gmf,neumf", help="comma-separated model names")
    parser.add_argument("--modes", default=",".join(MODES), help="none (non-private), hooks, ghost")
    parser.add_argument("--users", type=int, default=5, help="users on the client")
    parser.add_argument("--interactions", type=int, default=100, help="training interactions per user")
    parser.add_argument("--negatives", type=int, default=4)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--num-items", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = []
    for model in args.models.split(","):
        for num_items in (int(n) for n in args.items.split(",")):
            for mode in args.modes.split(","):
                rows.append(run_one(args, model, num_items, mode))
                print(f"  done {model} {num_items} {mode}: {rows[-1]['seconds']:.2f}s", file=sys.stderr, flush=True)
    print(
        f"one client: {args.users} users x {args.interactions} interactions x (1 + {args.negatives}) examples, "
        f"dim {args.dim}, batch {args.batch_size}, Adam, {args.threads} torch thread(s)"
    )
    print_table(rows)


if __name__ == "__main__":
    main()
