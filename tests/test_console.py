"""What `fedrec simulate` prints: a line per round, a summary, and Flower's logs only with --verbose."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import server.progress as progress
from simulations.console import console

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_eta_leaves_out_the_first_round_which_pays_for_start_up(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    rounds = progress.RoundProgress(10)
    lines = []
    for server_round, seconds in enumerate([50.0, 4.0, 6.0], start=1):  # round 1: Ray and devices start
        rounds.round_started()
        clock.now += seconds
        rounds.trained(server_round, {"clients_ok": 5, "clients_sampled": 5, "train_loss": 0.5}, seconds)
        if server_round == 2:
            rounds.evaluated({"test_count": 40, "test_sampled_hr@10": 0.45, "test_sampled_ndcg@10": 0.25})
        lines.append(rounds.round_finished())
    assert lines[0].endswith("| ETA after round 2")  # not 9 x 50 s
    assert "ETA 0 min 32 s" in lines[1]  # 8 rounds x 4 s
    assert "ETA 0 min 35 s" in lines[2]  # 7 rounds x the mean of 4 s and 6 s
    assert "test HR@10 0.4500 NDCG@10 0.2500 (40 users)" in lines[1] and "HR@10" not in lines[2]
    assert "elapsed 1 min 00 s" in lines[2]
    assert rounds.round_finished() is None  # a round without training records no second line


def _record(pathname: str, level: int, message: str) -> logging.LogRecord:
    return logging.getLogger("flwr").makeRecord("flwr", level, pathname, 1, message, (), None)


@pytest.mark.parametrize("verbose", [False, True])
def test_flower_stage_logs_only_with_verbose_and_every_line_once(verbose, capfd, monkeypatch):
    import server.strategy

    # Flower's handler keeps the stream it was created with, which an earlier test's capture may have replaced.
    for handler in logging.getLogger("flwr").handlers:
        if isinstance(handler, logging.StreamHandler):
            monkeypatch.setattr(handler, "stream", sys.stderr)

    ours = server.strategy.__file__
    flower = logging.__file__  # any file outside fedrec
    with console(verbose):
        for record in (_record(ours, logging.INFO, "fedrec: round 1/2"), _record(flower, logging.INFO, "[ROUND 1]"),
                       _record(flower, logging.DEBUG, "Constructed ActorPool"), _record(flower, logging.ERROR, "boom")):
            logging.getLogger("flwr").handle(record)
    err = capfd.readouterr().err
    assert err.count("fedrec: round 1/2") == 1 and err.count("boom") == 1
    assert ("[ROUND 1]" in err) is verbose


def test_a_default_shaped_run_prints_a_line_per_round_and_a_summary(tmp_path):
    """The default run-config on a smaller fleet: report, evaluation every 5 rounds, full final evaluation."""
    rounds = 6
    command = [sys.executable, "-m", "simulations.cli", "simulate", "--rounds", str(rounds), "--run-dir", str(tmp_path / "run"),
               "-c", "synthetic-users=24 synthetic-items=120 synthetic-mean-interactions=12 eval-negatives=20"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (result.stderr + result.stdout).splitlines()
    assert len(lines) <= rounds + 10 and len(lines) <= 40, "\n".join(lines)
    assert not [line for line, n in Counter(lines).items() if n > 1], "\n".join(lines)
    text = "\n".join(lines)
    for noise in ("Traceback", "History", "DEBUG", "FutureWarning", "[ROUND", "configure_fit"):
        assert noise not in text, text
    progress_lines = [line for line in lines if line.startswith("fedrec: round ")]
    assert [line.split()[2] for line in progress_lines] == [f"{r}/{rounds}" for r in range(1, rounds + 1)]
    assert "ETA after round 2" in progress_lines[0] and "ETA 0 min" in progress_lines[1]
    assert "test HR@10" in progress_lines[4] and "test HR@10" in progress_lines[5]  # evaluate-every 5, and the last
    assert str(tmp_path / "run" / "report.html") in text
    assert any(line.startswith("final (24 users)") for line in lines)
