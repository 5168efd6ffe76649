"""What a copy of the data dir shows, and who on the machine may read it."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

from peer.identity import load_or_create
from peer.keys import VolumeKeys
from peer.node import DB_NAME, Node, NodeConfig
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
