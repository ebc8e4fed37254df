"""Privacy-utility benchmark: federated GMF at several user-level epsilons, record-level noise and no DP.

Every point is a real ``fedrec`` run on Flower's Simulation Engine (the same code as
``fedrec simulate``); the noise multiplier for a user-level target is calibrated with
dp-accounting for the run's own Poisson sampling rate and rounds, and the epsilon
printed is the one the run itself recorded (``metrics.jsonl``), not the target.

    python -m simulations.privacy_utility --data ../shared/datasets/ml-100k \\
        --rounds 20 --clients-per-round 300 --epsilons 1,3,8 --record-noise 0.6,1.0

Results go to ``<out>/<point>/`` (one run directory each) and ``<out>/table.json``; the
table is printed as Markdown. Runs are sequential; each prints Flower's progress.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from common.config import parse_run_config
from common.federation import slicer_cached
from common.privacy import calibrate_noise
from server.frontier import last_recorded
from simulations.engine import fused_run_config, run_in_process


def run_point(name: str, overrides: dict[str, Any], out: Path) -> dict[str, Any]:
    """One federated run; returns its final evaluation and the privacy it recorded."""
    run_dir = out / name
    overrides = {**overrides, "run-dir": str(run_dir)}
    config = parse_run_config(fused_run_config(overrides))
    started = time.time()
    print(f"[privacy-utility] {name}: {json.dumps({k: v for k, v in overrides.items() if k != 'run-dir'})}",
          file=sys.stderr, flush=True)
    run_in_process(overrides, len(slicer_cached(config)))
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = summary.get("final_evaluation", {})
    return {
        "point": name,
        "rounds": summary.get("rounds"),
        "user_epsilon": last_recorded(rows, "user_epsilon"),
        "user_delta": last_recorded(rows, "user_delta"),
        "user_noise_multiplier": overrides.get("user-dp-noise-multiplier") if overrides.get("user-dp") else None,
        "record_epsilon_max": last_recorded(rows, "record_epsilon_max"),
        "record_delta": last_recorded(rows, "record_delta"),
        "record_noise_multiplier": overrides.get("record-dp-noise-multiplier") if overrides.get("record-dp") else None,
        "hr@10": final.get("test_sampled_hr@10"),
        "ndcg@10": final.get("test_sampled_ndcg@10"),
        "full_hr@10": final.get("test_full_hr@10"),
        "full_ndcg@10": final.get("test_full_ndcg@10"),
        "users": final.get("test_count"),
        "minutes": (time.time() - started) / 60,
    }


def markdown(table: list[dict[str, Any]]) -> str:
    def fmt(value: Any, digits: int = 4) -> str:
        return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = [
        "| point | user-level ε (δ) | record-level ε max (δ) | HR@10 | NDCG@10 | full HR@10 | full NDCG@10 | min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        user = "–" if r["user_epsilon"] is None else f"{r['user_epsilon']:.2f} ({r['user_delta']:.2g}), z={r['user_noise_multiplier']:.3f}"
        record = "–" if r["record_epsilon_max"] is None else \
            f"{r['record_epsilon_max']:.2f} ({r['record_delta']:.2g}), z={r['record_noise_multiplier']}"
        lines.append(
            f"| {r['point']} | {user} | {record} | {fmt(r['hr@10'])} | {fmt(r['ndcg@10'])} | "
            f"{fmt(r['full_hr@10'])} | {fmt(r['full_ndcg@10'])} | {r['minutes']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="MovieLens-100K directory (u.data)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients-per-round", type=int, default=300, help="expected clients per round (Poisson)")
    parser.add_argument("--epsilons", default="1,3,8", help="user-level targets; empty for none")
    parser.add_argument("--record-noise", default="", help="Opacus noise multipliers for record-level points")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run without DP")
    parser.add_argument("--clip", type=float, default=1.0, help="user-dp-clipping-norm")
    parser.add_argument("--server-lr", type=float, default=30.0, help="server learning rate under user-level DP")
    parser.add_argument("--out", default="runs/privacy-utility")
    parser.add_argument("-c", "--run-config", default="", help="extra run-config overrides for every point, TOML pairs")
    args = parser.parse_args(argv)

    from flwr.common.config import parse_config_args

    common: dict[str, Any] = {
        "dataset": "movielens-100k", "data-path": args.data, "model": "gmf",
        "learning-rate": 0.02, "batch-size": 32, "local-epochs": 2,
        "evaluate-every": args.rounds, "fraction-evaluate": 0.25, "checkpoint-every": args.rounds,
        "num-server-rounds": args.rounds, "clients-per-round": args.clients_per_round,
        **(parse_config_args([args.run_config]) if args.run_config else {}),
    }
    num_clients = len(slicer_cached(parse_run_config(fused_run_config(common))))
    rate = args.clients_per_round / num_clients
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    points: list[tuple[str, dict[str, Any]]] = []
    if not args.no_baseline:
        points.append(("no DP", {**common, "server-learning-rate": 2.0}))
    for target in [float(t) for t in args.epsilons.split(",") if t.strip()]:
        z = calibrate_noise(target, args.rounds, clipping_norm=args.clip, num_clients=num_clients,
                            sampling="poisson", sampling_rate=rate)
        points.append((f"user-level ε≈{target:g}", {
            **common, "user-dp": True, "client-sampling": "poisson", "user-dp-noise-multiplier": z,
            "user-dp-clipping-norm": args.clip, "server-learning-rate": args.server_lr,
        }))
    for z in [float(t) for t in args.record_noise.split(",") if t.strip()]:
        points.append((f"record-level z={z:g}", {
            **common, "record-dp": True, "record-dp-noise-multiplier": z, "server-learning-rate": 2.0,
        }))
    table = []
    for name, overrides in points:
        table.append(run_point(name.replace("≈", "~").replace("ε", "eps").replace(" ", "-"), overrides, out))
        (out / "table.json").write_text(json.dumps(table, indent=2))
        print(markdown(table), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
