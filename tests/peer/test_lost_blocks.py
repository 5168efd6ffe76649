"""A block no peer has costs only the reads of what it holds (issue 9, item 4).

Real nodes in one process (store, journal, volume, sync over HTTP on loopback),
driven through their Volumes as the FUSE adapter drives them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from crdt.ops import BLOCK_SIZE, ROOT
from fuse.errors import Retry
from peer.fs.volume import ROOT_INODE
from peer.identity import load_or_create
from peer.keys import VolumeKeys
from peer.node import Node, NodeConfig
from tests.peer.test_sync import CALLER, link, read_file, running, wait_until, write_file

pytestmark = pytest.mark.asyncio


def open_node(tmp: Path, name: str, keys: VolumeKeys) -> Node:
    """A node on `name`'s data dir, made if new, reopened if not."""
    data = tmp / f"{name}-data"
    data.mkdir(exist_ok=True)
    config = NodeConfig(mountpoint=tmp / f"{name}-mnt", data_dir=data, name=name, mdns=False)
    node = Node(config, keys, load_or_create(data))
    node.start()
    return node


def read_range(node: Node, name: bytes, offset: int, size: int) -> bytes:
    vol = node.volume
    attrs = vol.lookup(ROOT_INODE, name)
    fh = vol.open(attrs.inode, os.O_RDONLY, CALLER)
    try:
        return vol.read(fh, offset, size)
    finally:
        vol.release(fh)


def first_block(node: Node, name: bytes) -> bytes:
    entry = node.replica.lookup(ROOT, name)
    assert entry is not None
    version = node.replica.contents.shown(entry)
    assert version is not None
    return node.replica.block_map(version)[0]


async def test_a_block_no_peer_has_fails_only_its_reads_and_is_fetched_once_a_peer_has_it(
    tmp_path: Path, keys: VolumeKeys, expect_logs: Callable[..., None]
) -> None:
    expect_logs("merged operations without 1 block", logger="peer.sync")
    expect_logs("unreadable here", logger="peer.volume")
    payload = os.urandom(2 * BLOCK_SIZE + 1000)
    # C copies A's files, then goes away; A then loses one block of lost.bin.
    a, c = open_node(tmp_path, "a", keys), open_node(tmp_path, "c", keys)
    async with running(a, c) as (sa, sc):
        link(sa, sc)
        write_file(a, b"lost.bin", payload)
        write_file(a, b"before.txt", b"written before")
        await wait_until(lambda: read_file(c, b"lost.bin") == payload, "C to copy A's files")
        await wait_until(lambda: c.journal.vv == a.journal.vv, "C to hold A's log")
    a = open_node(tmp_path, "a", keys)
    lost = first_block(a, b"lost.bin")
    with a.store.transaction():
        assert a.store.delete_block(lost)
    b = open_node(tmp_path, "b", keys)
    async with running(a, b) as (sa, sb):
        link(sa, sb)
        write_file(a, b"after.txt", b"written after the loss")
        # B merges everything, the operations of the lost block's file included.
        await wait_until(lambda: read_file(b, b"after.txt") is not None, "B to merge past it")
        await wait_until(lambda: b.journal.vv == a.journal.vv, "B to hold all of A's log")
        write_file(b, b"from-b.txt", b"B goes on writing")
        await wait_until(lambda: read_file(a, b"from-b.txt") is not None, "A to get B's file")
        assert read_file(b, b"before.txt") == b"written before"
        assert b.statistics().blocks_wanted == 1
        assert b.store.wanted_blocks() == [lost]
        # Only the lost range fails (EIO once no peer can give it); the rest reads.
        with pytest.raises(Retry) as caught:
            read_range(b, b"lost.bin", 0, 100)
        assert not await caught.value.wait()
        assert read_range(b, b"lost.bin", BLOCK_SIZE, BLOCK_SIZE + 1000) == payload[BLOCK_SIZE:]
        # A fresh node joins through B and gets everything but that block.
        d = open_node(tmp_path, "d", keys)
        async with running(d) as (sd,):
            link(sd, sb)
            await wait_until(lambda: d.journal.vv == b.journal.vv, "D to join")
            assert read_file(d, b"after.txt") == b"written after the loss"
            assert d.statistics().blocks_wanted == 1
            # C, which kept the block, comes back: B and D fetch it in the background.
            c = open_node(tmp_path, "c", keys)
            async with running(c) as (sc,):
                link(sc, sb)
                link(sc, sd)
                await wait_until(lambda: b.statistics().blocks_wanted == 0, "B to fetch it")
                await wait_until(lambda: d.statistics().blocks_wanted == 0, "D to fetch it")
                assert read_file(b, b"lost.bin") == payload
                assert read_file(d, b"lost.bin") == payload
    # The table of wanted blocks is kept in the store: it was empty at the end.
    b = open_node(tmp_path, "b", keys)
    assert b.store.wanted_blocks() == []
    b.close()


async def test_wanted_blocks_survive_a_restart(
    tmp_path: Path, keys: VolumeKeys, expect_logs: Callable[..., None]
) -> None:
    expect_logs("merged operations without 1 block", logger="peer.sync")
    a = open_node(tmp_path, "a", keys)
    payload = os.urandom(BLOCK_SIZE)
    write_file(a, b"f", payload)
    with a.store.transaction():
        a.store.delete_block(first_block(a, b"f"))
    b = open_node(tmp_path, "b", keys)
    async with running(a, b) as (sa, sb):
        link(sa, sb)
        await wait_until(lambda: b.journal.vv == a.journal.vv, "B to merge A's log")
        assert sb.statistics().blocks_wanted == 1
    b = open_node(tmp_path, "b", keys)
    assert b.statistics().blocks_wanted == 1
    b.close()
