"""Telling a service manager (systemd) how the node is doing: sd_notify.

`Type=notify` units wait for `READY=1` on the datagram socket named by
`$NOTIFY_SOCKET`; we send it once the mount answers a request, so a unit
ordered after ours finds the volume there. Without `$NOTIFY_SOCKET` (not
started by systemd) every call does nothing. The protocol is one datagram of
`KEY=value` lines (sd_notify(3)); the stdlib socket is all it needs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import sys
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

# How long we wait for our own mount to answer a stat before giving up on READY.
ANSWER_TIMEOUT_S = 30.0


def notify(message: str) -> bool:
    """Send `message` (e.g. "READY=1") to the service manager; False if none listens."""
    where = os.environ.get("NOTIFY_SOCKET")
    if not where:
        return False
    address = "\0" + where[1:] if where.startswith("@") else where  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot tell the service manager %r: %s", message.split("\n")[0], exc)
        return False
    return True


async def wait_answers(mountpoint: Path) -> bool:
    """Wait until the mount at `mountpoint` answers a stat (served by this very
    event loop: the stat runs in a thread). False if it did not in time."""
    try:
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            await asyncio.to_thread(os.stat, mountpoint)
    except (TimeoutError, OSError) as exc:
        log.warning("the mount at %s does not answer: %s", mountpoint, exc)
        return False
    return True


UNIT = "dfs-peer@.service"


def unit_text(*, user: bool, executable: str) -> str:
    """The shipped unit (of the user manager if `user`, else of the system's)
    with ExecStart naming `executable`, the dfs-peer to run."""
    folder = resources.files("peer") / "systemd" / ("user" if user else "system")
    text = (folder / UNIT).read_text()
    return text.replace("ExecStart=dfs-peer ", f"ExecStart={executable} ")


def this_executable() -> str:
    """The `dfs-peer` command of this installation (beside this Python first)."""
    beside = Path(sys.executable).with_name("dfs-peer")
    if beside.exists():
        return str(beside)
    found = shutil.which("dfs-peer")
    return str(Path(found).resolve()) if found else "dfs-peer"
