"""Start a SuperLink with TLS and SuperNode authentication, and point the ``flwr`` CLI at it.

The functions return the exact ``flower-superlink`` argument list (``fedrec superlink``
runs it, the end-to-end test starts it) so the README, the CLI and the test cannot drift
apart. Files come from ``fedrec certs``; SuperNodes are registered afterwards with
``flwr supernode register`` (flwr 1.41 has no allow-list file, see ``server.credentials``).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import tomli_w

from server.credentials import CA_CERT, SERVER_CERT, SERVER_KEY

__all__ = ["superlink_command", "tls_files", "write_flwr_connection"]

DEFAULT_SUPERLINK_PORT = 8000  # flwr 1.41 serves Fleet, Control and Runtime APIs on one HTTPS port


def tls_files(certs_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """The CA, server certificate and server key in ``certs_dir``; every one must exist."""
    folder = Path(certs_dir).resolve()
    files = {name: folder / name for name in (CA_CERT, SERVER_CERT, SERVER_KEY)}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{', '.join(missing)} not found; create them with `fedrec certs --out {certs_dir}`"
        )
    return files


def superlink_command(
    certs_dir: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_SUPERLINK_PORT,
    database: str | os.PathLike[str] | None = None,
    supernode_auth: bool = True,
) -> list[str]:
    """``flower-superlink`` over TLS, with SuperNode authentication unless switched off.

    ``host`` 127.0.0.1 keeps a one-machine federation off the network; use 0.0.0.0 (and a
    certificate naming the address SuperNodes dial) across machines. ``database`` makes
    registered SuperNodes and runs survive a restart (in memory otherwise). Runtime
    dependency installation is disabled: the SuperLink runs the ServerApp with the
    packages already installed next to it, never what a submitted app asks ``uv`` for.
    """
    files = tls_files(certs_dir)
    command = [
        "flower-superlink",
        "--ssl-ca-certfile", str(files[CA_CERT]),
        "--ssl-certfile", str(files[SERVER_CERT]),
        "--ssl-keyfile", str(files[SERVER_KEY]),
        "--host", host,
        "--port", str(port),
        "--disable-runtime-dependency-installation",
    ]
    if supernode_auth:
        command.append("--enable-supernode-auth")
    if database is not None:
        command += ["--database", str(Path(database).resolve())]
    return command


def write_flwr_connection(
    flwr_home: str | os.PathLike[str],
    name: str,
    address: str,
    ca_cert: str | os.PathLike[str] | None,
    *,
    make_default: bool = False,
) -> Path:
    """Add (or replace) ``[superlink.<name>]`` in ``$FLWR_HOME/config.toml``.

    This is where flwr 1.41's CLI (``flwr run . <name>``, ``flwr supernode register``)
    looks up a SuperLink's address and the CA it trusts. Other connections are kept.
    ``ca_cert=None`` writes a connection that trusts only the system's CAs.
    """
    path = Path(flwr_home) / "config.toml"
    config = tomllib.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    links = config.setdefault("superlink", {})
    entry: dict[str, str] = {"address": address}
    if ca_cert is not None:
        entry["root-certificates"] = str(Path(ca_cert).resolve())
    links[name] = entry
    if make_default or "default" not in links:
        links["default"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    return path
