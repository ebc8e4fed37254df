"""Serving recommendations on a device: from a finished run to a user's file, and a lean serving path.

``fedrec export`` turns a run's final global model plus the device's own rows into the file
``fedrec recommend --model-file`` serves; ``fedrec recommend --state-dir`` ranks from the
device's stored rows without importing training code, Opacus or Flower.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from client import store
from client.export import FINAL_CHECKPOINT, device_state_for, final_global_model, user_rows
from client.recommend import recommend_for_client
from common.config import parse_run_config
from common.federation import slicer_cached
from common.models import build_model
from simulations.cli import main as fedrec
from simulations.engine import fused_run_config

REPO = Path(__file__).resolve().parents[1]
SMALL = {"synthetic-users": 12, "synthetic-items": 60, "eval-negatives": 20, "embedding-dim": 8, "report": False,
         "evaluate-every": 1, "synthetic-mean-interactions": 15}
KIOSKS = {**SMALL, "partitioning": "group", "users-per-client": 4}


def listed(output: str) -> list[int]:
    return [int(line.split("\t")[1]) for line in output.splitlines() if line.strip()]


def test_simulate_then_export_then_recommend_serves_the_users_own_list(tmp_path, capsys):
    run_dir, user_file, user = tmp_path / "run", tmp_path / "user-7.pt", 7
    overrides = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}" for k, v in SMALL.items())
    assert fedrec(["simulate", "--rounds", "1", "--run-dir", str(run_dir), "-c", overrides]) == 0
    # The server's run directory holds the shared model only, never a user's rows.
    run_config, shared, server_round = final_global_model(run_dir)
    config = parse_run_config(run_config)
    user_tables = set(build_model(config.model_config, 1, 1, seed=0).local_parameter_names())
    with np.load(run_dir / FINAL_CHECKPOINT) as npz:
        assert not user_tables & set(npz.files)
    capsys.readouterr()

    assert fedrec(["export", str(run_dir), "--user", str(user), "--out", str(user_file)]) == 0
    assert f"wrote {user_file}: user {user}, global model of round {server_round}" in capsys.readouterr().out
    assert fedrec(["recommend", "--model-file", str(user_file), "--k", "5", "--extra-seen", "3"]) == 0
    served = listed(capsys.readouterr().out)

    # What the file serves is the Python path's list for the same device, rows and final model.
    state = device_state_for(config, user, None, None)
    rows = user_rows(config, state, shared, user)
    local = int(np.flatnonzero(state.users == user)[0])
    expected, _ = recommend_for_client(config.model_config, state.client_data(), shared, rows, local, 5, extra_seen=[3])
    trained = state.train_items[state.train_users == user]
    assert served == expected.tolist() and len(served) == 5
    assert not np.isin(served, [*trained, 3]).any()
    # The rows were fitted to the user's own interactions: their items score above the rest.
    scores = torch.jit.load(str(user_file)).scores().numpy()
    assert scores[trained].mean() > np.delete(scores, trained).mean()


def test_a_kiosk_exports_its_trained_rows_and_the_file_serves_what_its_state_dir_serves(tmp_path, capsys):
    config, state_dir, run_dir = device_with_a_global_model(tmp_path)
    user = int(store.load(state_dir).users[1])
    capsys.readouterr()
    assert fedrec(["recommend", "--state-dir", str(state_dir), "--user", str(user), "--k", "6"]) == 0
    from_state = listed(capsys.readouterr().out)
    assert fedrec(["export", str(run_dir), "--state-dir", str(state_dir), "--user", str(user),
                   "--out", str(tmp_path / "u.pt")]) == 0
    capsys.readouterr()
    assert fedrec(["recommend", "--model-file", str(tmp_path / "u.pt"), "--k", "6"]) == 0
    assert listed(capsys.readouterr().out) == from_state and len(from_state) == 6
    assert fedrec(["export", str(run_dir), "--state-dir", str(state_dir), "--user", "4242", "--out",
                   str(tmp_path / "x.pt")]) == 2
    assert capsys.readouterr().err.strip() == f"fedrec: error: {state_dir}: user 4242 is not on this device"
    assert not (tmp_path / "x.pt").exists()


SERVE = """
import json, sys
from simulations.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""
TRAINING_OR_FLOWER = ("opacus", "flwr", "ray", "client.local", "client.private_training", "client.coldstart",
                      "client.client_app", "client.numpy_client", "client.query", "client.secagg_guard",
                      "common.updates")


def test_recommending_from_a_state_dir_imports_neither_training_code_nor_opacus_nor_flower(tmp_path):
    config, state_dir, _ = device_with_a_global_model(tmp_path)
    user = int(store.load(state_dir).users[0])
    done = subprocess.run([sys.executable, "-c", SERVE, "recommend", "--state-dir", str(state_dir), "--user",
                           str(user), "--k", "3"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["code"] == 0 and len(lines[:-1]) == 3  # three ranked items were printed
    imported = [m for m in result["modules"] if any(m == bad or m.startswith(bad + ".") for bad in TRAINING_OR_FLOWER)]
    assert imported == [], imported
    assert "torch" in result["modules"]  # the model itself still runs on torch


def device_with_a_global_model(tmp_path: Path):
    """A kiosk's state-dir after a round (users, interactions, rows) and a run dir with the same final model."""
    run_config = fused_run_config(KIOSKS)
    config = parse_run_config(run_config)
    state = store.DeviceState.from_client_data(slicer_cached(config).client(1), partition_id=1)
    model = build_model(config.model_config, len(state.users), config.synthetic_items, seed=3)
    state = state.with_local_state({k: np.asarray(v) for k, v in model.local_state().items()})
    shared = [np.asarray(a) for a in model.shared_state().values()]
    state_dir = tmp_path / "kiosk"
    state_dir.mkdir()
    store.save(state_dir, state)
    store.save_global_model(state_dir, store.GlobalModel(run_config, shared, 3))
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"run_config": run_config}))
    np.savez(run_dir / FINAL_CHECKPOINT, __round__=np.array(3), **dict(zip(model.shared_state(), shared, strict=True)))
    return config, state_dir, run_dir
