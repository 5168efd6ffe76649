"""Two real nodes race an editor-style save against an edit in place (issue 9, item 6).

Real nodes in one process (store, journal, volume, sync over HTTP on loopback),
driven through their Volumes as the FUSE adapter drives them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from crdt.clock import Hlc
from crdt.names import conflict_name
from peer.fs.volume import ROOT_INODE
from peer.keys import VolumeKeys
from peer.node import Node
from tests.peer.test_clocks import WallClock, names, open_node
from tests.peer.test_sync import CALLER, link, read_file, running, wait_until, write_file

pytestmark = pytest.mark.asyncio


def save_like_an_editor(node: Node, name: bytes, data: bytes) -> None:
    """Write a temporary file, then rename it over `name` (vim, gedit, ...)."""
    tmp = b"." + name + b".swp"
    write_file(node, tmp, data)
    node.volume.rename(ROOT_INODE, tmp, ROOT_INODE, name, 0)


def edit_in_place(node: Node, name: bytes, data: bytes) -> None:
    vol = node.volume
    fh = vol.open(vol.lookup(ROOT_INODE, name).inode, os.O_RDWR, CALLER)
    vol.write(fh, 0, data)
    vol.release(fh)


@pytest.mark.parametrize("newest", ["edit", "save"])
async def test_an_editor_save_racing_an_edit_in_place_ends_as_two_racing_writes(
    tmp_path: Path, keys: VolumeKeys, newest: str
) -> None:
    wall_a, wall_b = WallClock(), WallClock()
    a, b = open_node(tmp_path, "a", keys, wall_a), open_node(tmp_path, "b", keys, wall_b)
    async with running(a, b) as (sa, sb):
        link(sa, sb)
        write_file(a, b"notes.txt", b"first draft")
        await wait_until(lambda: read_file(b, b"notes.txt") == b"first draft", "B to have it")
        now = wall_a()
        wall_a.ms, wall_b.ms = (
            (now + 1000, now + 2000) if newest == "edit" else (now + 2000, now + 1000)
        )
        # Both happen before either node hears of the other (no await between).
        save_like_an_editor(a, b"notes.txt", b"saved by A")
        edit_in_place(b, b"notes.txt", b"EDITED BY B")
        winner, loser = (
            (b"EDITED BY B", b"saved by A")
            if newest == "edit"
            else (
                b"saved by A",
                b"EDITED BY B",
            )
        )
        loser_node, loser_ms = ("a", wall_a.ms) if newest == "edit" else ("b", wall_b.ms)
        copy = conflict_name(b"notes.txt", loser_node, Hlc(loser_ms, 0, b""))
        for node in (a, b):
            try:
                await wait_until(
                    lambda node=node: names(node) == sorted([b"notes.txt", copy]),  # type: ignore[misc]
                    f"{node.config.name} to show the file and its conflict copy",
                )
            except AssertionError:
                raise AssertionError(f"{node.config.name} shows {names(node)}") from None
            assert read_file(node, b"notes.txt") == winner
            assert read_file(node, copy) == loser
        assert a.replica.snapshot() == b.replica.snapshot()
