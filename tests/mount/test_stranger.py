"""A stranger floods a real node process with idle connections, while two real
nodes keep syncing through their mounts.

The attacked node runs with few file descriptors (`prlimit --nofile=128`), so
without its connection caps the flood would use them all up: failed
`accept()` calls, a traceback logged for each, and no room left for its real
peer. The flood comes from other loopback addresses (127.0.0.2 and up), as
from other machines on the LAN.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from scenarios.harness import NodeProcess, wait_for

FLOOD = 1500


def sockets_of(pid: int) -> int:
    """How many sockets process `pid` holds open."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


async def flood(port: int, pid: int, hold_s: float, during: Callable[[], None]) -> int:
    """Open FLOOD idle connections, run `during` (in a thread), hold them
    `hold_s` more. Returns how many more sockets than before the node holds
    once it has taken the flood in.

    The node takes the flood in a batch at a time (the kernel completes
    connections before the node accepts them, and closes the ones the gate
    pushes out a loop turn later), so its count only settles once it has
    drained the listen queue: 1 s after the last connection on a quiet
    machine, up to a few more on a loaded one. Its idle timeout (10 s) is
    far off then, so a count that settles at the cap is the cap at work,
    not the timeout."""
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    before = sockets_of(pid)

    async def one(i: int) -> None:
        with contextlib.suppress(OSError):
            conns.append(
                await asyncio.open_connection(
                    "127.0.0.1", port, local_addr=(f"127.0.{i // 200}.{2 + i % 200}", 0)
                )
            )

    try:
        for start in range(0, FLOOD, 250):
            await asyncio.gather(*(one(i) for i in range(start, start + 250)))
        await asyncio.sleep(1)
        settle_by = time.monotonic() + 4
        held = sockets_of(pid) - before
        while held > 64 and time.monotonic() < settle_by:
            await asyncio.sleep(0.1)
            held = sockets_of(pid) - before
        await asyncio.to_thread(during)
        await asyncio.sleep(hold_s)
        return held
    finally:
        for _, w in conns:
            w.transport.abort()


@pytest.mark.timeout(180)  # the node this guards against wedges (and logs 100 MB)
def test_an_idle_connection_flood_does_not_stop_sync(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    a = make_node("alpha")
    a.prefix = ["prlimit", "--nofile=128:128"]
    a.start()
    port = int(a.status()["listen"].rsplit(":", 1)[1])
    b = make_node("beta", ["--peer", f"127.0.0.1:{port}"]).start()
    (b.mountpoint / "before").write_text("1")
    wait_for(lambda: (a.mountpoint / "before").exists(), 20, "A to see B's file")

    def sync_both_ways() -> None:
        t0 = time.monotonic()
        (b.mountpoint / "during-b").write_text("2")
        (a.mountpoint / "during-a").write_text("3")
        wait_for(lambda: (a.mountpoint / "during-b").exists(), 15, "A to see B's file")
        wait_for(lambda: (b.mountpoint / "during-a").exists(), 15, "B to see A's file")
        assert time.monotonic() - t0 < 15

    assert a.proc is not None  # prlimit runs the node in its own process (exec)
    held = asyncio.run(flood(port, a.proc.pid, 2.0, sync_both_ways))
    assert held <= 64, f"the node held {held} idle connections"
    assert (a.mountpoint / "during-b").read_text() == "2"
    log = a.log_text()
    assert "Traceback" not in log, log[-3000:]
    loud = [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]
    assert len(loud) <= 3, loud
