"""Clocks are state, and wall clocks are advice (issue 9, items 1-3).

Real nodes in one process (store, journal, volume, sync over HTTP on loopback),
each reading a wall clock the test sets, as a machine whose clock is stepped
back, or set years ahead, would.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from peer.identity import load_or_create
from peer.keys import VolumeKeys
from peer.node import Node, NodeConfig
from peer.volume import ROOT_INODE
from tests.peer.test_sync import CALLER, read_file, write_file

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
