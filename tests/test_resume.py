"""Crash safety: the server's state is saved every round, and a killed run resumes from it."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from common.config import parse_run_config
from common.privacy import UserLevelDP
from common.updates import UpdateLayout, encode_update
from server.run_dir import RunRecorder, load_server_state
from server.strategy import FedRecStrategy
from simulations.engine import app_dir, fused_run_config

GLOBAL = OrderedDict(item_embedding=np.zeros((4, 2), np.float32), output=np.zeros(3, np.float32))
LAYOUT = UpdateLayout.from_state(GLOBAL, ["item_embedding"], num_items=4)


def _strategy(run_dir, **overrides):
    raw = fused_run_config({"num-server-rounds": 5, "min-train-clients": 1, **overrides})
    recorder = RunRecorder(run_dir, raw, checkpoint_every=10)
    return FedRecStrategy(parse_run_config(raw), LAYOUT, list(GLOBAL.values()), recorder), raw


def _fit(strategy, server_round, value, node_id=1):
    after = {"item_embedding": np.full((4, 2), value, np.float32), "output": np.full(3, value, np.float32)}
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(encode_update(LAYOUT, GLOBAL, after, np.array([0, 2]))), 1, {})
    return strategy.aggregate_fit(server_round, [(SimpleNamespace(node_id=node_id), res)], [])


def test_server_state_round_trips_model_server_optimizer_and_exclusions(tmp_path):
    strategy, raw = _strategy(tmp_path / "run", strategy="fedadam")
    _fit(strategy, 1, 1.0)
    _fit(strategy, 2, 0.5)
    strategy.excluded.add(42)
    strategy.rejections[42] = 3
    _fit(strategy, 3, 0.25)  # saves the state after round 3, exclusions included
    state = load_server_state(tmp_path / "run")
    assert state is not None and state.server_round == 3
    resumed, _ = _strategy(tmp_path / "other", strategy="fedadam")
    resumed.restore(state)
    assert resumed.start_round == 3 and resumed.excluded == {42} and resumed.rejections == {42: 3}
    for a, b in zip(resumed.current, strategy.current, strict=True):
        np.testing.assert_array_equal(a, b)
    # The next step continues Adam's moments: identical to the uninterrupted strategy's.
    _fit(strategy, 4, 0.1)
    _fit(resumed, 1, 0.1)  # Flower's workflow counts from 1 again; the strategy adds its offset
    for a, b in zip(resumed.current, strategy.current, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "other" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [4]


def test_resuming_keeps_completed_rounds_and_refuses_another_run_config(tmp_path):
    strategy, raw = _strategy(tmp_path / "run")
    for server_round in (1, 2, 3):
        _fit(strategy, server_round, 1.0)
    recorder = RunRecorder(tmp_path / "run", {**raw, "resume": True}, checkpoint_every=10, resume_after=2)
    assert [r["round"] for r in recorder.rows] == [1, 2]
    kept = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in kept] == [1, 2]
    with pytest.raises(ValueError, match="different run-config.*learning-rate"):
        RunRecorder(tmp_path / "run", {**raw, "learning-rate": 0.5}, checkpoint_every=10, resume_after=2)


def _simulate(run_dir: Path, extra: str = "", **popen) -> subprocess.Popen:
    config = (
        "synthetic-users=60 synthetic-items=200 synthetic-mean-interactions=20 local-epochs=1 "
        "num-server-rounds=8 evaluate-every=100 checkpoint-every=100 report=false "
        "user-dp=true client-sampling=\"poisson\" fraction-train=0.5 user-dp-noise-multiplier=1.0 "
        f"server-learning-rate=5.0 {extra}"
    )
    command = [sys.executable, "-m", "simulations.cli", "simulate", "--run-dir", str(run_dir), "-c", config]
    return subprocess.Popen(command, cwd=app_dir(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)


def _fit_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["phase"] == "fit"]


def test_a_killed_run_resumes_after_its_last_completed_round_and_epsilon_goes_on(tmp_path):
    run_dir = tmp_path / "run"
    victim = _simulate(run_dir, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        state = load_server_state(run_dir) if (run_dir / "server-state.npz").exists() else None
        if state is not None and state.server_round >= 3:
            break
        assert victim.poll() is None, victim.stderr.read().decode()[-2000:]
        time.sleep(0.2)
    else:
        pytest.fail("the run never completed 3 rounds")
    os.killpg(victim.pid, signal.SIGKILL)  # the server and its Ray workers, mid-run
    victim.wait()
    killed_after = load_server_state(run_dir).server_round
    assert 3 <= killed_after < 8, "the kill came after the run finished"
    assert not (run_dir / "summary.json").exists()

    resumed = _simulate(run_dir, "resume=true")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()[-2000:]
    fits = _fit_rows(run_dir)
    assert [r["round"] for r in fits] == list(range(1, 9)), "every round once: none lost, none repeated"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_after_round"] == killed_after and summary["rounds"] == 8
    config = parse_run_config(fused_run_config({"synthetic-users": 60, "user-dp": True}))
    dp = UserLevelDP(noise_multiplier=1.0, clipping_norm=config.user_dp_clipping_norm, num_clients=60,
                     sampling="poisson", sampling_rate=0.5)
    # Accounting continued from the interrupted run: 8 rounds' epsilon, not 8 - killed_after.
    assert fits[-1]["user_epsilon"] == pytest.approx(dp.epsilon(8), rel=1e-9)
    assert fits[killed_after]["user_epsilon"] > fits[killed_after - 1]["user_epsilon"]

    straight_dir = tmp_path / "straight"
    straight = _simulate(straight_dir)
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err.decode()[-2000:]
    a = summary["final_evaluation"]
    b = json.loads((straight_dir / "summary.json").read_text())["final_evaluation"]
    assert a["test_count"] == b["test_count"] == 60
    # DP noise is drawn from OS entropy, so two runs never agree bit for bit; on 60 users
    # one HR@10 standard error is about 0.06.
    assert abs(a["test_sampled_hr@10"] - b["test_sampled_hr@10"]) < 0.2


def test_a_simulation_with_record_level_dp_refuses_to_resume(tmp_path):
    from flwr.app import Context, RecordDict

    from common.config import ConfigError
    from server.run_dir import ServerState, save_server_state
    from server.server_app import main

    class InMemoryGrid:  # what the Simulation Engine hands the ServerApp (matched by type name)
        pass

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_server_state(run_dir, ServerState(2, {}, {}))
    run_config = fused_run_config({"record-dp": True, "resume": True, "run-dir": str(run_dir)})
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with pytest.raises(ConfigError, match="record-level epsilon at zero"):
        main(InMemoryGrid(), context)
