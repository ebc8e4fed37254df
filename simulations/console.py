"""What ``fedrec simulate`` shows on the terminal.

Without ``--verbose``: fedrec's own lines (one per round, warnings, the summary) and
Flower's errors, once each. Flower logs every stage of every round, ends with a dump of
its History (about 300 lines for a default run), and its log records reached the terminal
twice: through Flower's handler and, timestamped, through the root handler Opacus installs
at import (``logging.basicConfig``). With ``--verbose``: Flower's and Ray's logs, DEBUG
included, once each.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

FLOWER_LOGGER = "flwr"
# Ray >= 2.45 warns at start-up that it will stop overriding CUDA_VISIBLE_DEVICES for
# actors with num_gpus=0; "0" opts into that behaviour now (fedrec's actors use no GPU).
RAY_ACCELERATOR_ENV = "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"


def _package_dirs() -> tuple[str, ...]:
    """Directories of fedrec's packages, wherever they are installed."""
    import client
    import common
    import server
    import simulations

    return tuple(str(Path(module.__file__).resolve().parent) + os.sep for module in (client, common, server, simulations))


class FedrecRecords(logging.Filter):
    """Records logged by fedrec's own code (through Flower's logger or not)."""

    def __init__(self) -> None:
        super().__init__()
        self.dirs = _package_dirs()

    def filter(self, record: logging.LogRecord) -> bool:
        return os.path.realpath(record.pathname).startswith(self.dirs)


class FlowerErrorsOnly(logging.Filter):
    """Flower's own records only from ERROR up; fedrec's records go to the plain handler."""

    def __init__(self, ours: FedrecRecords) -> None:
        super().__init__()
        self.ours = ours

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR and not self.ours.filter(record)


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest swaps it per test)."""

    @property  # type: ignore[override]
    def stream(self):  # type: ignore[no-untyped-def]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # type: ignore[no-untyped-def]
        pass


class PlainFormatter(logging.Formatter):
    """INFO as the bare message (fedrec's lines say who they are); higher levels prefixed."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno <= logging.INFO:
            return message
        return f"fedrec: {record.levelname.lower()}: {message.removeprefix('fedrec: ')}"


@contextlib.contextmanager
def console(verbose: bool) -> Iterator[None]:
    """Route the logs of a run for the terminal (see the module docstring); undone on exit."""
    os.environ.setdefault(RAY_ACCELERATOR_ENV, "0")
    flower = logging.getLogger(FLOWER_LOGGER)
    propagate = flower.propagate
    flower.propagate = False  # the root handler would print every record a second time
    added_handler: logging.Handler | None = None
    filtered: list[tuple[logging.Handler, logging.Filter]] = []
    if not verbose:
        ours = FedrecRecords()
        for handler in flower.handlers:
            if type(handler).__name__ == "ConsoleHandler":
                errors_only = FlowerErrorsOnly(ours)
                handler.addFilter(errors_only)
                filtered.append((handler, errors_only))
        added_handler = StderrHandler()
        added_handler.setLevel(logging.INFO)
        added_handler.setFormatter(PlainFormatter())
        added_handler.addFilter(ours)
        flower.addHandler(added_handler)
    try:
        yield
    finally:
        flower.propagate = propagate
        for handler, errors_only in filtered:
            handler.removeFilter(errors_only)
        if added_handler is not None:
            flower.removeHandler(added_handler)
