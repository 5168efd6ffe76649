"""POSIX details of `peer.fs.volume.Volume` checked without a mount: the errno a
call must give, and what a call leaves in the merged state."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fuse.errors import Exists, InvalidArgument, IsADirectory, NotPermitted, Retry, Unsupported
from peer.fs.volume import ROOT_INODE
from peer.keys import VolumeKeys
from peer.node import Node
from tests.peer.test_sync import CALLER, list_names, make_node, read_file, write_file

KEEP_SIZE, PUNCH_HOLE, COLLAPSE_RANGE, ZERO_RANGE = 0x01, 0x02, 0x08, 0x10


@pytest.fixture
def node(tmp_path: Path, keys: VolumeKeys) -> Iterator[Node]:
    made = make_node(tmp_path, "a", keys)
    try:
        yield made
    finally:
        made.close()


def test_link_onto_an_existing_name_is_eexist_before_eperm(node: Node) -> None:
    write_file(node, b"a", b"A")
    write_file(node, b"b", b"B")
    inode = node.volume.lookup(ROOT_INODE, b"a").inode
    with pytest.raises(Exists):
        node.volume.link(inode, ROOT_INODE, b"b")
    with pytest.raises(NotPermitted):
        node.volume.link(inode, ROOT_INODE, b"c")
    assert list_names(node) == [b"a", b"b"]


def test_fallocate_modes_and_their_refusals(node: Node) -> None:
    vol = node.volume
    data = bytearray(os.urandom(3 * 128 * 1024 + 5))
    write_file(node, b"f", bytes(data))
    inode = vol.lookup(ROOT_INODE, b"f").inode
    for mode in (COLLAPSE_RANGE, PUNCH_HOLE, PUNCH_HOLE | ZERO_RANGE):  # PUNCH needs KEEP_SIZE
        with pytest.raises(Unsupported):
            vol.fallocate(inode, mode, 0, 10)
    with pytest.raises(InvalidArgument):
        vol.fallocate(inode, 0, 0, 0)
    vol.mkdir(ROOT_INODE, b"d", 0o755, CALLER)
    with pytest.raises(IsADirectory):
        vol.fallocate(vol.lookup(ROOT_INODE, b"d").inode, 0, 0, 10)
    # Punch the middle block whole and a range across two others; the whole
    # block becomes a hole in the version's block map.
    vol.fallocate(inode, PUNCH_HOLE | KEEP_SIZE, 128 * 1024, 128 * 1024)
    vol.fallocate(inode, PUNCH_HOLE | KEEP_SIZE, 100, 10)
    vol.fallocate(inode, ZERO_RANGE | KEEP_SIZE, 3 * 128 * 1024 - 1, 100)  # past the end: kept
    data[128 * 1024 : 256 * 1024] = bytes(128 * 1024)
    data[100:110] = bytes(10)
    data[3 * 128 * 1024 - 1 :] = bytes(6)
    assert read_file(node, b"f") == bytes(data)
    version = node.replica.contents.shown(vol.entry_of(inode))
    assert version is not None
    assert 1 not in node.replica.block_map(version)
    blocks = node.store.stats().blocks
    vol.fallocate(inode, 0, 0, 1 << 30)  # a reservation is a hole, not an allocation
    assert vol.getattr(inode).size == 1 << 30
    assert node.store.stats().blocks == blocks


@pytest.mark.asyncio
async def test_blocks_a_read_needs_are_opened_ahead_and_a_corrupt_one_is_met_by_the_read(
    node: Node, expect_logs: Callable[..., None]
) -> None:
    """`load_for_read` (a worker thread) opens the stored blocks of a range into
    the cache; one that does not open is left out, and the read then meets it
    as before: removed from the store and asked of peers."""
    expect_logs("corrupt block", level=logging.ERROR, logger="peer.blocks")
    expect_logs("unreadable here", logger="peer.volume")
    vol = node.volume
    block = 128 * 1024
    data = os.urandom(4 * block)
    write_file(node, b"f", data)
    inode = vol.lookup(ROOT_INODE, b"f").inode
    version = node.replica.contents.shown(vol.entry_of(inode))
    assert version is not None
    ids = [node.replica.block_map(version)[i] for i in range(4)]
    node.blocks.cache = type(node.blocks.cache)()  # as after a restart: nothing cached
    fh = vol.open(inode, os.O_RDONLY, CALLER)
    try:
        assert vol.blocks_to_open(fh, block - 1, 2) == ids[0:2]
        await vol.load_for_read(fh, block - 1, 2)
        assert [node.blocks.cached(b) for b in ids] == [True, True, False, False]
        assert vol.blocks_to_open(fh, 0, 4 * block) == ids[2:]
        assert vol.read(fh, 0, 2 * block) == data[: 2 * block]

        with node.store.transaction():  # a block rots on disk
            node.store._conn.execute(
                "UPDATE blocks SET sealed = ? WHERE id = ?", (os.urandom(block + 40), ids[3])
            )
        await vol.load_for_read(fh, 2 * block, 2 * block)
        assert [node.blocks.cached(b) for b in ids[2:]] == [True, False]
        assert vol.read(fh, 2 * block, block) == data[2 * block : 3 * block]
        with pytest.raises(Retry):
            vol.read(fh, 3 * block, block)
        assert node.store.get_block(ids[3]) is None
    finally:
        vol.release(fh)
