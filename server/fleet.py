"""The server's side of an unreliable fleet: a round deadline and retrying short rounds.

Devices drop out, straggle and come and go (``client.fleet`` plays that in simulation).
The server must neither wait forever for a device that is gone nor crash when a round
brings back fewer usable updates than ``min-train-clients``: it skips such a round, or
runs it again with a fresh sample (``too-few-clients = "retry"``, ``round-retries`` times).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.server import Grid

from common.config import FedRecConfig
from server.grid_wrapper import ForwardingGrid

Workflow = Callable[[Grid, object], None]


class DeadlineGrid(ForwardingGrid):
    """A Flower grid that stops waiting for replies after ``deadline`` seconds.

    Flower 1.41's default fit workflow waits for every reply; its grids take a timeout
    but the workflow passes none. This passes the deadline on every ``send_and_receive``
    that does not set its own; replies that come later are simply not in the result.
    """

    def __init__(self, grid: Grid, deadline: float) -> None:
        super().__init__(grid)
        self.deadline = deadline

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=self.deadline if timeout is None else timeout)


def with_deadline(grid: Grid, config: FedRecConfig, engine: str) -> Grid:
    """The grid to run rounds on: with the round deadline in a deployment.

    In simulation the deadline is applied on virtual time by each device (``client.fleet``):
    two cores work through a round's devices one after another, so a wall-clock deadline
    would drop devices for being queued, not for being slow.
    """
    if config.round_deadline > 0 and engine != "simulation":
        return DeadlineGrid(grid, config.round_deadline)
    return grid


def retrying(fit_workflow: Workflow, strategy, retries: int) -> Workflow:  # type: ignore[no-untyped-def]
    """Run a round's fit stage again while it ends short and retries remain.

    ``strategy`` is a :class:`server.strategy.FedRecStrategy`: it is told which attempt this
    is and how many remain (so it knows whether to record a short round as skipped) and
    says whether the round completed. A round that never reached aggregation (SecAgg+
    gives up when too few devices survive its key exchange) is recorded as skipped.
    """

    def run(grid: Grid, context) -> None:  # type: ignore[no-untyped-def]
        for attempt in range(retries + 1):
            strategy.attempt, strategy.attempts_left = attempt, retries - attempt
            fit_workflow(grid, context)
            if strategy.round_complete:
                return
        strategy.record_skipped_round()

    return run
