"""Start a SuperNode (a phone, a kiosk) bound to its own data partition, over TLS.

``supernode_command`` returns the exact ``flower-supernode`` argument list that
``fedrec supernode`` runs and the end-to-end test starts. The ClientApp reads its slice
of the data from the node config (``partition-id``, ``num-partitions``), so each device
states which partition it holds, and the SuperLink never chooses or sees the data.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["supernode_command"]

DEFAULT_CLIENTAPPIO_PORT = 9094  # flwr 1.41's default; one per SuperNode on a shared machine


def _existing(path: str | os.PathLike[str], what: str, hint: str) -> str:
    resolved = Path(path).resolve()
    if not resolved.is_file():
        raise FileNotFoundError(f"{what} {resolved} not found; {hint}")
    return str(resolved)


def supernode_command(
    superlink: str,
    *,
    partition_id: int,
    num_partitions: int,
    ca_cert: str | os.PathLike[str] | None,
    private_key: str | os.PathLike[str] | None,
    clientappio_port: int = DEFAULT_CLIENTAPPIO_PORT,
    max_retries: int | None = None,
    max_wait_seconds: float | None = None,
    state_dir: str | os.PathLike[str] | None = None,
) -> list[str]:
    """``flower-supernode`` dialling ``superlink`` (host:port) over TLS.

    ``ca_cert`` is the CA that signed the SuperLink's certificate (``None`` trusts only the
    system's CAs, which is what a device without ``ca.crt`` does). ``private_key`` is this
    node's OpenSSH key from ``fedrec keys``; its public half must be registered on the
    SuperLink first. ``clientappio_port`` must differ between SuperNodes on one machine.
    ``max_retries``/``max_wait_seconds`` bound reconnection (Flower retries forever by default).
    ``state_dir`` keeps the device's users and their rows on disk (client/store.py), so a
    restart loses nothing; Flower's node-config splits on spaces, so the path may not hold any.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id must be in [0, {num_partitions}); got {partition_id}")
    node_config = f"partition-id={partition_id} num-partitions={num_partitions}"
    if state_dir is not None:
        resolved = str(Path(state_dir).resolve())
        if any(ch in resolved for ch in " '\""):
            raise ValueError(f"state-dir {resolved!r}: Flower's --node-config cannot carry spaces or quotes")
        node_config += f" state-dir='{resolved}'"
    command = [
        "flower-supernode",
        "--superlink", superlink,
        "--node-config", node_config,
        "--port", str(clientappio_port),
    ]
    if ca_cert is not None:
        command += ["--root-certificates", _existing(ca_cert, "CA certificate", "copy ca.crt from `fedrec certs`")]
    if private_key is not None:
        command += [
            "--auth-supernode-private-key",
            _existing(private_key, "SuperNode key", "create it with `fedrec keys`"),
        ]
    if max_retries is not None:
        command += ["--max-retries", str(max_retries)]
    if max_wait_seconds is not None:
        command += ["--max-wait-time", str(max_wait_seconds)]
    return command
