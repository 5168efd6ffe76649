"""What a copy of the data dir shows, and who on the machine may read it."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from crdt.ops import BLOCK_SIZE
from peer.errors import CorruptBlock
from peer.identity import load_or_create
from peer.keys import VolumeKeys
from peer.node import DB_NAME, Node, NodeConfig
from peer.sealing import (
    OVERHEAD,
    PAD_MIN,
    block_id,
    open_block,
    padded_size,
    seal,
    seal_block,
)
from tests.peer.test_sync import write_file


def modes(data: Path) -> dict[str, str]:
    return {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in data.iterdir() if p.is_file()}


def test_data_dir_is_owner_only_even_when_it_was_not(tmp_path: Path, keys: VolumeKeys) -> None:
    old = os.umask(0o022)
    try:
        data = tmp_path / "data"
        data.mkdir(mode=0o755)
        os.chmod(data, 0o755)
        # What an older version left: a readable store with its WAL beside it.
        conn = sqlite3.connect(data / DB_NAME)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.close()
        (data / "peers").write_bytes(b"")
        assert modes(data)[DB_NAME] == "0o644"
        config = NodeConfig(mountpoint=tmp_path / "mnt", data_dir=data, name="a", mdns=False)
        node = Node(config, keys, load_or_create(data))
        node.start()
        write_file(node, b"f", b"data")
        assert (data / f"{DB_NAME}-wal").exists()
        assert (data / f"{DB_NAME}-shm").exists()
        assert oct(stat.S_IMODE(data.stat().st_mode)) == "0o700"
        found = modes(data)
        node.close()
        assert found
        assert all(m == "0o600" for m in found.values()), found
    finally:
        os.umask(old)


def test_a_new_store_and_its_wal_are_owner_only(tmp_path: Path, keys: VolumeKeys) -> None:
    old = os.umask(0o022)
    try:
        data = tmp_path / "data"
        data.mkdir()
        config = NodeConfig(mountpoint=tmp_path / "mnt", data_dir=data, name="a", mdns=False)
        node = Node(config, keys, load_or_create(data))
        node.start()
        write_file(node, b"f", b"data")
        found = modes(data)
        node.close()
        assert all(m == "0o600" for m in found.values()), found
        assert f"{DB_NAME}-wal" in found
    finally:
        os.umask(old)


# -- sizes -------------------------------------------------------------------------

LENGTHS = [0, 1, 100, 255, 256, 1000, 1500, 4095, 4096, 70_000, BLOCK_SIZE - 1, BLOCK_SIZE]


def test_a_sealed_block_shows_only_its_size_class() -> None:
    keys = VolumeKeys.from_root(b"\x05" * 32)
    classes = {PAD_MIN << k for k in range(10)} | {BLOCK_SIZE + 1}
    for n in LENGTHS:
        plaintext = os.urandom(n)
        bid, sealed = seal_block(keys, plaintext)
        assert bid == block_id(keys, plaintext), "the id is the hash of the unpadded plaintext"
        assert len(sealed) - OVERHEAD in classes, (n, len(sealed))
        assert len(sealed) - OVERHEAD == padded_size(n) >= n + 1
        assert open_block(keys, bid, sealed) == plaintext
    # Sizes within a class look alike.
    assert len(seal_block(keys, b"a" * 1100)[1]) == len(seal_block(keys, b"b" * 1900)[1])
    # Plaintexts that end in what padding looks like still round-trip.
    for tail in (b"\x80", b"\x00", b"\x80\x00\x00", b""):
        bid, sealed = seal_block(keys, b"data" + tail)
        assert open_block(keys, bid, sealed) == b"data" + tail


def test_blocks_sealed_before_padding_still_open() -> None:
    keys = VolumeKeys.from_root(b"\x05" * 32)
    plaintext = b"written by an older version"
    bid = block_id(keys, plaintext)
    old = seal(keys.blocks, plaintext, bid)  # format 1: no padding
    assert old[0] == 1
    assert open_block(keys, bid, old) == plaintext


def test_a_padded_block_cannot_pass_for_an_old_one() -> None:
    keys = VolumeKeys.from_root(b"\x05" * 32)
    bid, sealed = seal_block(keys, b"padded")
    assert sealed[0] == 2
    with pytest.raises(CorruptBlock):
        open_block(keys, bid, b"\x01" + sealed[1:])


def test_file_sizes_on_disk_show_only_coarsely(tmp_path: Path, keys: VolumeKeys) -> None:
    data = tmp_path / "data"
    data.mkdir()
    config = NodeConfig(mountpoint=tmp_path / "mnt", data_dir=data, name="a", mdns=False)
    node = Node(config, keys, load_or_create(data))
    node.start()
    try:
        write_file(node, b"small", os.urandom(1100))
        before = node.store.stats().block_bytes
        write_file(node, b"bigger", os.urandom(1900))
        assert node.store.stats().block_bytes - before == padded_size(1100) + OVERHEAD
    finally:
        node.close()
