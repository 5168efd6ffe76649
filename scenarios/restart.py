"""A node killed (SIGKILL) in the middle of a sync restarts and converges.

A holds 120 MiB in 120 files of 1 MiB plus 300 small files. B starts with an
empty data dir (on a real LAN, behind a 400 Mbit/s downlink, so the sync takes
a few seconds); as soon as its status shows it has stored part of the volume
(some blocks, fewer than A holds) it is killed with SIGKILL, as a crash would,
and its dead mount cleared. B is then started again on the same data dir.
Expected: B still holds at least what its status showed before the kill, it
resumes, its mount becomes identical to A's (every byte verified by hash), and
it ends holding as many blocks as A.
"""

from __future__ import annotations

import os
import time
from typing import Any

from scenarios.cluster import Cluster
from scenarios.harness import HarnessError
from scenarios.trees import human_bytes
from scenarios.workload import make_corpus, write_large

NEEDS_REAL_LAN = False
LARGE_FILES = 120
LARGE_SIZE = 1 << 20
SMALL_FILES = 300
DOWNLINK_MBIT = 400


def run(c: Cluster) -> None:
    a, b = c.add("A"), c.add("B")  # both now, so that on loopback A knows B's address
    with c.report.step("started and mounted A"):
        c.start(a)
    with c.report.step("wrote the volume through A's mount") as step:
        os.mkdir(a.path("large"))
        for i in range(LARGE_FILES):
            write_large(a.path(f"large/{i:03d}.bin"), LARGE_SIZE, seed=f"restart-{i}")
        make_corpus(a.mount, SMALL_FILES, dirs=3, size=-4096, seed=7)
        total = a.status()
        step.text = (
            f"wrote {LARGE_FILES} x {human_bytes(LARGE_SIZE)} + {SMALL_FILES} small files "
            f"through A's mount ({total['blocks']} blocks, {total['operations']} operations)"
        )
    a_blocks = int(total["blocks"])

    if c.real_lan:
        # A slow downlink for B makes "mid-sync" a window of seconds, not of
        # milliseconds, so the kill lands inside it on any machine.
        c.lan.limit_rate(b.host, DOWNLINK_MBIT)
    seen: dict[str, Any] = {}

    def partly_synced() -> bool:
        # A node may sync before it mounts: watch its status from its start.
        status = b.status()
        blocks = int(status["blocks"])
        if blocks >= a_blocks:
            raise HarnessError(
                f"B fetched all {a_blocks} blocks before its status showed it mid-sync "
                "(fewer blocks held than A's); make the volume bigger or B's link slower"
            )
        seen.update(status)
        return blocks > 0

    link = f" over a {DOWNLINK_MBIT} Mbit/s downlink" if c.real_lan else ""
    with c.report.step(f"B started (empty data dir){link} and stored part of the volume") as step:
        started = time.monotonic()
        c.start(b, wait=False)
        c.wait_until(
            partly_synced, "B to show sync progress", timeout=60, nodes=[a, b], interval=0.005
        )
        step.text = (
            f"B started (empty data dir){link} and stored part of the volume: "
            f"{seen['operations']} of {total['operations']} operations, "
            f"{seen['blocks']} of {a_blocks} blocks"
        )
    with c.report.step("B killed (SIGKILL) mid-sync, dead mount cleared"):
        c.kill(b)

    with c.report.step("B restarted on the same data dir, keeping what it had stored") as step:
        c.restart(b)
        kept = b.status()
        step.text = (
            f"B restarted on the same data dir, holding {kept['operations']} operations and "
            f"{kept['blocks']} blocks"
        )
    assert int(kept["blocks"]) >= int(seen["blocks"]), (
        f"B held {seen['blocks']} blocks when killed but only {kept['blocks']} after the restart"
    )
    assert int(kept["operations"]) >= int(seen["operations"]), (
        f"B held {seen['operations']} operations when killed but only {kept['operations']} after the restart"
    )
    with c.report.step("B converged with A") as step:
        tree = c.wait_converged([a, b], timeout=120)
        step.text = f"B converged with A ({len(tree):,} entries, contents verified)"
    c.report.note(
        f"B's whole sync, kill and restart included, took {time.monotonic() - started:.2f} s"
    )

    with c.report.step("B holds every block A holds"):
        c.wait_until(
            lambda: int(b.status()["blocks"]) == a_blocks,
            f"B to hold A's {a_blocks} blocks",
            detail=lambda: f"  B holds {b.status()['blocks']} blocks",
        )
