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
    for r in results:
        cells = " | ".join(f"{r.test.get(key, float('nan')):.4f}" for _, key in COLUMNS)
        epoch = f"{r.best_epoch}/{r.epochs}" if r.epochs else "-"
        lines.append(f"| {r.model} | {cells} | {epoch} | {r.seconds:.1f} |")
    return "\n".join(lines)
