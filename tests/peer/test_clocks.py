"""Clocks are state, and wall clocks are advice (issue 9, items 1-3).

Real nodes in one process (store, journal, volume, sync over HTTP on loopback),
each reading a wall clock the test sets, as a machine whose clock is stepped
back, or set years ahead, would.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from crdt.clock import Clock
from peer.fs.volume import ROOT_INODE
from peer.identity import load_or_create
from peer.keys import VolumeKeys
from peer.node import Node, NodeConfig
from tests.peer.test_sync import (
    CALLER,
    link,
    list_names,
    read_file,
    running,
    wait_until,
    write_file,
)

pytestmark = pytest.mark.asyncio

HOUR_MS = 3_600_000
MINUTE_MS = 60_000


class WallClock:
    """A wall clock a test sets; real time unless told otherwise."""

    def __init__(self) -> None:
        self.ms: int | None = None

    def __call__(self) -> int:
        return self.ms if self.ms is not None else time.time_ns() // 1_000_000


def open_node(tmp: Path, name: str, keys: VolumeKeys, wall: WallClock | None = None) -> Node:
    """A node on `name`'s data dir (made if new), started with `wall` as its clock."""
    data = tmp / f"{name}-data"
    data.mkdir(exist_ok=True)
    config = NodeConfig(mountpoint=tmp / f"{name}-mnt", data_dir=data, name=name, mdns=False)
    node = Node(config, keys, load_or_create(data))
    if wall is not None:
        node.journal._now = wall
    node.start()
    return node


def mode_of(node: Node, name: bytes) -> int:
    return node.volume.lookup(ROOT_INODE, name).mode


async def test_a_restart_after_the_wall_clock_stepped_back_neither_reorders_nor_repeats(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    wall = WallClock()
    ahead = wall() + HOUR_MS  # the clock before NTP stepped it back
    wall.ms = ahead
    a = open_node(tmp_path, "a", keys, wall)
    write_file(a, b"notes.txt", b"secret")
    a.volume.setattr(a.volume.lookup(ROOT_INODE, b"notes.txt").inode, mode=0o600)
    before = a.journal.clock.last()
    a.close()

    wall.ms = ahead - 10 * MINUTE_MS  # stepped back, further than any forward bound
    a = open_node(tmp_path, "a", keys, wall)
    a.volume.setattr(a.volume.lookup(ROOT_INODE, b"notes.txt").inode, mode=0o644)
    assert mode_of(a, b"notes.txt") == 0o644, "the chmod after the restart lost to the one before"
    # Wall time reaches the old stamps: no stamp may be handed out twice.
    wall.ms = ahead
    write_file(a, b"new.txt", b"made after the restart")
    assert read_file(a, b"new.txt") == b"made after the restart"
    assert a.journal.clock.last() > before
    a.close()

    # The same state after one more restart (replay from the store).
    wall.ms = None
    a = open_node(tmp_path, "a", keys, wall)
    assert mode_of(a, b"notes.txt") == 0o644
    assert read_file(a, b"new.txt") == b"made after the restart"
    fh = a.volume.create(ROOT_INODE, b"later.txt", 0o644, os.O_RDWR, CALLER)[0]
    a.volume.release(fh)
    a.close()


async def test_own_stamps_folded_into_a_checkpoint_still_restore_the_clock(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    wall = WallClock()
    ahead = wall() + HOUR_MS
    wall.ms = ahead
    a = open_node(tmp_path, "a", keys, wall)
    write_file(a, b"f", b"x")
    inode = a.volume.lookup(ROOT_INODE, b"f").inode
    a.volume.setattr(inode, mode=0o600)
    a.volume.setattr(inode, mode=0o640)  # overrides the chmod before: folding drops that one
    newest = a.journal.clock.last()
    assert a.journal.fold(dict(a.journal.vv), min_entries=1) > 0
    a.close()
    wall.ms = ahead - 10 * MINUTE_MS
    a = open_node(tmp_path, "a", keys, wall)
    assert a.journal.clock.last() >= newest
    a.volume.setattr(inode, mode=0o644)
    assert mode_of(a, b"f") == 0o644
    a.close()


YEAR_MS = 365 * 24 * HOUR_MS


def names(node: Node) -> list[bytes]:
    return list_names(node)


async def test_an_operation_stamped_years_ahead_is_refused_and_mv_rm_work(
    tmp_path: Path, keys: VolumeKeys, expect_logs: Callable[..., None]
) -> None:
    expect_logs(r"refused operations of node .* \(b\) from peer .*ahead", logger="peer.journal")
    wall_a = WallClock()
    future = WallClock()
    a = open_node(tmp_path, "a", keys, wall_a)
    b = open_node(tmp_path, "b", keys, future)
    c = open_node(tmp_path, "c", keys)
    async with running(a, b, c) as (sa, sb, sc):
        link(sa, sb)
        link(sb, sc)  # C's operations reach A only through B
        write_file(a, b"notes.txt", b"from a")
        await wait_until(lambda: read_file(b, b"notes.txt") == b"from a", "B to get A's file")
        # B's clock jumps 10 years ahead; B renames the file.
        future.ms = wall_a() + 10 * YEAR_MS
        b.volume.rename(ROOT_INODE, b"notes.txt", ROOT_INODE, b"pinned.txt", 0)
        write_file(c, b"from-c.txt", b"C goes on")
        await wait_until(lambda: read_file(a, b"from-c.txt") == b"C goes on", "A to get C's file")
        await wait_until(lambda: sa.statistics().operations_behind == 0, "A's round to end")
        assert names(a) == [b"from-c.txt", b"notes.txt"]
        assert b.identity.node_id in a.journal.refused
        status = a.statistics()
        assert list(status.entries_refused) == [b.identity.node_id.hex()]
        assert any("refused" in (p.last_error or "") for p in status.peers)
        assert status.sync["operations_behind"] == 0
        # What A's user does to the file takes effect.
        a.volume.rename(ROOT_INODE, b"notes.txt", ROOT_INODE, b"moved.txt", 0)
        assert names(a) == [b"from-c.txt", b"moved.txt"]
        a.volume.unlink(ROOT_INODE, b"moved.txt")
        assert names(a) == [b"from-c.txt"]
        await wait_until(lambda: read_file(c, b"moved.txt") is None, "C to see A's delete")
        # Ten years later A takes B's operations (the rename then sorts last).
        wall_a.ms = future.ms
        write_file(b, b"later.txt", b"B again")
        await wait_until(lambda: read_file(a, b"later.txt") == b"B again", "A to take B's ops")
        assert a.journal.refused == {}
        assert a.journal.vv == b.journal.vv


async def test_an_entry_whose_stamp_repeats_its_nodes_previous_is_refused(
    tmp_path: Path, keys: VolumeKeys, expect_logs: Callable[..., None]
) -> None:
    expect_logs(r"refused operations of node .* \(b\) from peer .*not above", logger="peer.journal")
    wall = WallClock()
    wall.ms = wall()  # B's wall clock stands still
    a, b = open_node(tmp_path, "a", keys), open_node(tmp_path, "b", keys, wall)
    write_file(b, b"f", b"x")
    inode = b.volume.lookup(ROOT_INODE, b"f").inode
    before = b.journal.clock.last()
    b.volume.setattr(inode, mode=0o600)
    # B's clock forgets its state (as before it was restored at start) and
    # stamps the next chmod exactly as the one before.
    b.journal.clock = Clock(b.identity.node_id, before)
    b.volume.setattr(inode, mode=0o777)
    write_file(b, b"g", b"after the faulty entry")
    async with running(a, b) as (sa, sb):
        link(sa, sb)
        await wait_until(lambda: read_file(a, b"f") == b"x", "A to get B's file")
        await wait_until(lambda: sa.statistics().operations_behind == 0, "A's round to end")
        live = a.replica.snapshot()
        status = a.statistics()
    # Folding the log into a checkpoint and replaying it shows the same.
    a = open_node(tmp_path, "a", keys)
    assert a.journal.fold(dict(a.journal.vv), min_entries=1) > 0
    a.close()
    a = open_node(tmp_path, "a", keys)
    assert a.replica.snapshot() == live, "replay of the checkpoint differs from the merge"
    assert mode_of(a, b"f") == 0o600
    assert read_file(a, b"g") is None  # B's log is faulty from there on
    assert list(status.entries_refused) == [b.identity.node_id.hex()]
    a.close()
