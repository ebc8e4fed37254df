"""Every fedrec process picks its thread count on purpose (common/threads.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from common.threads import POOL_VARIABLES, THREADS_ENV, chosen_threads, use_threads

ROOT = Path(__file__).resolve().parents[1]


def test_the_choice_is_fedrec_threads_else_omp_else_one():
    assert chosen_threads({}) == 1
    assert chosen_threads({"OMP_NUM_THREADS": "3"}) == 3
    assert chosen_threads({THREADS_ENV: "2", "OMP_NUM_THREADS": "3"}) == 2
    assert chosen_threads({THREADS_ENV: "0", "OMP_NUM_THREADS": "3"}) is None  # the libraries' own defaults


@pytest.mark.parametrize("value", ["two", "-1", "1.5"])
def test_a_malformed_setting_names_the_variable(value):
    with pytest.raises(ValueError, match=f"{THREADS_ENV}={value!r}: expected an integer >= 0"):
        chosen_threads({THREADS_ENV: value})


def test_an_explicit_choice_overrides_the_pools_and_a_default_keeps_what_is_set():
    env = {THREADS_ENV: "2", "OMP_NUM_THREADS": "4"}
    before = torch.get_num_threads()
    try:
        assert use_threads(env) == 2
        assert [env[name] for name in POOL_VARIABLES] == ["2", "2", "2"]
        assert torch.get_num_threads() == 2  # torch is loaded here: set directly
        env = {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "3"}
        assert use_threads(env) == 4
        assert env == {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "3", "OPENBLAS_NUM_THREADS": "4"}
    finally:
        torch.set_num_threads(before)


def test_a_fedrec_process_uses_one_thread_unless_told_otherwise():
    """Importing fedrec's entry package before torch: torch starts with the chosen count, not one per core."""
    env = {k: v for k, v in os.environ.items() if k not in (THREADS_ENV, *POOL_VARIABLES)}
    env["PYTHONPATH"] = str(ROOT)
    probe = "import simulations, torch; print(torch.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def test_the_cli_reports_a_bad_setting_in_one_line(monkeypatch, capsys, tmp_path):
    from simulations.cli import main

    monkeypatch.setenv(THREADS_ENV, "many")
    assert main(["keys", "--out", str(tmp_path / "keys"), "--count", "1"]) == 2
    assert capsys.readouterr().err == f"fedrec: error: environment variable {THREADS_ENV}='many': expected an integer >= 0\n"
    assert not (tmp_path / "keys").exists()  # stopped before the command ran


def test_a_clientapp_without_num_threads_takes_the_process_choice(monkeypatch):
    from client.client_app import apply_thread_limit

    before = torch.get_num_threads()
    for name in POOL_VARIABLES:  # use_threads rewrites them: restored after the test
        monkeypatch.setenv(name, os.environ.get(name, "1"))
    monkeypatch.setenv(THREADS_ENV, "2")
    try:
        apply_thread_limit(Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
