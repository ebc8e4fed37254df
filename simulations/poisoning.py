"""Item-promotion poisoning: fake users push one target item into everyone's top-10.

In the spirit of PipAttack / FedRecAttack. ``M = ceil(fraction x N)`` fake devices join the
``N`` honest ones (SuperNodes ``N .. N+M-1``). A fake device knows what any device knows:
the global model it is sent and the popular items the server publishes. Each round it
trains fedrec's own local step on a made-up profile, the target item plus the most popular
items, and claims ``claim`` training examples (700, about the heaviest honest MovieLens-100K
user, so the claim alone looks plausible). Two attacks:

- ``boost``: every delta is multiplied by ``boost``, so the target row is pulled towards
  the taste most users share with ``boost`` times the force of an honest step;
- ``align`` (PipAttack's explicit popularity alignment): the other deltas stay as trained,
  unboosted, so the upload looks like an honest one, and only the target's item rows are
  set to move to ``boost`` x the mean of the popular items' rows in the global model.

Row-wise averaging helps both: the target row is averaged only over the devices that
touched it (the fakes, and honest devices that drew it as a sampled negative).

The measure is the exposure ratio ER@10 of the target (share of honest users who never
interacted with it and find it in their top-10; ``exposure-item`` run-config), next to the
honest users' HR@10, per defense (``aggregation`` / ``norm-bound`` / the norm rejection).

    python -m simulations.poisoning --data ../shared/datasets/ml-100k --rounds 25 \\
        --attack align --boost 3 --fractions 0.05,0.01 --defenses none,multi-krum,trimmed-mean --clean none
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp

from client.client_app import MODS, FedRecClient
from client.local import train_round
from common.config import FedRecConfig, parse_run_config
from common.federation import ClientData, EvalData, slicer_cached
from common.models import ModelConfig, build_model
from common.updates import POPULAR_ITEMS_KEY, decode_item_list
from simulations.engine import fused_run_config, run_in_process

# What each defense sets; "none" also switches off the default absurd-norm rejection.
DEFENSES: dict[str, dict[str, Any]] = {
    "none": {"reject-norm-factor": 0.0},
    "norm-reject": {},  # the default: reject-norm-factor 100
    "norm-bound": {"reject-norm-factor": 0.0, "norm-bound": 2.0},  # about twice the median honest norm
    "trimmed-mean": {"reject-norm-factor": 0.0, "aggregation": "trimmed-mean", "trim-fraction": 0.1},
    "median": {"reject-norm-factor": 0.0, "aggregation": "median"},
    "multi-krum": {"reject-norm-factor": 0.0, "aggregation": "multi-krum", "num-malicious": 10},
    "bulyan": {"reject-norm-factor": 0.0, "aggregation": "bulyan", "num-malicious": 10},
}


def fake_profile(
    target: int, popular: np.ndarray, filler: int, num_items: int, rng: np.random.Generator, user_id: int = 0
) -> ClientData:
    """One made-up user: the target plus ``filler`` popular items (random ones before any are published).

    ``user_id`` only seeds its local training (honest users are 0..N-1, so fakes use N and up).
    """
    pool = popular[popular != target][:filler]
    if len(pool) < filler:
        others = np.setdiff1d(np.arange(num_items), np.append(pool, target))
        pool = np.append(pool, rng.choice(others, filler - len(pool), replace=False))
    items = np.append(pool, target).astype(np.int64)
    empty = EvalData(np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, 0), np.int64))
    return ClientData(
        global_users=np.array([user_id]), train_users=np.zeros(len(items), np.int64), train_items=items,
        train_ratings=np.ones(len(items), np.float32), test=empty, validation=empty, num_items=num_items,
    )


ATTACKS = ("align", "boost")


class PromotionAttacker(NumPyClient):
    """A fake device: trains on a fake profile with fedrec's local step, then poisons the upload."""

    def __init__(self, config: FedRecConfig, node: int, target: int, boost: float, filler: int, claim: int,
                 attack: str = "boost") -> None:
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; expected one of {', '.join(ATTACKS)}")
        self.config, self.node, self.target, self.boost, self.filler = config, node, target, boost, filler
        self.claim, self.attack = claim, attack

    def fit(self, parameters, config):  # type: ignore[override]
        server_round = int(config.get("server-round", 0))
        rng = np.random.default_rng([self.config.seed, self.node, server_round])
        blob = config.get(POPULAR_ITEMS_KEY)
        popular = decode_item_list(blob) if blob is not None else np.empty(0, np.int64)
        data = fake_profile(self.target, popular, self.filler, _num_items(self.config), rng, user_id=self.node)
        result = train_round(
            self.config.model_config, self.config.train_config, data, parameters, None,
            seed=self.config.seed, server_round=server_round, rowwise=self.config.row_wise_aggregation,
        )
        if self.attack == "boost":
            upload = [a * self.boost for a in result.upload[:-1]] + [result.upload[-1]]
        else:
            anchors = data.train_items[data.train_items != self.target]
            tables = item_table_indices(self.config.model_config, data.num_items)
            upload = align_target_rows(parameters, result.upload, tables, self.target, anchors, self.boost)
        weight = self.claim if self.claim > 0 else result.num_examples
        return upload, weight, {"train_loss": result.metrics["train_loss"]}

    def evaluate(self, parameters, config):  # type: ignore[override]
        return 0.0, 0, {}  # a fake user has nothing to evaluate and must not count as a user


def item_table_indices(model_config: ModelConfig, num_items: int) -> list[int]:
    """Positions of the item-indexed tables in the shared parameters, by fedrec's naming rule."""
    model = build_model(model_config, 1, num_items)
    item_rows = set(model.item_row_parameter_names())
    return [i for i, name in enumerate(model.shared_parameter_names()) if name in item_rows]


def align_target_rows(
    shared: list[np.ndarray], upload: list[np.ndarray], item_tables: list[int], target: int, anchors: np.ndarray,
    scale: float,
) -> list[np.ndarray]:
    """The upload with each item table's target row set to move to ``scale`` x the anchors' mean row.

    The target is marked touched, so the server's row-wise mean applies the delta to it.
    """
    poisoned = [a.copy() for a in upload]
    if len(anchors):
        for i in item_tables:
            poisoned[i][target] = scale * shared[i][anchors].mean(axis=0) - shared[i][target]
    poisoned[-1][target] = 1.0
    return poisoned


def _num_items(config: FedRecConfig) -> int:
    return slicer_cached(config).prepared.num_items


def attack_app(num_honest: int, target: int, boost: float, filler: int, claim: int = 0,
               attack: str = "boost") -> ClientApp:
    """fedrec's ClientApp for SuperNodes ``0..num_honest-1``; attackers above."""

    def client_fn(context: Context):
        partition = int(context.node_config["partition-id"])
        if partition >= num_honest:
            config = parse_run_config(context.run_config)
            return PromotionAttacker(config, partition, target, boost, filler, claim, attack).to_client()
        context.node_config["num-partitions"] = num_honest  # the honest slicer knows N clients
        return FedRecClient(context).to_client()

    return ClientApp(client_fn=client_fn, mods=MODS)


def unpopular_target(config: FedRecConfig) -> int:
    """The default target: an item with the fewest (but at least one) training interactions."""
    prepared = slicer_cached(config).prepared
    counts = np.bincount(prepared.split.train.items, minlength=prepared.num_items)
    candidates = np.flatnonzero(counts > 0)
    return int(candidates[np.argmin(counts[candidates])])


def run_point(name: str, overrides: dict[str, Any], num_honest: int, num_fake: int, target: int, boost: float,
              filler: int, claim: int, out: Path, attack: str = "boost") -> dict[str, Any]:
    run_dir = out / name
    overrides = {**overrides, "run-dir": str(run_dir), "exposure-item": target}
    started = time.time()
    print(f"[poisoning] {name}: {num_fake} fake devices, {json.dumps(overrides)}", file=sys.stderr, flush=True)
    run_in_process(overrides, num_honest + num_fake, client_app=attack_app(num_honest, target, boost, filler, claim, attack))
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = summary.get("final_evaluation", {})
    return {
        "point": name,
        "fake_devices": num_fake,
        "er@10": final.get("exposure_er@10"),
        "hr@10": final.get("test_sampled_hr@10"),
        "ndcg@10": final.get("test_sampled_ndcg@10"),
        "users": final.get("test_count"),
        "rejected": int(sum(r.get("clients_rejected", 0) for r in rows)),
        "excluded": max((int(r.get("clients_excluded", 0)) for r in rows), default=0),
        "minutes": (time.time() - started) / 60,
    }


def markdown(table: list[dict[str, Any]]) -> str:
    def fmt(value: Any) -> str:
        return "–" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| point | fake devices | ER@10 (target) | HR@10 | NDCG@10 | updates rejected | nodes excluded | min |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['point']} | {r['fake_devices']} | {fmt(r['er@10'])} | {fmt(r['hr@10'])} | "
                     f"{fmt(r['ndcg@10'])} | {r['rejected']} | {r['excluded']} | {r['minutes']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="MovieLens-100K directory (u.data)")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--fractions", default="0.05,0.01", help="fake devices per honest device")
    parser.add_argument("--defenses", default="none,norm-reject,norm-bound,trimmed-mean,median,multi-krum",
                        help=f"any of {', '.join(DEFENSES)}")
    parser.add_argument("--clean", default="none", help="defenses also run without attackers (their cost; run first)")
    parser.add_argument("--target", type=int, default=-1, help="item to promote (default: a least-popular one)")
    parser.add_argument("--attack", choices=ATTACKS, default="align",
                        help="align: target rows to boost x the popular mean; boost: every delta x boost")
    parser.add_argument("--boost", type=float, default=3.0,
                        help="align: multiple of the popular items' mean row; boost: factor on every delta")
    parser.add_argument("--filler", type=int, default=20, help="popular items in a fake profile")
    parser.add_argument("--claim", type=int, default=700, help="training examples a fake device claims (0: its own)")
    parser.add_argument("--seeds", default="42", help="run-config seeds; every point runs once per seed")
    parser.add_argument("--out", default="runs/poisoning")
    parser.add_argument("-c", "--run-config", default="", help="extra run-config overrides, TOML pairs")
    args = parser.parse_args(argv)

    from flwr.common.config import parse_config_args

    common: dict[str, Any] = {
        "dataset": "movielens-100k", "data-path": args.data, "model": "gmf", "num-server-rounds": args.rounds,
        "learning-rate": 0.02, "user-learning-rate": 0.005, "shared-adam-epsilon": 1e-3, "batch-size": 32,
        "local-epochs": 4, "server-learning-rate": 2.0, "clients-per-round": 100, "eval-refit-epochs": 16,
        "evaluate-every": args.rounds, "checkpoint-every": args.rounds, "report": False,
        **(parse_config_args([args.run_config]) if args.run_config else {}),
    }
    config = parse_run_config(fused_run_config(common))
    num_honest = len(slicer_cached(config))
    target = args.target if args.target >= 0 else unpopular_target(config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [d for d in [*args.defenses.split(","), *args.clean.split(",")] if d and d not in DEFENSES]
    if unknown:
        parser.error(f"unknown defense(s) {', '.join(unknown)}; choose from {', '.join(DEFENSES)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    points = [(f"clean-{d}", 0.0, d) for d in args.clean.split(",") if d]
    fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    points += [(f"{f:g}-{d}", f, d) for f in fractions for d in args.defenses.split(",") if d]
    points = [(f"{name}-seed{seed}" if len(seeds) > 1 else name, fraction, defense, seed)
              for name, fraction, defense in points for seed in seeds]
    print(f"[poisoning] target item {target}, {num_honest} honest devices, {args.attack} attack, boost {args.boost}",
          file=sys.stderr)
    table = []
    for name, fraction, defense, seed in points:
        num_fake = math.ceil(fraction * num_honest)
        table.append(run_point(name, {**common, **DEFENSES[defense], "seed": seed}, num_honest, num_fake, target, args.boost,
                               args.filler, args.claim, out, args.attack))
        facts = {"target": target, "attack": args.attack, "boost": args.boost, "claim": args.claim,
                 "filler": args.filler, "rows": table}
        (out / "table.json").write_text(json.dumps(facts, indent=2))
        print(markdown(table), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
