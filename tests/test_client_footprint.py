"""A device runs fedrec's ClientApp without the server-only and simulation-only packages."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SERVER_OR_SIMULATION_ONLY = ("ray", "matplotlib", "jsonschema", "pyarrow", "server", "simulations")
IMPORT_TO_DISTRIBUTION = {"grpc": "grpcio"}

DEVICE = """
import importlib.abc, json, sys
BLOCKED = set(sys.argv[1].split(","))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed on this device")
        return None

sys.meta_path.insert(0, Block())
from pathlib import Path
import torch
from flwr.app import Context, RecordDict
from flwr.common.config import get_fused_config_from_dir
from client.client_app import FedRecClient
from common.config import parse_run_config
from common.models import build_model

overrides = {"synthetic-users": 12, "synthetic-items": 80, "eval-negatives": 20, "embedding-dim": 8}
run_config = get_fused_config_from_dir(Path(sys.argv[2]), overrides)
node = {"partition-id": 3, "num-partitions": 12, "num-threads": 1}
client = FedRecClient(Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=run_config))
config = parse_run_config(run_config)
shared = list(build_model(config.model_config, 0, config.synthetic_items, seed=1).shared_state().values())
upload, weight, metrics = client.fit(shared, {"server-round": 1})
_, users, evaluation = client.evaluate([a + 0.0 for a in shared], {})
# A device under record-level DP (Opacus) as well: what it imports must be listed too.
private_config = get_fused_config_from_dir(Path(sys.argv[2]), {**overrides, "record-dp": True})
private = FedRecClient(Context(run_id=1, node_id=2, node_config=node, state=RecordDict(), run_config=private_config))
_, _, private_metrics = private.fit(shared, {"server-round": 1})
print(json.dumps({
    "threads": torch.get_num_threads(), "weight": weight, "arrays": len(upload), "users": users,
    "loss": metrics["train_loss"], "hr_count": evaluation["test_count"],
    "record_epsilon": private_metrics.get("record_epsilon", 0.0),
    "modules": sorted({m.split(".")[0] for m in sys.modules}),
}))
"""


def test_client_app_trains_and_evaluates_with_server_and_simulation_packages_blocked():
    result = subprocess.run(
        [sys.executable, "-c", DEVICE, ",".join(SERVER_OR_SIMULATION_ONLY), str(ROOT)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    device = json.loads(result.stdout.strip().splitlines()[-1])
    assert device["threads"] == 1  # the node-config thread limit is honoured
    assert device["weight"] > 0 and device["arrays"] > 0 and device["loss"] > 0
    assert device["users"] == 1 and device["hr_count"] == 1
    assert device["record_epsilon"] > 0  # the private device trained with Opacus and spent budget
    assert not set(device["modules"]) & set(SERVER_OR_SIMULATION_ONLY)
    # What the device imported of fedrec's own dependencies is exactly client/requirements.txt.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = {Requirement(spec).name for spec in pyproject["project"]["dependencies"]}
    imported = {IMPORT_TO_DISTRIBUTION.get(m, m) for m in device["modules"]} & declared
    listed = {Requirement(line).name for line in (ROOT / "client" / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert "flwr" in listed and imported <= listed
    assert listed - imported == set(), f"listed but never imported by a device: {listed - imported}"


def test_client_requirements_pin_versions_inside_the_declared_ranges():
    declared = {Requirement(spec).name: Requirement(spec).specifier
                for spec in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    for line in (ROOT / "client" / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pin = Requirement(line)
            version = next(iter(pin.specifier)).version
            assert not pin.extras, f"{line}: a device needs no extras (flwr[simulation] pulls in Ray)"
            assert declared[pin.name].contains(version), f"{line} is outside pyproject's {declared[pin.name]}"


def test_a_bad_thread_limit_is_a_clear_error():
    from flwr.app import Context, RecordDict

    from client.client_app import apply_thread_limit

    with pytest.raises(ValueError, match="num-threads must be an integer >= 1; got 0"):
        apply_thread_limit(Context(run_id=1, node_id=1, node_config={"num-threads": 0}, state=RecordDict(), run_config={}))
