"""Plain-text tables for the terminal and the README (Markdown-compatible)."""

from __future__ import annotations

from typing import Iterable

from common.federation import PreparedData
from simulations.baselines import BaselineResult

COLUMNS = (
    ("HR@10", "sampled_hr@10"),
    ("NDCG@10", "sampled_ndcg@10"),
    ("MRR", "sampled_mrr"),
    ("AUC", "sampled_auc"),
    ("full HR@10", "full_hr@10"),
    ("full NDCG@10", "full_ndcg@10"),
    ("full MRR", "full_mrr"),
)


def baseline_table(results: Iterable[BaselineResult], prepared: PreparedData) -> str:
    """One row per baseline: test metrics, best epoch and seconds."""
    lines = [
        f"{prepared.num_users} users, {prepared.num_items} items, {len(prepared.split.train)} training interactions, "
        f"{len(prepared.test.users)} test users (leave-one-out, {prepared.test.negatives.shape[1]} sampled negatives)",
        "",
        "| model | " + " | ".join(title for title, _ in COLUMNS) + " | best epoch | seconds |",
        "|---" * (len(COLUMNS) + 3) + "|",
    ]
    results = list(results)
    for r in results:
        cells = " | ".join(f"{r.test.get(key, float('nan')):.4f}" for _, key in COLUMNS)
        epoch = f"{r.best_epoch}/{r.epochs}" if r.epochs else "-"
        lines.append(f"| {r.model} | {cells} | {epoch} | {r.seconds:.1f} |")
    fresh = [r for r in results if r.new_items]
    if fresh:
        n = prepared.new_items
        lines += [
            "",
            f"New items: {len(prepared.new_item_features)} items held out of training entirely; {len(n.users)} users' "
            f"latest interaction with one, against {n.negatives.shape[1]} other new items (ItemPop: the popularity "
            "their content predicts)",
            "",
            "| model | HR@10 | NDCG@10 | MRR |",
            "|---|---|---|---|",
        ]
        lines += [f"| {r.model} | {r.new_items['sampled_hr@10']:.4f} | {r.new_items['sampled_ndcg@10']:.4f} | "
                  f"{r.new_items['sampled_mrr']:.4f} |" for r in fresh]
    explicit = [r for r in results if "rmse" in r.test]
    if explicit:
        lines.append("")
        lines.extend(f"{r.model}: rating RMSE {r.test['rmse']:.4f}  MAE {r.test['mae']:.4f}" for r in explicit)
    return "\n".join(lines)
