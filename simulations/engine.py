"""Run the fedrec Flower app in-process on the Simulation Engine.

``flwr run .`` submits the app to a (local) SuperLink; researchers and tests also want
the same run from Python with overrides and without a background SuperLink. This calls
the entry Flower's own simulation process uses (``flwr.simulation.run_simulation``'s
internal ``_run_simulation`` in flwr 1.41, pinned in pyproject) with the app directory,
so every SuperNode and the ServerApp see the same fused run-config as under ``flwr run``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no phoning home: runs must work offline

from flwr.app import Context, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.config import get_fused_config_from_dir  # noqa: E402
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES  # noqa: E402
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes  # noqa: E402
from flwr.simulation.run_simulation import NOOP_FEDERATION_ID, _run_simulation  # noqa: E402
from flwr.supercore.run import Run  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from flwr.supercore.telemetry import EventType  # noqa: E402

from common.config import ConfigError  # noqa: E402

APP_DIR = Path(__file__).resolve().parents[1]


def app_dir() -> Path:
    """Directory holding fedrec's ``pyproject.toml`` (the Flower app)."""
    if not (APP_DIR / "pyproject.toml").is_file():
        raise FileNotFoundError(
            f"fedrec's pyproject.toml is not next to the package ({APP_DIR}); "
            "run from a source checkout installed with `pip install -e .`"
        )
    return APP_DIR


def fused_run_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """pyproject defaults with ``overrides`` applied; unknown keys are an error."""
    defaults = get_fused_config_from_dir(app_dir(), {})
    unknown = sorted(set(overrides or {}) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown run-config key(s): {', '.join(unknown)}; valid keys: {', '.join(sorted(defaults))}")
    return get_fused_config_from_dir(app_dir(), dict(overrides or {}))


def run_in_process(
    overrides: Mapping[str, Any] | None,
    num_supernodes: int,
    *,
    num_cpus_per_client: float = 1.0,
    verbose: bool = False,
    client_app: ClientApp | None = None,
) -> Context:
    """Run ServerApp and ``num_supernodes`` ClientApps locally; returns the server Context.

    ``client_app`` replaces fedrec's ClientApp (tests wrap it with inspecting mods).
    """
    from server.server_app import app as server_app

    if client_app is None:
        from client.client_app import app as client_app

    run_config = fused_run_config(overrides)
    run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    run = Run.create_empty(run_id)
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = dict(overrides or {})
    TaskIdentity.task_id = 1  # as flwr's own Python simulation API does
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    backend_config = {
        "client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": 0.0},
        "init_args": {"num_cpus": os.cpu_count() or 1, "logging_level": "ERROR", "log_to_driver": verbose},
    }
    result = _run_simulation(
        num_supernodes=num_supernodes,
        client_app=client_app,
        server_app=server_app,
        backend_config=backend_config,
        app_dir=str(app_dir()),
        run=run,
        server_app_context=context,
        is_app=True,  # makes every SuperNode fuse the run-config from app_dir, as under `flwr run`
        verbose_logging=verbose,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
    )
    return result.context
