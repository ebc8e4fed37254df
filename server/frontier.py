"""The privacy-utility frontier: (epsilon, HR@10) points read from run directories.

One place knows how a run directory states the epsilon it spent and the HR@10 it reached,
so the frontier benchmark (many runs) and the audit report (one run's own point) read it
the same way. Every epsilon comes from the accountant records the run wrote
(``metrics.jsonl``), with its delta; nothing here computes or types one in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.run_dir import switched_on

USER, RECORD, NONE = "user-level DP", "record-level DP", "no DP"


def mode_of(run_config: dict[str, Any]) -> str:
    """The epsilon a run's frontier point is read in: user-level if on, else record-level, else none."""
    if switched_on(run_config, "user-dp"):
        return USER
    if switched_on(run_config, "record-dp"):
        return RECORD
    return NONE


def trajectory(rounds: list[dict[str, Any]], mode: str) -> list[tuple[float, float]]:
    """(epsilon spent by the round, HR@10 measured after it) for every evaluated round with both.

    ``rounds`` are the report's per-round rows (fit and evaluate merged). Record-level
    epsilon is the maximum over the round's devices: the guarantee the worst-off device has.
    """
    key = {USER: "user_epsilon", RECORD: "record_epsilon_max"}.get(mode)
    if key is None:
        return []
    spent, points = None, []
    for row in rounds:
        if row.get(key) is not None:
            spent = float(row[key]) if spent is None else max(spent, float(row[key]))
        if spent is not None and row.get("hr@10") is not None:
            points.append((spent, float(row["hr@10"])))
    return points


@dataclass
class RunPoint:
    """One finished run's place on the frontier."""

    run_dir: str
    dataset: str
    mode: str
    model: str
    epsilon: float | None
    delta: float | None
    hr10: float
    seed: int
    run_config: dict[str, Any]  # as recorded in config.json


def last_recorded(rows: list[dict[str, Any]], key: str) -> Any:
    """The last value ``key`` has in a run's ``metrics.jsonl`` rows (None if it never appears)."""
    return next((r[key] for r in reversed(rows) if r.get(key) is not None), None)


def read_run(run_dir: str | Path) -> RunPoint:
    """A finished run's final HR@10 and the epsilon (delta) its own records say it spent."""
    path = Path(run_dir)
    summary = json.loads((path / "summary.json").read_text())
    run_config = json.loads((path / "config.json").read_text())["run_config"]
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = summary.get("final_evaluation") or {}
    hr10 = final.get("test_sampled_hr@10")
    if hr10 is None:
        raise ValueError(f"{path}: no final test HR@10 in summary.json (did the run finish with an evaluation?)")
    mode = mode_of(run_config)
    prefix = {USER: "user", RECORD: "record"}.get(mode)
    epsilon = last_recorded(rows, "user_epsilon" if mode == USER else "record_epsilon_max") if prefix else None
    delta = last_recorded(rows, f"{prefix}_delta") if prefix else None
    if prefix and epsilon is None:
        raise ValueError(f"{path}: {mode} is on but metrics.jsonl records no epsilon")
    dataset = str(run_config.get("dataset", "synthetic"))
    if dataset == "synthetic":
        dataset = f"synthetic {run_config.get('synthetic-users')} users"
    if str(run_config.get("partitioning", "user")) == "group":
        dataset += f", kiosks of {run_config.get('users-per-client')}"
    return RunPoint(str(path), dataset, mode, str(run_config.get("model", "gmf")),
                    None if epsilon is None else float(epsilon), None if delta is None else float(delta),
                    float(hr10), int(run_config.get("seed", 0)), run_config)
