"""Run the fedrec Flower app in-process on the Simulation Engine.

``flwr run .`` submits the app to a (local) SuperLink; researchers and tests also want
the same run from Python with overrides and without a background SuperLink. This calls
the entry Flower's own simulation process uses (``flwr.simulation.run_simulation``'s
internal ``_run_simulation`` in flwr 1.41, pinned in pyproject) with an app directory
whose ``pyproject.toml`` holds the code's defaults (:mod:`common.config`), so every
SuperNode and the ServerApp see the same fused run-config as under ``flwr run``, and an
installed wheel runs without the source tree.

Importing this module also patches three functions of flwr 1.41's simulation engine (for
``fedrec simulate``; ``flwr run`` never imports this module and uses Flower's own): the
loop that scans all messages once per SuperNode every 0.1 s is replaced
(:func:`_add_messages_to_queue`), so fleets of 100,000 devices scale; the ServerApp's pull
of replies is wrapped (:func:`_pull_messages`) so the pause between pulls grows with what a
pull costs; and the registration of the SuperNodes is wrapped (:func:`_register_nodes`) to
tell the ServerApp which partition each node holds (``seeded-sampling``). Each docstring
says why the patch is needed and links the upstream issue where there is one;
``tests/test_engine_patches.py`` fails when one is no longer needed.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no phoning home: runs must work offline

import numpy as np  # noqa: E402
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES  # noqa: E402
from flwr.server.superlink.fleet.vce import vce_api  # noqa: E402
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState  # noqa: E402
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes  # noqa: E402
from flwr.simulation.run_simulation import NOOP_FEDERATION_ID, _run_simulation  # noqa: E402
from flwr.supercore.date import now  # noqa: E402
from flwr.supercore.run import Run  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from flwr.supercore.telemetry import EventType  # noqa: E402
from flwr.superlink.grid import InMemoryGrid  # noqa: E402

from common.config import SIMULATION_PARTITIONS_KEY, default_run_config, fused_run_config  # noqa: E402

__all__ = ["fused_run_config", "run_in_process"]  # fused_run_config: common.config's, re-exported for older callers

APP_DIR = Path(__file__).resolve().parents[1]
APP_COMPONENTS = {"serverapp": "server.server_app:app", "clientapp": "client.client_app:app"}


def app_dir() -> Path:
    """The source checkout (where ``flwr run .`` finds fedrec's ``pyproject.toml``); tests start processes there."""
    if not (APP_DIR / "pyproject.toml").is_file():
        raise FileNotFoundError(f"fedrec's pyproject.toml is not next to the package ({APP_DIR}): not a source checkout")
    return APP_DIR


def write_app_config(directory: Path) -> Path:
    """A minimal Flower app ``pyproject.toml`` holding the code's defaults, for the simulated SuperNodes.

    Flower's simulation builds each SuperNode's run-config from an app directory's
    ``[tool.flwr.app.config]`` plus the run's overrides. Writing the table from the code
    (not reading the checkout's file) makes ``fedrec simulate`` work from an installed wheel.
    """
    import tomli_w  # a dependency of flwr

    project = {
        "project": {"name": "fedrec", "version": "0.0.0"},
        "tool": {"flwr": {"app": {"publisher": "fedrec", "components": APP_COMPONENTS,
                                  "config": default_run_config()}}},
    }
    path = directory / "pyproject.toml"
    path.write_text(tomli_w.dumps(project), encoding="utf-8")
    return path


def undelivered_one_per_node(state: InMemoryLinkState, nodes: Mapping[int, int]) -> list[Message]:
    """The next undelivered message of every simulated node (at most one each), marked delivered.

    What flwr 1.41's simulation engine gets by calling ``state.get_message_ins(node, limit=1)``
    for every node, in one pass over the message store instead of one pass per node.
    """
    with state.lock:
        message_ids = list(state.message_ins_store)
        state._check_stored_messages(set(message_ids))  # expired or orphaned messages go, as in get_message_ins
        picked: dict[int, Message] = {}
        for message_id in message_ids:
            message = state.message_ins_store.get(message_id)
            if message is None or message.metadata.delivered_at != "":
                continue
            node = message.metadata.dst_node_id
            if node in nodes and node not in picked:
                picked[node] = message
        delivered_at = now().isoformat()
        for message in picked.values():
            message.metadata.delivered_at = delivered_at
    return list(picked.values())


def _add_messages_to_queue(state, queue, nodes_mapping, f_stop) -> None:  # type: ignore[no-untyped-def]
    """Drop-in for ``vce_api.add_messages_to_queue`` that scales to 100,000 SuperNodes.

    Needed on flwr 1.41 because Flower's version asks the LinkState for each node's next
    message every 0.1 s (``get_message_ins(node_id, limit=1)`` once per node), and
    ``InMemoryLinkState.get_message_ins`` checks every stored message on each call: with
    100,000 SuperNodes and 1,000 messages in flight that is 10^8 checks per cycle, and a
    round of 1,000 clients did not finish in 7 minutes. This delivers the same messages
    (the next one of each node, expiry checked) with one scan per cycle. The loop itself is
    the problem, so it is replaced, not wrapped.

    Upstream: no issue found for the per-node polling of the simulation runtime. The linear
    scan in ``get_message_ins`` was acknowledged in review when it was written,
    https://github.com/flwrlabs/flower/pull/4993 . ``tests/test_engine_patches.py`` fails
    once the installed flwr no longer polls this way.
    """
    if not isinstance(state, InMemoryLinkState):
        return _FLOWER_ADD_MESSAGES_TO_QUEUE(state, queue, nodes_mapping, f_stop)
    while not f_stop.is_set():
        for message in undelivered_one_per_node(state, nodes_mapping):
            queue.put(message)
        f_stop.wait(0.1)
    return None


_FLOWER_ADD_MESSAGES_TO_QUEUE = vce_api.add_messages_to_queue
vce_api.add_messages_to_queue = _add_messages_to_queue

# A pull may cost at most this share of the time between pulls (see _pull_messages).
PULL_COST_SHARE = 0.1


def _pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
    """``InMemoryGrid.pull_messages``, then the pause before the next pull set from what this one cost.

    Needed on flwr 1.41 because ``InMemoryGrid.send_and_receive`` sleeps a fixed
    ``pull_interval`` (0.1 s) between pulls, and each pull checks every outstanding message
    under the message store's lock: in a two-round run of 2,000 no-op devices per round,
    pulling took 25 s of the main process's time (py-spy), taken from the simulated devices
    on a 2-core machine and blocking the threads that store their replies. Flower's
    ``send_and_receive`` sleeps ``self.pull_interval`` after each pull; this sets it to at
    least Flower's interval and at least ``1 / PULL_COST_SHARE`` times the pull just made,
    so pulling costs at most about a tenth of one thread. The replies are Flower's.

    Upstream: no issue found about the cost of pulls. The interval became a constructor
    setting (default 0.1 s, never adapted) in https://github.com/flwrlabs/flower/pull/4290 ;
    the simulation does not set it. ``tests/test_engine_patches.py`` fails once the installed
    flwr no longer pauses a fixed interval or no longer checks every outstanding message on
    each pull.
    """
    flower_interval = self.__dict__.setdefault("_flower_pull_interval", self.pull_interval)
    started = time.perf_counter()
    replies = _FLOWER_PULL_MESSAGES(self, message_ids)
    self.pull_interval = max(flower_interval, (time.perf_counter() - started) / PULL_COST_SHARE)
    return replies


_FLOWER_PULL_MESSAGES = InMemoryGrid.pull_messages
InMemoryGrid.pull_messages = _pull_messages

# The ServerApp Context of the run_in_process call under way (one at a time per process).
_SERVER_CONTEXTS: list[Context] = []


def partitions_record(nodes_mapping: Mapping[int, int]) -> ArrayRecord:
    """Which simulated SuperNode holds which partition, as the ServerApp reads it from its Context."""
    node_ids = np.fromiter(nodes_mapping.keys(), dtype=np.uint64, count=len(nodes_mapping))
    partition_ids = np.fromiter(nodes_mapping.values(), dtype=np.int64, count=len(nodes_mapping))
    return ArrayRecord({"node-ids": Array(node_ids), "partition-ids": Array(partition_ids)})


def _register_nodes(num_nodes, state_factory):  # type: ignore[no-untyped-def]
    """``vce_api._register_nodes``, also telling the ServerApp each node's partition-id.

    Needed on flwr 1.41 because simulated SuperNodes get random node ids (a new set every
    run), and the ServerApp cannot learn which partition a node holds: the partition-id is
    only in the ClientApp's ``node_config``, the grid's ``NodeInfo`` has no such field, and
    ``get_node_ids`` returns a set, so not even the registration order survives.
    A seeded sample of node ids would still be different devices in every run; with the
    partition ids the server draws the same devices for the same run-config
    (``seeded-sampling``).

    Upstream: no issue found asking to expose the node-id -> partition-id mapping to the
    ServerApp; the related question of reproducible client choice across simulation runs is
    https://github.com/flwrlabs/flower/issues/3328 (open). ``tests/test_engine_patches.py``
    fails once the installed flwr gives the same node ids in every run, puts a partition-id
    in ``NodeInfo`` or returns node ids in registration order.
    """
    mapping = _FLOWER_REGISTER_NODES(num_nodes=num_nodes, state_factory=state_factory)
    for context in _SERVER_CONTEXTS:
        context.state.array_records[SIMULATION_PARTITIONS_KEY] = partitions_record(mapping)
    return mapping


_FLOWER_REGISTER_NODES = vce_api._register_nodes
vce_api._register_nodes = _register_nodes


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
    _SERVER_CONTEXTS[:] = [context]
    # Ray's start prints a tip that a future Ray will stop hiding GPUs from actors given
    # num_gpus=0; fedrec's devices train on CPU either way, so the tip is console noise.
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
    try:
        with tempfile.TemporaryDirectory(prefix="fedrec-app-") as config_dir:
            write_app_config(Path(config_dir))
            result = _run_simulation(
                num_supernodes=num_supernodes,
                client_app=client_app,
                server_app=server_app,
                backend_config=backend_config,
                app_dir=config_dir,
                run=run,
                server_app_context=context,
                is_app=True,  # every SuperNode fuses the run-config from app_dir, as under `flwr run`
                verbose_logging=verbose,
                exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            )
    finally:
        _SERVER_CONTEXTS.clear()
    return result.context
