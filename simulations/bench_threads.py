"""Benchmark: `fedrec baseline` with the libraries' default threads vs fedrec's choice, quiet and busy.

Runs ``fedrec baseline --model gmf`` in fresh processes in four settings: the thread
count torch/OpenMP pick by themselves (``FEDREC_THREADS=0``, no ``OMP_NUM_THREADS``: one
thread per core) and fedrec's choice (``FEDREC_THREADS``, default 1), each on a quiet
machine and beside one CPU-bound process (a pure-Python spin loop, one core busy). The
settings alternate within each repeat, so the ratios compare runs minutes apart on the
same machine. Times are the wall seconds of the whole ``fedrec baseline`` process and of
its GMF row (training + evaluation); HR@10 shows the result does not depend on threads.

Acceptance: with fedrec's choice, busy / quiet <= 1.5. Run it on an otherwise idle
machine (the "quiet" runs must be quiet), e.g.

    python -m simulations.bench_threads --data-path /path/to/ml-100k --epochs 2 --repeats 3
    python -m simulations.bench_threads --dataset synthetic --epochs 1 --repeats 1   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from common.threads import POOL_VARIABLES, THREADS_ENV

ACCEPTABLE_SLOWDOWN = 1.5  # busy / quiet with fedrec's thread choice


def thread_env(threads: int | None) -> dict[str, str]:
    """The environment of one run: ``threads`` for fedrec's choice, None for the libraries' defaults."""
    env = {key: value for key, value in os.environ.items() if key not in (THREADS_ENV, *POOL_VARIABLES)}
    env[THREADS_ENV] = "0" if threads is None else str(threads)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    return env


@contextmanager
def busy_core(active: bool) -> Iterator[None]:
    """One CPU-bound process for the duration of the block (when ``active``)."""
    if not active:
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it reach full speed
        yield
    finally:
        spinner.kill()
        spinner.wait()


def run_baseline(args: argparse.Namespace, threads: int | None) -> dict[str, float]:
    """One ``fedrec baseline --model gmf`` process: wall seconds, the row's seconds, HR@10, torch threads."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "baseline.json"
        command = [sys.executable, "-m", "simulations.cli", "baseline", "--model", "gmf", "--dataset", args.dataset,
                   "--epochs", str(args.epochs), "--json", str(out)]
        if args.data_path:
            command += ["--data-path", args.data_path]
        for overrides in args.run_config:
            command += ["--run-config", overrides]
        started = time.perf_counter()
        done = subprocess.run(command, env=thread_env(threads), capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"bench_threads: `fedrec baseline` failed ({done.returncode}):\n{done.stderr[-2000:]}")
        row = json.loads(out.read_text(encoding="utf-8"))[0]
    return {"wall": wall, "row": float(row["seconds"]), "hr": float(row["test"]["sampled_hr@10"])}


def measure(args: argparse.Namespace) -> dict[tuple[str, bool], list[dict[str, float]]]:
    """Every (setting, busy) cell ``repeats`` times, alternating settings within each repeat."""
    settings = {"default": None, "fedrec": args.threads}
    cells: dict[tuple[str, bool], list[dict[str, float]]] = {(s, b): [] for s in settings for b in (False, True)}
    for repeat in range(args.repeats):
        for busy in (False, True):
            with busy_core(busy):
                for name, threads in settings.items():
                    result = run_baseline(args, threads)
                    cells[(name, busy)].append(result)
                    print(f"  repeat {repeat + 1}: {name:7s} {'busy ' if busy else 'quiet'} wall {result['wall']:6.1f}s "
                          f"row {result['row']:6.1f}s HR@10 {result['hr']:.4f}", file=sys.stderr, flush=True)
    return cells


def median(cell: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in cell)


def report(args: argparse.Namespace, cells: dict[tuple[str, bool], list[dict[str, float]]]) -> str:
    """The table of medians and the ratios the acceptance reads."""
    labels = {"default": f"library default ({THREADS_ENV}=0)", "fedrec": f"{THREADS_ENV}={args.threads}"}
    lines = [
        f"fedrec baseline --model gmf --dataset {args.dataset} --epochs {args.epochs}: median of {args.repeats} "
        f"run(s) per cell, {os.cpu_count()} CPUs, load average at start {args.load}",
        "",
        "| threads | quiet wall s | busy wall s | busy/quiet wall | quiet row s | busy row s | busy/quiet row | HR@10 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, label in labels.items():
        quiet, busy = cells[(name, False)], cells[(name, True)]
        hrs = sorted({round(r["hr"], 4) for r in quiet + busy})
        lines.append(
            f"| {label} | {median(quiet, 'wall'):.1f} | {median(busy, 'wall'):.1f} | "
            f"{median(busy, 'wall') / median(quiet, 'wall'):.2f} | {median(quiet, 'row'):.1f} | {median(busy, 'row'):.1f} | "
            f"{median(busy, 'row') / median(quiet, 'row'):.2f} | {', '.join(f'{h:.4f}' for h in hrs)} |"
        )
    fedrec_ratio = median(cells[("fedrec", True)], "row") / median(cells[("fedrec", False)], "row")
    lines += [
        "",
        f"default / {labels['fedrec']} (row seconds): quiet "
        f"{median(cells[('default', False)], 'row') / median(cells[('fedrec', False)], 'row'):.2f}x, busy "
        f"{median(cells[('default', True)], 'row') / median(cells[('fedrec', True)], 'row'):.2f}x",
        f"acceptance ({labels['fedrec']} busy/quiet <= {ACCEPTABLE_SLOWDOWN}): "
        f"{'holds' if fedrec_ratio <= ACCEPTABLE_SLOWDOWN else 'FAILS'} ({fedrec_ratio:.2f})",
    ]
    return "\n".join(lines)


def _load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="movielens-100k", help="as for fedrec baseline (synthetic for a smoke test)")
    parser.add_argument("--data-path", help="the dataset's directory or file (MovieLens-100K: the ml-100k directory)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="fedrec's setting to compare with the default")
    parser.add_argument("--run-config", "-c", action="append", default=[], help="run-config overrides for fedrec baseline")
    parser.add_argument("--json", help="also write every run's figures here")
    args = parser.parse_args(argv)
    if args.dataset != "synthetic" and not args.data_path:
        parser.error(f"--data-path is required for --dataset {args.dataset}")
    if args.repeats < 1 or args.epochs < 1 or args.threads < 1:
        parser.error("--repeats, --epochs and --threads must be >= 1")
    args.load = _load_average()
    cells = measure(args)
    print(report(args, cells))
    if args.json:
        Path(args.json).write_text(json.dumps({f"{s}-{'busy' if b else 'quiet'}": v for (s, b), v in cells.items()},
                                              indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
