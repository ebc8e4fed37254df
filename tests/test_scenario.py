"""Scenario files: the shipped ones load; every bad one fails with file, line and what was expected."""

from pathlib import Path

import pytest

from simulations.cli import main
from simulations.scenario import load_scenario

SCENARIOS = sorted((Path(__file__).resolve().parents[1] / "simulations" / "scenarios").glob("*.toml"))


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.name for p in SCENARIOS])
def test_shipped_scenarios_are_valid(path):
    values = load_scenario(path)
    assert values["dataset"] and values["num-server-rounds"] > 0


@pytest.mark.parametrize(
    "text, message",
    [
        ('model = "gmf"\nlearning-rat = 0.1\n', r"x\.toml:2: unknown key 'learning-rat' \(did you mean 'learning-rate'\?\)"),
        ('local-epochs = "two"\n', r"x\.toml:1: run-config 'local-epochs' must be int"),
        ('\n\nbatch-size = 0\n', r"x\.toml:3: batch-size must be > 0"),
        ('model = "gmf\n', r"x\.toml:1: not valid TOML"),
        ('[fleet]\ndropout = 0.3\n', r"x\.toml:1: table \[fleet\] is not part of a scenario"),
        ('zzz = 1\n', r"x\.toml:1: unknown key 'zzz'; see \[tool\.flwr\.app\.config\]"),
    ],
)
def test_bad_scenarios_exit_2_naming_file_and_line(tmp_path, capsys, text, message):
    import re

    path = tmp_path / "x.toml"
    path.write_text(text)
    assert main(["simulate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err


def test_flags_override_the_scenario(tmp_path, monkeypatch):
    import simulations.engine as engine

    path = tmp_path / "s.toml"
    path.write_text('num-server-rounds = 9\nsynthetic-users = 30\nsynthetic-items = 200\n')
    seen = {}

    def record_and_stop(overrides, num_supernodes, **_):
        seen.update(overrides)
        raise SystemExit(0)  # stop before any training: only the merged run-config matters here

    monkeypatch.setattr(engine, "run_in_process", record_and_stop)
    with pytest.raises(SystemExit):
        main(["simulate", str(path), "--rounds", "2", "-c", "synthetic-users=40", "--run-dir", str(tmp_path / "r")])
    assert seen["num-server-rounds"] == 2 and seen["synthetic-users"] == 40 and seen["synthetic-items"] == 200
