"""Process helpers for the tests that start real SuperLinks, SuperNodes and `flwr run`.

Flower starts SuperExec and app processes below the ones a test launches, so stopping a
test's process means stopping its whole tree, or the next test inherits busy ports.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_tree(process: subprocess.Popen) -> None:
    """SIGTERM the process and everything it started; SIGKILL what is left after 20 s."""
    victims = [process.pid, *descendants(process.pid)]
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        for pid in victims:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
        victims = [pid for pid in [*victims, *descendants(process.pid)] if Path(f"/proc/{pid}").exists()]
