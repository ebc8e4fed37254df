"""What the server received: every field of every reply, recorded by name and type, never by value.

:class:`DisclosureGrid` wraps the grid the workflows talk through and notes, for each reply
the server gets, which records and keys it carries and of what type and shape. The run
directory keeps the union in ``received.json``; the report prints it as the run's
disclosure table, field by field, with what each field can tell the server. It is measured
on the replies themselves, so a field a device starts sending shows up whether or not
anyone documented it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
)
from flwr.server import Grid

from common.private_eval import EVALUATE_ONLY_KEY
from server.grid_wrapper import ForwardingGrid
from server.run_dir import atomic_write_bytes

__all__ = ["DisclosureGrid", "RECEIVED_FILE", "ReceivedFields", "reply_fields", "request_stage"]

RECEIVED_FILE = "received.json"
EVALUATION_STAGE_SUFFIX = " (evaluation)"


def value_type(value: Any) -> str:
    """A value's type as the table shows it: never the value itself."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, np.integer)):
        return "int"
    if isinstance(value, (float, np.floating)):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, bytes):
        return "bytes"
    if isinstance(value, list):
        inner = sorted({value_type(v) for v in value})
        return f"list[{'|'.join(inner)}]" if inner else "list"
    return type(value).__name__


def request_stage(message: Message) -> str:
    """The SecAgg+ stage a request asks for ("" outside SecAgg+), marking evaluation rounds."""
    content = message.content
    configs = content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None:
        return ""
    stage = str(configs.get(Key.STAGE, ""))
    fit_config = content.config_records.get("fitins.config")
    if stage == Stage.COLLECT_MASKED_VECTORS and fit_config is not None and fit_config.get(EVALUATE_ONLY_KEY):
        stage += EVALUATION_STAGE_SUFFIX
    return stage


def reply_fields(message: Message) -> list[tuple[str, str, str, str]]:
    """(record kind, record name, key, type) of every field of a reply; arrays with dtype and shape."""
    if not message.has_content():
        return []
    content = message.content
    fields = []
    for name, record in content.array_records.items():
        for key, array in record.items():
            value = array.numpy()  # a legacy reply's Array carries no dtype/shape of its own
            fields.append(("arrays", name, key, f"{value.dtype} {list(value.shape)}"))
    for name, record in content.config_records.items():
        fields.extend(("config", name, key, value_type(value)) for key, value in record.items())
    for name, record in content.metric_records.items():
        fields.extend(("metrics", name, key, value_type(value)) for key, value in record.items())
    return fields


class ReceivedFields:
    """The fields (not the values) of the replies the server received, counted, kept in ``received.json``."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / RECEIVED_FILE
        self._rows: dict[tuple[str, str, str, str, str, str], int] = {}

    def add(self, message_type: str, stage: str, reply: Message, count: int = 1) -> None:
        """``count`` replies of the fields ``reply`` has (the vectorized backend notes a kind of reply once)."""
        for field in reply_fields(reply):
            row = (message_type, stage, *field)
            self._rows[row] = self._rows.get(row, 0) + count

    def save(self) -> None:
        rows = [
            {"message_type": t, "stage": s, "record_kind": kind, "record": name, "key": key, "type": typ, "replies": n}
            for (t, s, kind, name, key, typ), n in sorted(self._rows.items())
        ]
        atomic_write_bytes(self.path, json.dumps({"fields": rows}, indent=1).encode())


class DisclosureGrid(ForwardingGrid):
    """A grid that records the fields (not the values) of every reply the server receives."""

    def __init__(self, grid: Grid, run_dir: str | Path) -> None:
        super().__init__(grid)
        self.received = ReceivedFields(run_dir)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        self._note(replies, {})
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        stages = {m.metadata.dst_node_id: request_stage(m) for m in messages}
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._note(replies, stages)
        return replies

    def _note(self, replies: list[Message], stages: dict[int, str]) -> None:
        if not replies:
            return
        for reply in replies:
            self.received.add(reply.metadata.message_type, stages.get(reply.metadata.src_node_id, ""), reply)
        self.received.save()
