"""The ServerApp's count of connected SuperNodes before a deployment's first round (server/nodes.py)."""

from __future__ import annotations

import pytest

from common.config import ConfigError
from server.nodes import NodeCount, count_nodes, refuse_if_short


class Grid:
    """A grid whose SuperNodes connect one per poll, up to ``final``."""

    def __init__(self, final: int) -> None:
        self.final, self.polls = final, 0

    def get_node_ids(self) -> list[int]:
        self.polls += 1
        return list(range(min(self.polls, self.final)))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_the_wait_ends_as_soon_as_every_node_is_there():
    clock = Clock()
    assert count_nodes(Grid(3), 3, 120.0, clock=clock, sleep=clock.sleep) == (3, 2.0)


def test_the_wait_is_bounded_when_a_node_never_comes():
    clock = Clock()
    connected, waited = count_nodes(Grid(2), 3, 10.0, clock=clock, sleep=clock.sleep)
    assert (connected, waited) == (2, 10.0)


def test_a_node_short_is_refused_by_default_and_only_reported_when_asked():
    short = NodeCount(required=3, connected=2, waited_seconds=120.0, policy="refuse")
    with pytest.raises(ConfigError, match=r"refusing the round plan: 2 SuperNode\(s\) connected .* yields 3 clients"):
        refuse_if_short(short)
    reported = NodeCount(required=3, connected=2, waited_seconds=120.0, policy="report")
    refuse_if_short(reported)  # runs on, recorded
    assert reported.facts() == {"nodes_required": 3, "nodes_connected": 2, "nodes_missing": 1,
                                "nodes_waited_seconds": 120.0, "missing_nodes_policy": "report"}
    refuse_if_short(NodeCount(required=3, connected=4, waited_seconds=0.0, policy="refuse"))  # more is fine


def test_missing_nodes_takes_only_the_two_policies():
    from common.config import parse_run_config
    from simulations.engine import fused_run_config

    with pytest.raises(ConfigError, match="missing-nodes must be one of refuse, report"):
        parse_run_config(fused_run_config({"missing-nodes": "ignore"}))
