"""Benchmark: where a simulated fleet's time goes, against the framework floor and centralized.

In one run, side by side on the same data and the same rounds:

(a) ``noop``: a Flower ClientApp that answers every training request at once with a
    zero update of exactly fedrec's payload (the framework floor: messaging,
    serialization, the server's aggregation);
(b) ``fedrec``: fedrec's own ClientApp (local training included);
(c) ``vectorized``: fedrec's ``backend = "vectorized"`` (:mod:`simulations.vectorized`):
    the same server code, the devices trained together in this process;
(d) ``centralized``: one process training the same model over the same sampled users'
    interactions for the same number of epochs, with the same batch size.

For each it prints seconds per round (median of rounds 2..R: round 1 starts the Ray
actors), client updates per second, MB per client update (up + down) and the peak memory of
the whole process tree (server, Ray workers and all; summed PSS, shared pages counted once),
and each mode's client updates per second over the no-op floor's. Each mode runs in a
process forked for it, so none inherits another's memory.

    python -m simulations.bench_fleet --users 6040 --items 3706 --mean-interactions 165 \\
        --clients-per-round 6040 --rounds 3
    python -m simulations.bench_fleet --users 100000 --items 20000 --mean-interactions 20 \\
        --clients-per-round 1000 --rounds 3 --modes fedrec
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp

from common.config import parse_run_config
from common.threads import THREADS_ENV, available_cores, use_threads
from common.federation import slicer_cached
from common.models import build_model
from common.training import PositiveSet, build_examples, make_optimizer, train_epoch
from simulations.engine import fused_run_config, run_in_process
from simulations.vectorized import run_vectorized

MODES = ("noop", "fedrec", "vectorized", "centralized")


def _tree_memory_bytes(root: int) -> int:
    """Memory of ``root`` and every process below it: the sum of their proportional set sizes (Linux).

    PSS splits each shared page among the processes that map it, so libraries every Ray
    worker loads and the shared object store count once; summed RSS would count them once
    per process (it read 8.8 GB where PSS reads less for the same 100,000-client run).
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(parent, []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += _pss_bytes(pid)
        stack.extend(children.get(pid, []))
    return total


def _pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakMemory:
    """Samples the process tree's memory (summed PSS) while in use, taking at most ``cost_share`` of a core.

    Reading every process's ``smaps_rollup`` is not free: sampling a Ray fleet every 0.5 s
    took 21 s of the main process's time in a two-round run of 2,000 no-op devices per
    round (py-spy), taken from the fleet being measured. The pause after a sample is at least ``interval`` and at
    least the sample's cost divided by ``cost_share``; a round's memory builds up over
    seconds (its messages accumulate), so the peak is still seen.
    """

    def __init__(self, interval: float = 0.5, cost_share: float = 0.05) -> None:
        self.interval, self.cost_share, self.peak = interval, cost_share, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            self.peak = max(self.peak, _tree_memory_bytes(os.getpid()))
            self._stop.wait(max(self.interval, (time.perf_counter() - started) / self.cost_share))

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _tree_memory_bytes(os.getpid()))


class NoopClient(NumPyClient):
    """Answers with a zero update of fedrec's exact payload: the arrays it got plus the touched vector."""

    def __init__(self, num_items: int) -> None:
        self.num_items = num_items

    def fit(self, parameters, config):  # type: ignore[override]
        touched = np.zeros(self.num_items, parameters[0].dtype if parameters else np.float32)
        return [np.zeros_like(p) for p in parameters] + [touched], 1, {}

    def evaluate(self, parameters, config):  # type: ignore[override]
        return 0.0, 0, {}


def noop_app(num_items: int) -> ClientApp:
    return ClientApp(client_fn=lambda context: NoopClient(num_items).to_client())


def _overrides(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    from flwr.common.config import parse_config_args

    return {
        "dataset": "synthetic", "synthetic-users": args.users, "synthetic-items": args.items,
        "synthetic-mean-interactions": args.mean_interactions, "model": args.model,
        "clients-per-round": args.clients_per_round, "num-server-rounds": args.rounds,
        "local-epochs": args.local_epochs, "evaluate-every": args.rounds + 1, "final-full-evaluation": False,
        "fraction-evaluate": 1e-6, "checkpoint-every": args.rounds + 1, "report": False, "popular-items": 0,
        "run-dir": str(run_dir),
        **(parse_config_args([args.run_config]) if args.run_config else {}),
    }


@contextlib.contextmanager
def compute_cores(workers: int) -> Iterator[None]:
    """``FEDREC_THREADS`` set to ``workers`` (0: every core, as Flower's simulation starts one Ray actor per
    core) while the vectorized backend runs, then this process's own setting again."""
    saved = os.environ.get(THREADS_ENV)
    os.environ[THREADS_ENV] = str(workers or available_cores())
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(THREADS_ENV)
        else:
            os.environ[THREADS_ENV] = saved
        use_threads()


def federated(mode: str, args: argparse.Namespace) -> dict[str, float]:
    """One simulated run (fedrec's or the no-op ClientApp, or the vectorized backend); medians of rounds 2..R."""
    with tempfile.TemporaryDirectory() as tmp:
        overrides = _overrides(args, Path(tmp) / "run")
        config = parse_run_config(fused_run_config(overrides))
        num_clients = len(slicer_cached(config))
        app = noop_app(slicer_cached(config).prepared.num_items) if mode == "noop" else None
        with PeakMemory() as memory:
            if mode == "vectorized":
                with compute_cores(args.workers):
                    run_vectorized({**overrides, "backend": "vectorized"})
            else:
                run_in_process(overrides, num_clients, client_app=app)
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    fits = [r for r in rows if r["phase"] == "fit"]
    timed = fits[1:] or fits
    seconds = statistics.median(r["round_seconds"] for r in timed)
    clients = statistics.median(r["clients_ok"] for r in timed)
    model = build_model(config.model_config, 0, config.synthetic_items)
    width = 2 if config.transport_dtype == "float16" else 4  # bytes per value on the wire
    down = sum(v.size for v in model.shared_state().values()) * width
    up = down + width * config.synthetic_items  # plus the touched vector
    return {"seconds": seconds, "updates": clients, "mb": (up + down) / 1e6, "memory_gb": memory.peak / 1e9,
            "clients": num_clients}


def centralized(args: argparse.Namespace) -> dict[str, float]:
    """The same users' interactions, trained in one process for the same epochs and batch size.

    Each "round" takes ``clients-per-round`` users at random (as the federation samples
    them) and trains one model on their rows together; no messaging, no per-client setup.
    """
    with tempfile.TemporaryDirectory() as tmp:
        config = parse_run_config(fused_run_config(_overrides(args, Path(tmp) / "run")))
    slicer = slicer_cached(config)
    train = slicer.prepared.split.train
    model = build_model(config.model_config, slicer.prepared.num_users, slicer.prepared.num_items, seed=config.seed)
    train_config = config.train_config
    optimizer = make_optimizer(model, train_config)
    positives = PositiveSet(train.users, train.items, slicer.prepared.num_items)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    times = []
    with PeakMemory() as memory:
        for _ in range(args.rounds):
            chosen = rng.choice(slicer.prepared.num_users, size=min(args.clients_per_round, slicer.prepared.num_users),
                                replace=False)
            rows = np.isin(train.users, chosen)
            started = time.perf_counter()
            for _ in range(train_config.epochs):
                examples = build_examples(train.users[rows], train.items[rows], train.ratings[rows], positives,
                                          train_config, rng)
                train_epoch(model, examples, optimizer, train_config, generator)
            times.append(time.perf_counter() - started)
    seconds = statistics.median(times[1:] or times)
    return {"seconds": seconds, "updates": float(args.clients_per_round), "mb": 0.0, "memory_gb": memory.peak / 1e9,
            "clients": slicer.prepared.num_users}


def in_own_process(function: Callable[..., dict[str, float]], *args: Any) -> dict[str, float]:
    """``function(*args)`` in a process forked for it, so a mode's peak memory is its own.

    Run one after the other in one process, the second mode carried the first one's
    leftovers (Flower's and Ray's objects, a heap grown for the no-op fleet's messages): the
    vectorized mode read 4.26 to 4.43 GB after the no-op mode and 4.08 to 4.18 GB alone.
    """
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_send_result, args=(send, function, args))
    child.start()
    send.close()
    try:
        ok, value = receive.recv()
    except EOFError:
        ok, value = False, f"the benchmark's process for {function.__name__} ended with exit code {child.exitcode}"
    child.join()
    if not ok:
        raise RuntimeError(value)
    return value


def _send_result(send: Any, function: Callable[..., dict[str, float]], args: tuple) -> None:  # type: ignore[type-arg]
    try:
        send.send((True, function(*args)))
    except BaseException:  # noqa: BLE001 - reported to the benchmark, which raises it
        send.send((False, traceback.format_exc()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=6040)
    parser.add_argument("--items", type=int, default=3706)
    parser.add_argument("--mean-interactions", type=int, default=165)
    parser.add_argument("--model", default="gmf")
    parser.add_argument("--clients-per-round", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--modes", default=",".join(MODES), help=f"any of {', '.join(MODES)}")
    parser.add_argument("-c", "--run-config", default="", help="extra run-config overrides, TOML pairs")
    parser.add_argument("--workers", type=int, default=0,
                        help="FEDREC_THREADS of the vectorized mode: its forked training workers (default 0: every "
                             "core, as Flower's simulation runs one Ray actor per core)")
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (round 1 starts the workers and is not timed)")
    print(f"synthetic {args.users} users x {args.items} items (mean {args.mean_interactions} interactions), "
          f"{args.model}, {args.clients_per_round} clients per round, {args.local_epochs} local epoch(s), "
          f"medians of rounds 2..{args.rounds}; vectorized on {args.workers or available_cores()} core(s), "
          f"Flower's engine on {available_cores()}", flush=True)
    print("| mode | s/round | client updates/s | s per update | MB per update (up+down) | peak memory GB (PSS) |")
    print("|---|---|---|---|---|---|", flush=True)
    results = {}
    for mode in modes:
        print(f"[bench_fleet] running {mode} ...", file=sys.stderr, flush=True)
        r = in_own_process(centralized, args) if mode == "centralized" else in_own_process(federated, mode, args)
        results[mode] = r
        print(f"| {mode} | {r['seconds']:.2f} | {r['updates'] / r['seconds']:.1f} | {r['seconds'] / r['updates']:.4f} "
              f"| {r['mb']:.2f} | {r['memory_gb']:.2f} |", flush=True)
    if "noop" in results and "fedrec" in results:
        ratio = results["fedrec"]["seconds"] / results["noop"]["seconds"]
        print(f"fedrec's time per update is {ratio:.2f}x the no-op floor with the same payload")
    if "noop" in results:
        floor = results["noop"]["updates"] / results["noop"]["seconds"]
        for mode in ("fedrec", "vectorized"):
            if mode in results:
                rate = results[mode]["updates"] / results[mode]["seconds"]
                print(f"{mode}: {rate / floor:.1f}x the no-op floor's client updates per second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
