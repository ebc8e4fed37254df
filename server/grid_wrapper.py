"""A Flower grid that hands every call to another grid: the base of fedrec's grid wrappers.

Flower 1.41's ``Grid`` is abstract and has no delegating wrapper, while fedrec wraps the
grid for two jobs (a round deadline in deployments, the record of what the server
received); each wrapper overrides only the calls it changes.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.server import Grid


class ForwardingGrid(Grid):
    """Every ``Grid`` call goes to ``grid`` unchanged."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def set_run(self, run) -> None:  # type: ignore[no-untyped-def]
        self._grid.set_run(run)

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:  # type: ignore[no-untyped-def]
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)
