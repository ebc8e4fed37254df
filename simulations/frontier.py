"""Benchmark output: the privacy-utility plot, HR@10 against epsilon, from finished runs.

Reads run directories (``fedrec simulate --run-dir``; the privacy-utility benchmark and
the studies in results/ write them) and the JSON of ``fedrec baseline --json``, and writes
one line per (dataset, DP mode, setting), runs that differ only in their seed averaged into
one point; the non-private federated runs, ItemPop and the best centralized yardstick of
each dataset as levels. Every epsilon is the one the run recorded, with its delta.

    python -m simulations.frontier runs/pu/* --baseline movielens-100k=runs/ml100k-baselines.json \\
        --out docs/privacy-utility

writes ``docs/privacy-utility.svg`` (the plot), ``docs/privacy-utility.json`` (the points,
with the run directories behind each) and prints the points as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from server.frontier import NONE, RunPoint, read_run
from server.report_plots import frontier_plot
from simulations.engine import fused_run_config

# Keys that do not change what a run measures: runs differing only in these are seeds of one point.
NOT_A_SETTING = {"seed", "run-dir", "data-path", "checkpoint-every", "report", "evaluate-every", "fraction-evaluate"}


def setting_of(point: RunPoint) -> str:
    """The run-config minus seed, bookkeeping and default values: equal for the seeds of one point.

    Keys at their default are dropped, so a run recorded before a key existed and one
    recorded after, with the key at its default, count as the same setting.
    """
    defaults = fused_run_config({})
    return json.dumps({k: v for k, v in sorted(point.run_config.items())
                       if k not in NOT_A_SETTING and defaults.get(k, object()) != v})


def line_label(point: RunPoint) -> str:
    return f"{point.mode}, {point.model}, {point.dataset}"


def group_points(points: list[RunPoint]) -> list[dict[str, Any]]:
    """One row per setting: mean epsilon and HR@10 over its seeds, the seeds and run directories."""
    groups: dict[str, list[RunPoint]] = defaultdict(list)
    for point in points:
        groups[setting_of(point)].append(point)
    rows = []
    for members in groups.values():
        first = members[0]
        epsilons = [p.epsilon for p in members if p.epsilon is not None]
        rows.append({
            "line": line_label(first), "dataset": first.dataset, "mode": first.mode, "model": first.model,
            "epsilon": statistics.fmean(epsilons) if epsilons else None,
            "epsilon_max": max(epsilons) if epsilons else None,
            "delta": first.delta,
            "hr@10": statistics.fmean(p.hr10 for p in members),
            "hr@10_sem": statistics.stdev(p.hr10 for p in members) / len(members) ** 0.5 if len(members) > 1 else None,
            "seeds": sorted(p.seed for p in members),
            "run_dirs": [p.run_dir for p in members],
        })
    return sorted(rows, key=lambda r: (r["line"], r["epsilon"] or 0.0))


def baseline_levels(specs: list[str]) -> dict[str, float]:
    """``dataset=file.json`` (fedrec baseline --json) -> ItemPop and the best trained centralized row."""
    levels: dict[str, float] = {}
    for spec in specs:
        dataset, _, file = spec.partition("=")
        if not file:
            raise ValueError(f"--baseline {spec!r}: expected DATASET=FILE.json")
        rows = {r["model"]: r["test"]["sampled_hr@10"] for r in json.loads(Path(file).read_text())}
        if "itempop" in rows:
            levels[f"ItemPop ({dataset})"] = rows["itempop"]
        trained = {m: v for m, v in rows.items() if m not in ("itempop", "random")}
        if trained:
            best = max(trained, key=trained.__getitem__)
            levels[f"centralized {best} ({dataset})"] = trained[best]
    return levels


def markdown(rows: list[dict[str, Any]], levels: dict[str, float]) -> str:
    lines = ["| line | epsilon (delta) | HR@10 | +- s.e. | seeds |", "|---|---|---|---|---|"]
    for r in rows:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.2f} ({r['delta']:.0e})"
        sem = "-" if r["hr@10_sem"] is None else f"{r['hr@10_sem']:.4f}"
        lines.append(f"| {r['line']} | {eps} | {r['hr@10']:.4f} | {sem} | {', '.join(map(str, r['seeds']))} |")
    lines += [f"| {label} | - | {value:.4f} | - | - |" for label, value in levels.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="finished run directories")
    parser.add_argument("--baseline", action="append", default=[], metavar="DATASET=FILE.json",
                        help="fedrec baseline --json output for a dataset's ItemPop and centralized levels (repeatable)")
    parser.add_argument("--out", required=True, help="path prefix: writes PREFIX.svg and PREFIX.json")
    args = parser.parse_args(argv)
    try:
        points = [read_run(run) for run in args.runs]
        levels = baseline_levels(args.baseline)
    except (OSError, ValueError, KeyError) as err:
        print(f"python -m simulations.frontier: error: {err}", file=sys.stderr)
        return 2
    rows = group_points(points)
    lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        if r["mode"] == NONE:
            levels[f"no DP, federated {r['model']} ({r['dataset']})"] = r["hr@10"]
        else:
            lines[r["line"]].append((r["epsilon"], r["hr@10"]))
    svg = frontier_plot(dict(lines), levels)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if svg is not None:
        out.with_suffix(".svg").write_text(svg)
    out.with_suffix(".json").write_text(json.dumps({"points": rows, "levels": levels}, indent=2))
    print(markdown(rows, levels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
