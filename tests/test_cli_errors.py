"""Bad input to the fedrec command: one line naming the problem, exit code 2, nothing left on disk.

Every case goes through the real command line (``simulations.cli.main``, or a fresh
interpreter where an install has to be faked); none may start a simulation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import simulations.engine as engine
from server.run_dir import ServerState, config_hash, save_server_state
from simulations.cli import main, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
SMALL = "synthetic-users=30 synthetic-items=200 eval-negatives=20"


@pytest.fixture(autouse=True)
def in_empty_dir(tmp_path, monkeypatch):
    """Each case runs in an empty directory (a default run-dir would land here) and never trains."""
    monkeypatch.chdir(tmp_path)

    def must_not_run(*_, **__):
        raise AssertionError("the simulation started despite bad input")

    monkeypatch.setattr(engine, "run_in_process", must_not_run)


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its content (to prove nothing was written or changed)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def fails_in_one_line(argv: list[str], capsys, needle: str) -> str:
    """Run the command; assert exit code 2 and a single error line (no traceback) containing ``needle``."""
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("fedrec") and "error:" in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert needle in lines[0], lines[0]
    return lines[0]


# --- -c values ----------------------------------------------------------------------------
def test_an_unquoted_word_for_a_number_key_says_what_the_key_takes(tmp_path, capsys):
    line = fails_in_one_line(["baseline", "--model", "itempop", "-c", "learning-rate=abc"], capsys, "learning-rate")
    assert "takes a number" in line and "'abc'" in line
    assert tree(tmp_path) == {}


def test_a_pair_without_a_value_or_with_a_stray_quote_is_named(capsys):
    fails_in_one_line(["baseline", "--model", "itempop", "-c", f"{SMALL} learning-rate"], capsys, "is not KEY=VALUE")
    fails_in_one_line(["baseline", "--model", "itempop", "-c", 'model="gmf'], capsys, "unbalanced quotes")


def test_string_keys_take_their_value_unquoted(tmp_path, capsys):
    parsed = parse_overrides(["csv-rating-col=rating data-path=/data/r.csv mlp-layers=64,32 learning-rate=0.1",
                              "dataset='csv' model=\"mlp\""])
    assert parsed == {"csv-rating-col": "rating", "data-path": "/data/r.csv", "mlp-layers": "64,32",
                      "learning-rate": 0.1, "dataset": "csv", "model": "mlp"}
    path = tmp_path / "r.csv"
    path.write_text("user,item,rating\n" + "".join(f"{u},{i},{1 + (u + i) % 5}\n" for u in range(30) for i in range(u % 7, 40, 3)))
    code = main(["baseline", "--model", "itempop", "--dataset", "csv", "--data-path", str(path),
                 "-c", "csv-rating-col=rating eval-negatives=5"])
    assert code == 0, capsys.readouterr().err


# --- fedrec baseline flags ------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--epochs", "0"], "--epochs"), (["--epochs", "-3"], "--epochs"),
        (["--lr", "0"], "--lr"), (["--lr", "-0.01"], "--lr"),
        (["--batch-size", "0"], "--batch-size"), (["--batch-size", "-8"], "--batch-size"),
        (["--negatives", "0"], "--negatives"), (["--negatives", "-1"], "--negatives"),
        (["--epochs", "many"], "invalid int value"),
    ],
)
def test_baseline_training_flags_out_of_range(flags, needle, tmp_path, capsys):
    fails_in_one_line(["baseline", "--model", "gmf", *flags, "--json", "out.json", "-c", SMALL], capsys, needle)
    assert tree(tmp_path) == {}


# --- resuming -------------------------------------------------------------------------------
def _interrupted_run(run_dir: Path, run_config_overrides: dict) -> None:
    """A run directory as a killed run leaves it: its config.json and a server state after round 1."""
    run_dir.mkdir()
    run_config = engine.fused_run_config(run_config_overrides)
    (run_dir / "config.json").write_text(json.dumps({"run_config": run_config, "config_sha256": config_hash(run_config)}))
    save_server_state(run_dir, ServerState(1, {"shared/x": np.zeros(3, np.float32)}, {}))


def _simulate(run_dir, *extra: str) -> list[str]:
    return ["simulate", "--resume", "--rounds", "3", "--run-dir", str(run_dir), "-c", SMALL, *extra]


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated"], ids=["empty", "truncated"])
def test_an_unreadable_server_state_is_named_before_anything_starts(content, tmp_path, capsys):
    run_dir = tmp_path / "run"
    _interrupted_run(run_dir, {**parse_overrides([SMALL]), "num-server-rounds": 3, "run-dir": str(run_dir)})
    (run_dir / "server-state.npz").write_bytes(content)
    before = tree(tmp_path)
    fails_in_one_line(_simulate(run_dir), capsys, str(run_dir / "server-state.npz"))
    assert tree(tmp_path) == before


def test_a_resume_with_other_settings_is_refused_naming_the_change(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _interrupted_run(run_dir, {**parse_overrides([SMALL]), "num-server-rounds": 3, "run-dir": str(run_dir)})
    before = tree(tmp_path)
    line = fails_in_one_line(_simulate(run_dir, "-c", "learning-rate=0.5"), capsys, "cannot resume")
    assert line.split("changed: ")[1].split(")")[0] == "learning-rate"
    assert tree(tmp_path) == before


def test_a_resume_with_record_dp_in_simulation_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    settings = {**parse_overrides([SMALL]), "num-server-rounds": 3, "run-dir": str(run_dir), "record-dp": True}
    _interrupted_run(run_dir, settings)
    before = tree(tmp_path)
    fails_in_one_line(_simulate(run_dir, "-c", "record-dp=true"), capsys, "record-dp")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("how", ["absolute", "moved"])
def test_resume_accepts_the_run_dir_written_absolute_or_moved(how, tmp_path, monkeypatch):
    started = tmp_path / "started"
    _interrupted_run(started, {**parse_overrides([SMALL]), "num-server-rounds": 3, "run-dir": "started"})
    run_dir = started.resolve()
    if how == "moved":
        run_dir = started.rename(tmp_path / "elsewhere")
    seen = {}

    def reached(overrides, num_supernodes, **_):
        seen.update(overrides)
        raise SystemExit(0)  # the resume was accepted: the simulation would start now

    monkeypatch.setattr(engine, "run_in_process", reached)
    with pytest.raises(SystemExit):
        main(_simulate(run_dir))
    assert seen["resume"] is True and seen["run-dir"] == str(run_dir)


# --- fedrec recommend -----------------------------------------------------------------------
def test_recommend_on_a_file_that_is_no_torchscript_model(tmp_path, capsys):
    (tmp_path / "user-17.pt").write_bytes(b"not a model")
    fails_in_one_line(["recommend", "--model-file", str(tmp_path / "user-17.pt")], capsys, "not an exported TorchScript model")


def test_recommend_with_a_mistyped_state_dir_creates_nothing(tmp_path, capsys):
    fails_in_one_line(["recommend", "--state-dir", str(tmp_path / "stat-dir"), "--user", "3"], capsys, "stat-dir")
    assert not (tmp_path / "stat-dir").exists() and tree(tmp_path) == {}


def test_recommend_for_a_negative_user_id(tmp_path, capsys):
    fails_in_one_line(["recommend", "--state-dir", str(tmp_path), "--user", "-3"], capsys, "--user")


# --- data ----------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["baseline", "simulate"])
def test_a_data_path_without_a_dataset_is_not_trained_on_synthetic_data(command, tmp_path, capsys):
    (tmp_path / "ratings.csv").write_text("user,item\n1,2\n")
    fails_in_one_line([command, "--data-path", "ratings.csv", "-c", SMALL], capsys, "dataset is 'synthetic'")
    assert tree(tmp_path) == {"ratings.csv": b"user,item\n1,2\n"}


def test_more_clients_per_round_than_the_data_makes(tmp_path, capsys):
    line = fails_in_one_line(["simulate", "-c", f"{SMALL} clients-per-round=31", "--run-dir", "run"], capsys,
                             "clients-per-round = 31")
    assert "only 30 clients" in line and tree(tmp_path) == {}


def test_negative_user_ids_in_a_csv_name_the_line(tmp_path, capsys):
    (tmp_path / "r.csv").write_text("user,item\n1,2\n1,3\n-4,5\n")
    fails_in_one_line(["simulate", "--dataset", "csv", "--data-path", "r.csv", "--run-dir", "run"], capsys,
                      "r.csv:4: user id '-4' is negative")
    assert sorted(tree(tmp_path)) == ["r.csv"]


def _sorted_by_item(path: Path, users: int = 40, items: int = 60) -> None:
    """Implicit plays without time, sorted by item id, as Last.fm HetRec's user_artists.dat is."""
    rng = np.random.default_rng(0)
    rows = sorted((int(i), u) for u in range(users) for i in rng.choice(items, 12, replace=False))
    path.write_text("user,item\n" + "".join(f"{u},{i}\n" for i, u in rows))


def test_data_without_timestamps_gets_a_random_held_out_item_and_says_so(tmp_path, capsys):
    from common.config import parse_run_config
    from common.federation import prepare

    _sorted_by_item(tmp_path / "plays.csv")
    code = main(["baseline", "--model", "itempop", "--dataset", "csv", "--data-path", "plays.csv", "-c", "eval-negatives=20"])
    assert code == 0
    assert "a random interaction per user (seed 42)" in capsys.readouterr().err

    def held_out_is_highest(split: str) -> float:
        raw = {"dataset": "csv", "data-path": "plays.csv", "eval-negatives": 20, "split": split}
        prepared = prepare(parse_run_config(engine.fused_run_config(raw)))
        train = prepared.split.train
        highest = [train.items[train.users == u].max() < i for u, i in zip(prepared.test.users, prepared.test.items, strict=True)]
        return float(np.mean(highest))

    assert held_out_is_highest("time") == 1.0  # file order: every user's highest item id is held out
    assert held_out_is_highest("auto") < 0.3  # random: about 1 in 12
    assert held_out_is_highest("auto") == held_out_is_highest("random")  # seeded: the same split each time


# --- the client-only install -----------------------------------------------------------------
CLIENT_ONLY = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"ray", "matplotlib", "jsonschema", "pyarrow"}:
            raise ImportError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, Block())
from simulations.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    "argv, needle",
    [(["simulate", "--run-dir", "run"], "'flwr[simulation]'"), (["report", "run"], "'matplotlib' 'jsonschema'")],
)
def test_server_commands_on_the_client_only_install_name_what_to_install(argv, needle, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", CLIENT_ONLY, *argv], capture_output=True, text=True, cwd=tmp_path,
                            env=env, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "client-only install" in lines[0] and needle in lines[0] and "Traceback" not in result.stderr
    assert tree(tmp_path) == {}
