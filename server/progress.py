"""The console's view of a run: one line per round, with an ETA that ignores start-up.

A round's line waits until the round's evaluation (if any) is done, so training figures,
evaluation metrics and the time the whole round took are on one line. The ETA is
estimated from the rounds' own durations, leaving out this process's first round: that
one also pays for starting the simulation (Ray, its workers, every device loading the
data) and made the first estimate about seven times too long.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np

Workflow = Callable[..., None]


def minutes(seconds: float) -> str:
    """``437.2`` -> ``"7 min 17 s"``."""
    whole = int(round(seconds))
    return f"{whole // 60} min {whole % 60:02d} s"


def evaluation_text(summary: Mapping[str, object]) -> str:
    """``test HR@10 0.4350 NDCG@10 0.2632 (50 users)`` from an evaluation summary ('' without one)."""
    count = summary.get("test_count")
    if not count:
        return ""
    hr = float(summary.get("test_sampled_hr@10", float("nan")))  # type: ignore[arg-type]
    ndcg = float(summary.get("test_sampled_ndcg@10", float("nan")))  # type: ignore[arg-type]
    return f"test HR@10 {hr:.4f} NDCG@10 {ndcg:.4f} ({float(count):.0f} users)"  # type: ignore[arg-type]


def progress_line(
    server_round: int,
    num_rounds: int,
    summary: Mapping[str, object],
    seconds: float,
    per_round: float,
    *,
    evaluation: Mapping[str, object] | None = None,
    elapsed: float | None = None,
) -> str:
    """One line per round: where the run is, what came back, how long is left.

    ``per_round`` <= 0 means no estimate yet (only the first round is done).
    """
    parts = [f"fedrec: round {server_round}/{num_rounds}",
             f"{summary.get('clients_ok', 0)}/{summary.get('clients_sampled', 0)} updates"]
    problems = [f"{summary[key]} {key.split('_', 1)[1].replace('_', ' ')}"
                for key in ("clients_failed", "clients_no_reply", "clients_rejected") if summary.get(key)]
    if problems:
        parts[-1] += f" ({', '.join(problems)})"
    if np.isfinite(float(summary.get("train_loss", float("nan")))):  # type: ignore[arg-type]
        parts.append(f"loss {float(summary['train_loss']):.4f}")  # type: ignore[arg-type]
    if "user_epsilon" in summary:
        parts.append(f"user eps {float(summary['user_epsilon']):.3g} (delta {float(summary['user_delta']):.3g})")  # type: ignore[arg-type]
    if "record_epsilon_max" in summary:
        parts.append(f"record eps max {float(summary['record_epsilon_max']):.3g} "  # type: ignore[arg-type]
                     f"(delta {float(summary['record_delta']):.3g})")  # type: ignore[arg-type]
    evaluated = evaluation_text(evaluation or {})
    if evaluated:
        parts.append(evaluated)
    parts.append(f"{seconds:.1f} s" if elapsed is None else f"{seconds:.1f} s, elapsed {minutes(elapsed)}")
    remaining = num_rounds - server_round
    if remaining > 0:
        parts.append(f"ETA {minutes(per_round * remaining)}" if per_round > 0 else "ETA after round 2")
    return " | ".join(parts)


class RoundProgress:
    """Times rounds and builds each round's line once the round (training and evaluation) is over."""

    def __init__(self, num_rounds: int, *, elapsed_before: float = 0.0) -> None:
        self.num_rounds = num_rounds
        self.elapsed_before = elapsed_before
        self.durations: list[float] = []
        self._created = time.perf_counter()
        self._started: float | None = None
        self._pending: tuple[int, dict[str, object], float] | None = None
        self._evaluation: dict[str, object] = {}

    def round_started(self) -> None:
        """A round's first request goes out (a retried attempt keeps the first attempt's start)."""
        if self._started is None:
            self._started = time.perf_counter()

    def trained(self, server_round: int, summary: Mapping[str, object], fit_seconds: float) -> None:
        """The round's training is recorded; its line waits for the evaluation."""
        self._pending = (server_round, dict(summary), fit_seconds)
        self._evaluation = {}

    def evaluated(self, summary: Mapping[str, object]) -> None:
        self._evaluation = dict(summary)

    def seconds_per_round(self) -> float:
        """Mean duration of the finished rounds but this process's first (0: no estimate yet)."""
        steady = self.durations[1:]
        return float(np.mean(steady)) if steady else 0.0

    def round_finished(self) -> str | None:
        """The line of the round that just ended (None if no round was recorded since the last one)."""
        now = time.perf_counter()
        if self._started is not None:
            self.durations.append(now - self._started)
            self._started = None
        if self._pending is None:
            return None
        server_round, summary, fit_seconds = self._pending
        seconds = self.durations[-1] if self.durations else fit_seconds
        line = progress_line(server_round, self.num_rounds, summary, seconds, self.seconds_per_round(),
                             evaluation=self._evaluation, elapsed=self.elapsed_before + now - self._created)
        self._pending, self._evaluation = None, {}
        return line


def reporting(evaluate_workflow: Workflow, finished: Callable[[], None]) -> Workflow:
    """Flower's evaluate stage, then ``finished``: the last thing of every round in the legacy workflow."""

    def run(grid, context) -> None:  # type: ignore[no-untyped-def]
        evaluate_workflow(grid, context)
        finished()

    return run
