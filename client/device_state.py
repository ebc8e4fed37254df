"""The device's state between messages: user rows and record-level DP history.

Without a node-config ``state-dir`` they live in ``Context.state`` (one ArrayRecord and
one ConfigRecord) across rounds and are never part of a reply. With it, the device's
users, interactions, user rows and record-level DP history live on disk instead
(:mod:`client.store`): initialised from the SuperNode's partition the first time, saved
after every fit, loaded on every message, so they survive a SuperNode restart and reflect
the operator's edits (added or forgotten users) from the next message on. ``Context.state``
then holds none of them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context

from client import store
from client.private_training import History
from common.config import FedRecConfig
from common.errors import DataError
from common.federation import ClientData, slicer_cached

LOCAL_STATE_KEY = "fedrec.user-local"
RECORD_DP_HISTORY_KEY = "fedrec.record-dp-history"
STATE_DIR_KEY = "state-dir"  # node-config: directory of the device's persistent state


def load_local_state(context: Context) -> dict[str, np.ndarray] | None:
    """User embeddings kept on this device from earlier rounds (None on first contact)."""
    record = context.state.array_records.get(LOCAL_STATE_KEY)
    if record is None:
        return None
    return {name: array.numpy() for name, array in record.items()}


def save_local_state(context: Context, state: dict[str, np.ndarray]) -> None:
    context.state.array_records[LOCAL_STATE_KEY] = ArrayRecord({name: Array(value) for name, value in state.items()})


def load_record_history(context: Context) -> History:
    """The Opacus accountant history of every earlier round this device trained in."""
    record = context.state.config_records.get(RECORD_DP_HISTORY_KEY)
    if record is None:
        return []
    return list(zip(record["noise"], record["rate"], record["steps"], strict=True))  # type: ignore[arg-type]


def save_record_history(context: Context, history: History) -> None:
    context.state.config_records[RECORD_DP_HISTORY_KEY] = ConfigRecord(
        {
            "noise": [float(z) for z, _, _ in history],
            "rate": [float(q) for _, q, _ in history],
            "steps": [int(n) for _, _, n in history],
        }
    )


def client_data_for(config: FedRecConfig, context: Context) -> ClientData:
    """This SuperNode's slice of the data, chosen by its ``partition-id`` node-config."""
    slicer = slicer_cached(config)
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config.get("num-partitions", len(slicer)))
    if num_partitions != len(slicer):
        raise ValueError(
            f"this federation has {num_partitions} SuperNodes but the data yields {len(slicer)} clients "
            f"(partitioning={config.partitioning!r}); set num-supernodes to {len(slicer)}"
        )
    return slicer.client(partition_id)


def state_dir_for(context: Context) -> Path | None:
    """The node-config ``state-dir`` (None when unset or empty: state in ``Context`` only)."""
    value = context.node_config.get(STATE_DIR_KEY)
    if value is None or str(value).strip() == "":
        return None
    path = Path(str(value)).expanduser()
    if not path.is_absolute():
        # Under `flower-supernode` the ClientApp may run in another process and directory.
        raise ValueError(f"node-config {STATE_DIR_KEY}={value!r} must be an absolute path")
    return path


def device_state_for(config: FedRecConfig, context: Context, state_dir: Path) -> store.DeviceState:
    """The device state on disk, created from this SuperNode's partition the first time.

    Call with :func:`client.store.locked` held. A state made from another partition is
    refused, so two SuperNodes pointed at one directory do not silently share users.
    """
    partition = context.node_config.get("partition-id")
    if store.exists(state_dir):
        state = store.load(state_dir)
        if partition is not None and state.partition_id >= 0 and state.partition_id != int(partition):
            raise DataError(
                f"device state was initialised from partition-id {state.partition_id} but this SuperNode has "
                f"partition-id {int(partition)}; give each SuperNode its own state-dir",
                store.state_file(state_dir),
            )
        return state
    if partition is None:
        raise DataError(
            "no device state yet and no partition-id to initialise it from; create it with client.store.create",
            store.state_file(state_dir),
        )
    state = store.DeviceState.from_client_data(client_data_for(config, context), int(partition))
    store.save(state_dir, state)
    return state


def forget_context_copies(context: Context) -> None:
    """With a state-dir the disk is the only copy: none of the user rows stay in ``Context``."""
    context.state.array_records.pop(LOCAL_STATE_KEY, None)
    context.state.config_records.pop(RECORD_DP_HISTORY_KEY, None)
