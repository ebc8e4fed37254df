"""The three Flower patches of ``simulations.engine``: each still needed, and applied only by ``fedrec simulate``.

Each "still needed" test probes the installed flwr's own function (the engine keeps it as
``_FLOWER_*``) for the behaviour its patch works around; when a flwr upgrade fixes that
behaviour the test fails, and the patch should go. The other tests check that the patches
reach the code Flower runs, and that the apps ``flwr run`` loads never import the engine.
"""

from __future__ import annotations

import ast
import time
from pathlib import Path
from queue import Queue
from types import SimpleNamespace

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.node_pb2 import NodeInfo
from flwr.proto.task_pb2 import Task
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.simulation.run_simulation import NOOP_FEDERATION_ID
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from common.config import SIMULATION_PARTITIONS_KEY
from simulations import engine

ROOT = Path(__file__).resolve().parents[1]
RUN_ID, TASK_ID = 7, 11


def _factory() -> LinkStateFactory:
    """A fresh in-memory LinkState factory, as Flower's simulation makes one."""
    return LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())


@pytest.fixture
def fleet(monkeypatch):
    """A real in-memory LinkState with 12 registered SuperNodes and a run, and a grid on it (no Ray)."""
    for name, value in (("_run_id", RUN_ID), ("_task_id", TASK_ID), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)
    factory = _factory()
    state = factory.state()
    run = Run.create_empty(RUN_ID)
    run.primary_task_id, run.federation_id = TASK_ID, NOOP_FEDERATION_ID
    state.run_ids[RUN_ID] = RunRecord(run=run)  # as flwr's simulation registers its run
    state.task_store[TASK_ID] = Task(task_id=TASK_ID, run_id=RUN_ID)
    nodes = engine._FLOWER_REGISTER_NODES(num_nodes=12, state_factory=factory)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return SimpleNamespace(state=state, nodes=nodes, grid=grid)


def _push_to_first(fleet, count: int) -> list[str]:
    """One query message to each of the first ``count`` nodes; their message ids."""
    messages = [Message(RecordDict(), dst_node_id=node, message_type="query", group_id="1")
                for node in list(fleet.nodes)[:count]]
    return list(fleet.grid.push_messages(messages))


def _count_checks(monkeypatch, state) -> list[int]:
    """Record how many stored messages each ``_check_stored_messages`` call examines."""
    checked: list[int] = []
    flower_check = state._check_stored_messages

    def counting(message_ids, run_id=None):  # type: ignore[no-untyped-def]
        checked.append(len(message_ids))
        return flower_check(message_ids, run_id)

    monkeypatch.setattr(state, "_check_stored_messages", counting)
    return checked


class _OneCycle:
    """A stop event that lets a polling loop run exactly one cycle."""

    def __init__(self) -> None:
        self.asked = 0

    def is_set(self) -> bool:
        self.asked += 1
        return self.asked > 1

    def wait(self, _seconds: float) -> None:
        pass


def test_flowers_delivery_loop_still_checks_every_message_once_per_node(fleet, monkeypatch):
    """_add_messages_to_queue is needed while one cycle of Flower's loop costs nodes x messages checks."""
    in_flight = 4
    _push_to_first(fleet, in_flight)
    checked = _count_checks(monkeypatch, fleet.state)
    flower_queue: Queue[Message] = Queue()
    engine._FLOWER_ADD_MESSAGES_TO_QUEUE(fleet.state, flower_queue, fleet.nodes, _OneCycle())
    idle_nodes = len(fleet.nodes) - in_flight
    assert sum(checked) >= idle_nodes * in_flight, "flwr no longer scans all messages per node: drop the patch"
    assert flower_queue.qsize() == in_flight


def test_the_engines_delivery_loop_delivers_the_same_messages_with_one_scan(fleet, monkeypatch):
    """The replacement on a real LinkState: each node's message once, one check of each message per cycle."""
    in_flight = 4
    pushed = set(_push_to_first(fleet, in_flight))
    checked = _count_checks(monkeypatch, fleet.state)
    queue: Queue[Message] = Queue()
    engine._add_messages_to_queue(fleet.state, queue, fleet.nodes, _OneCycle())
    delivered = [queue.get_nowait() for _ in range(queue.qsize())]
    assert {m.metadata.message_id for m in delivered} == pushed
    assert all(m.metadata.delivered_at for m in delivered) and checked == [in_flight]
    engine._add_messages_to_queue(fleet.state, queue, fleet.nodes, _OneCycle())
    assert queue.empty(), "a delivered message is not delivered again"


def test_flowers_wait_for_replies_still_pauses_a_fixed_interval_whatever_a_pull_costs(monkeypatch):
    """_pull_messages is needed while Flower's send_and_receive sleeps pull_interval even after a dear pull."""
    clock = [0.0]
    pauses: list[float] = []
    monkeypatch.setattr(time, "sleep", pauses.append)
    arrivals = iter([[], [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id="a"))]])

    def dear_pull(_ids):  # type: ignore[no-untyped-def]
        clock[0] += 5.0  # fifty times Flower's interval
        return next(arrivals)

    grid = SimpleNamespace(pull_interval=0.1, push_messages=lambda messages: list(messages), pull_messages=dear_pull)
    replies = InMemoryGrid.send_and_receive(grid, ["a"])  # Flower's own, never replaced
    assert len(replies) == 1
    assert pauses == [0.1], "flwr now paces its pulls by their cost: drop the patch"


def test_flowers_pull_still_checks_every_outstanding_message(fleet, monkeypatch):
    """_pull_messages is needed while one pull costs time in proportion to the replies still outstanding."""
    outstanding = _push_to_first(fleet, 6)
    checked = _count_checks(monkeypatch, fleet.state)
    assert list(engine._FLOWER_PULL_MESSAGES(fleet.grid, outstanding)) == []
    assert checked == [len(outstanding)], "flwr no longer checks every outstanding message per pull: drop the patch"


def test_the_servers_wait_for_replies_pauses_longer_when_pulls_cost_more(monkeypatch):
    """The engine's pull wrapper under Flower's send_and_receive: same replies, pulls at most ~10 % of the time."""
    clock = [0.0]
    pauses: list[float] = []
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(time, "sleep", pauses.append)

    def reply(to):  # type: ignore[no-untyped-def]
        return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=to))

    arrivals = [[], [reply("a")], [reply("b"), reply("c")]]
    costs = [0.002, 0.05, 0.03]  # seconds each pull takes
    pulled: list[set[str]] = []

    def flower_pull(_grid, ids):  # type: ignore[no-untyped-def]
        assert ids, "no pull once every reply is in"
        clock[0] += costs[len(pulled)]
        pulled.append(set(ids))
        return arrivals[len(pulled) - 1]

    monkeypatch.setattr(engine, "_FLOWER_PULL_MESSAGES", flower_pull)
    grid = InMemoryGrid.__new__(InMemoryGrid)  # no state needed: the pull itself is stubbed
    grid.pull_interval = 0.1
    grid.push_messages = lambda messages: list(messages)
    replies = grid.send_and_receive(["a", "b", "c"])
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b", "c"]
    assert pulled == [{"a", "b", "c"}, {"a", "b", "c"}, {"b", "c"}]
    assert pauses == pytest.approx([0.1, 0.5]), "Flower's interval for a cheap pull, ten times the cost of a dear one"


def test_flower_still_gives_random_node_ids_and_no_partition_to_the_server(fleet):
    """_register_nodes is needed while node ids change every run and the server sees no partition-id or order."""
    first = engine._FLOWER_REGISTER_NODES(num_nodes=5, state_factory=_factory())
    second = engine._FLOWER_REGISTER_NODES(num_nodes=5, state_factory=_factory())
    assert sorted(first.values()) == sorted(second.values()) == list(range(5))
    assert set(first).isdisjoint(second), "flwr now gives the same node ids every run: drop the patch"
    fields = [field.name for field in NodeInfo.DESCRIPTOR.fields]
    assert not any("partition" in name for name in fields), "flwr now tells the server partition ids: drop the patch"
    assert isinstance(fleet.grid.get_node_ids(), set), "flwr now lists nodes in order: the server could infer them"


def test_the_engines_registration_records_each_nodes_partition_for_the_server(monkeypatch):
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    monkeypatch.setattr(engine, "_SERVER_CONTEXTS", [context])
    mapping = engine._register_nodes(num_nodes=4, state_factory=_factory())
    record = context.state.array_records[SIMULATION_PARTITIONS_KEY]
    recorded = dict(zip(record["node-ids"].numpy().tolist(), record["partition-ids"].numpy().tolist(), strict=True))
    assert recorded == mapping and sorted(mapping.values()) == [0, 1, 2, 3]


class _Reached(Exception):
    """Raised by the stand-in for the Simulation Engine: `fedrec simulate` got as far as starting it."""


def test_fedrec_simulate_starts_flower_with_the_engines_patches_in_place(tmp_path, monkeypatch):
    """`fedrec simulate` runs through engine.run_in_process, and Flower looks each patched name up when it runs."""
    from simulations import cli

    seen: dict[str, bool] = {}

    def stand_in(overrides, num_supernodes, **_kwargs):  # type: ignore[no-untyped-def]
        seen["delivery"] = vce_api.add_messages_to_queue is engine._add_messages_to_queue
        seen["registration"] = vce_api._register_nodes is engine._register_nodes
        seen["pull"] = InMemoryGrid.pull_messages is engine._pull_messages
        raise _Reached

    monkeypatch.setattr(engine, "run_in_process", stand_in)
    with pytest.raises(_Reached):
        cli.main(["simulate", "--rounds", "1", "--run-dir", str(tmp_path / "run"), "-c", "report=false"])
    assert seen == {"delivery": True, "registration": True, "pull": True}
    # Module globals and a method resolved at call time, so the replacements are what Flower runs:
    assert "add_messages_to_queue" in vce_api.run_api.__code__.co_names
    assert "_register_nodes" in vce_api.start_vce.__code__.co_names
    assert "pull_messages" in InMemoryGrid.send_and_receive.__code__.co_names


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return names | {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}


def test_flwr_run_keeps_flowers_own_engine():
    """The apps `flwr run` loads (server/, client/ and the common/ they share) never import simulations."""
    sources = [path for package in ("server", "client", "common") for path in (ROOT / package).rglob("*.py")]
    assert len(sources) > 10
    offenders = {str(path.relative_to(ROOT)) for path in sources
                 if any(name.split(".")[0] == "simulations" for name in _imported_modules(path))}
    assert offenders == set()
