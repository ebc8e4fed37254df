"""Benchmark: cost of a federated round with a fixed number of clients per round.

Runs the real app on the Simulation Engine and prints seconds per round, client updates
per second and bytes per client update, read from the run directory. With
``--compare-secagg`` it runs each clients-per-round setting twice, without and with
SecAgg+, and prints the overhead; bytes are then counted on the messages themselves
(every array and config value a training request or reply carries, all SecAgg+ stages
included), since under SecAgg+ a client sends much more than its update.

    python -m simulations.bench_rounds --dataset movielens-100k \\
        --data-path ../shared/datasets/ml-100k --clients-per-round 100 --rounds 5
    python -m simulations.bench_rounds --dataset movielens-100k \\
        --data-path ../shared/datasets/ml-100k --compare-secagg 10,50,100 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from flwr.app import RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp import ClientApp

from client.client_app import MODS, client_fn
from common.config import parse_run_config
from common.federation import slicer_cached
from simulations.engine import fused_run_config, run_in_process


def _value_bytes(value: Any) -> int:
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    return 8


def content_bytes(content: RecordDict) -> int:
    """Payload bytes of a message: array buffers plus config values (no framing)."""
    total = sum(len(array.data) for record in content.array_records.values() for array in record.values())
    total += sum(_value_bytes(v) for record in content.config_records.values() for v in record.values())
    total += sum(_value_bytes(v) for record in content.metric_records.values() for v in record.values())
    return total


def byte_counter(path: Path):
    """A mod (outermost) that appends the bytes of each training request and reply to ``path``."""

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type == MessageType.TRAIN:
            down = content_bytes(msg.content)
            up = content_bytes(reply.content) if reply.has_content() else 0
            with open(path, "a", encoding="utf-8") as out:
                out.write(json.dumps({"down": down, "up": up}) + "\n")
        return reply

    return mod


def run_rounds(base: dict[str, Any], clients_per_round: int, rounds: int, secure: bool) -> dict[str, float]:
    """One simulated run; per-round medians (round 1 left out: it starts the actors)."""
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {
            **base,
            "clients-per-round": clients_per_round,
            "num-server-rounds": rounds,
            "evaluate-every": rounds + 1,
            "final-full-evaluation": False,
            "fraction-evaluate": 0.01,
            "secure-aggregation": secure,
            "run-dir": str(Path(tmp) / "run"),
        }
        config = parse_run_config(fused_run_config(overrides))
        num_clients = len(slicer_cached(config))
        counts = Path(tmp) / "bytes.jsonl"
        app = ClientApp(client_fn=client_fn, mods=[byte_counter(counts), *MODS])
        run_in_process(overrides, num_clients, client_app=app)
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        messages = [json.loads(line) for line in counts.read_text().splitlines()]
    fits = [r for r in rows if r["phase"] == "fit"][1:]
    client_updates = rounds * clients_per_round
    return {
        "num_clients": num_clients,
        "seconds": statistics.median(r["round_seconds"] for r in fits),
        "clients": statistics.median(r["clients_ok"] for r in fits),
        "upload_payload": fits[-1]["upload_bytes_per_client"],
        "download_payload": fits[-1]["download_bytes_per_client"],
        "train_seconds": statistics.mean(r["client_train_seconds"] for r in fits),
        "wire_up": sum(m["up"] for m in messages) / client_updates,
        "wire_down": sum(m["down"] for m in messages) / client_updates,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--data-path", default="")
    parser.add_argument("--model", default="gmf")
    parser.add_argument("--clients-per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compare-secagg", default="", help="comma-separated clients-per-round values, e.g. 10,50,100")
    args = parser.parse_args()
    base = {"dataset": args.dataset, "data-path": args.data_path, "model": args.model}
    if not args.compare_secagg:
        r = run_rounds(base, args.clients_per_round, args.rounds, secure=False)
        print(f"dataset {args.dataset}, model {args.model}, {r['num_clients']} clients, {args.clients_per_round} per round")
        print(f"seconds per round (median of rounds 2..{args.rounds}): {r['seconds']:.2f}")
        print(f"client updates per second:                 {r['clients'] / r['seconds']:.1f}")
        print(f"bytes per client update (upload):           {r['upload_payload']:.0f}")
        print(f"bytes per client update (download):         {r['download_payload']:.0f}")
        print(f"client training seconds per update (mean):  {r['train_seconds']:.4f}")
        return
    print(f"dataset {args.dataset}, model {args.model}; medians of rounds 2..{args.rounds}; bytes per client per round")
    print("| clients/round | s/round plain | s/round SecAgg+ | x | up plain | up SecAgg+ | down plain | down SecAgg+ |")
    print("|---|---|---|---|---|---|---|---|")
    for count in (int(c) for c in args.compare_secagg.split(",")):
        plain = run_rounds(base, count, args.rounds, secure=False)
        secure = run_rounds(base, count, args.rounds, secure=True)
        print(
            f"| {count} | {plain['seconds']:.2f} | {secure['seconds']:.2f} | {secure['seconds'] / plain['seconds']:.1f} "
            f"| {plain['wire_up']:,.0f} | {secure['wire_up']:,.0f} | {plain['wire_down']:,.0f} | {secure['wire_down']:,.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
