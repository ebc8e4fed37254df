"""The three Flower patches of ``simulations.engine``: each still needed, and applied only by ``fedrec simulate``.

Each "still needed" test probes the installed flwr's own function (the engine keeps it as
``_FLOWER_*``) for the behaviour its patch works around; when a flwr upgrade fixes that
behaviour the test fails, and the patch should go. The other tests check that the patches
reach the code Flower runs, and that the apps ``flwr run`` loads never import the engine.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.simulation.run_simulation import NOOP_FEDERATION_ID
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

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


