"""Before the first round of a deployment: are as many SuperNodes connected as the data has clients?

In a deployment every SuperNode holds one partition of the data (``partition-id`` of
``num-partitions``). A SuperNode that failed to register (started before the SuperLink was
ready, a wrong key) leaves its partition's users out of every round, and without this check
the run still "succeeds" on the others. The ServerApp therefore waits, for a bounded time,
until the SuperLink reports as many connected nodes as the data yields clients, and then
either refuses the round plan (``missing-nodes = "refuse"``, the default) or runs it anyway
and says so on the console and in the run record (``missing-nodes = "report"``), for fleets
whose devices are known to come and go.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from flwr.server import Grid

from common.config import ConfigError, FedRecConfig


@dataclass(frozen=True)
class NodeCount:
    """What the ServerApp found before the first round."""

    required: int  # clients the data yields (one SuperNode each)
    connected: int  # nodes the SuperLink reported when the wait ended
    waited_seconds: float
    policy: str  # missing-nodes

    @property
    def missing(self) -> int:
        return max(0, self.required - self.connected)

    def facts(self) -> dict:
        """For the run record (``privacy.json`` -> ``transport``, and ``summary.json`` when short)."""
        return {"nodes_required": self.required, "nodes_connected": self.connected, "nodes_missing": self.missing,
                "nodes_waited_seconds": round(self.waited_seconds, 1), "missing_nodes_policy": self.policy}

    def message(self) -> str:
        return (
            f"{self.connected} SuperNode(s) connected after {self.waited_seconds:.0f} s, but the data yields "
            f"{self.required} clients (one SuperNode per partition): {self.missing} partition(s) would never train. "
            "Start the missing SuperNodes (check `flwr supernode ls`) or set missing-nodes='report' to run anyway"
        )


def count_nodes(
    grid: Grid,
    required: int,
    seconds: float,
    *,
    poll: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[int, float]:
    """Connected nodes once ``required`` are there or ``seconds`` have passed, and the time waited."""
    started = clock()
    while True:
        connected = len(list(grid.get_node_ids()))
        waited = clock() - started
        if connected >= required or waited >= seconds:
            return connected, waited
        sleep(min(poll, max(0.0, seconds - waited)))


def check_nodes(grid: Grid, config: FedRecConfig, required: int) -> NodeCount:
    """Wait up to ``node-wait-seconds`` for ``required`` nodes and say how many came."""
    connected, waited = count_nodes(grid, required, config.node_wait_seconds)
    return NodeCount(required, connected, waited, config.missing_nodes)


def refuse_if_short(found: NodeCount) -> None:
    """``missing-nodes = "refuse"``: a short fleet ends the run before its first round."""
    if found.missing and found.policy == "refuse":
        raise ConfigError(f"refusing the round plan: {found.message()}")
