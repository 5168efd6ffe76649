"""A block no peer has, seen through real mounts of real `dfs-peer` processes:
only reads of what it holds fail, with EIO, until a peer has it (issue 9, item 4)."""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from crdt.ops import BLOCK_SIZE
from peer.keys import VolumeKeys
from peer.sealing import block_id
from peer.secret import parse_secret
from scenarios.harness import NodeProcess, free_port, wait_for

pytestmark = pytest.mark.mount


def read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def test_a_lost_block_fails_only_its_range_with_eio_until_a_peer_has_it(
    make_node: Callable[..., NodeProcess], secret_text: str
) -> None:
    keys = VolumeKeys.from_root(parse_secret(secret_text))
    pa, pb, pc = free_port(), free_port(), free_port()
    a = make_node("a", ["--listen", f"127.0.0.1:{pa}", "--peer", f"127.0.0.1:{pc}"])
    c = make_node("c", ["--listen", f"127.0.0.1:{pc}", "--peer", f"127.0.0.1:{pa}"])
    a.start(wait=False)
    c.start()
    a.wait_mounted()
    payload = os.urandom(2 * BLOCK_SIZE + 1000)
    (a.mountpoint / "lost.bin").write_bytes(payload)
    wait_for(lambda: read(c.mountpoint / "lost.bin") == payload, 20, "C to copy the file")
    c.stop()
    a.stop()
    # A loses the first block of the file; C, which has it, stays away.
    with sqlite3.connect(a.data_dir / "volume.db") as db:
        gone = db.execute(
            "DELETE FROM blocks WHERE id = ?", (block_id(keys, payload[:BLOCK_SIZE]),)
        )
        assert gone.rowcount == 1
    db.close()
    b = make_node("b", ["--listen", f"127.0.0.1:{pb}", "--peer", f"127.0.0.1:{pa}"])
    a.start(wait=False)
    b.start()
    a.wait_mounted()
    (a.mountpoint / "after.txt").write_bytes(b"written after the loss")
    wait_for(lambda: read(b.mountpoint / "after.txt") is not None, 20, "B to merge past it")
    assert b.status()["blocks_wanted"] == 1
    with open(b.mountpoint / "lost.bin", "rb", buffering=0) as f:
        with pytest.raises(OSError, match="Input/output error") as caught:
            f.read(100)
        assert caught.value.errno == errno.EIO
        f.seek(BLOCK_SIZE)
        assert f.read() == payload[BLOCK_SIZE:]
    # C comes back, and this time also knows B: B fetches the block by itself.
    c.extra += ["--peer", f"127.0.0.1:{pb}"]
    c.start()
    wait_for(lambda: b.status()["blocks_wanted"] == 0, 30, "B to fetch the wanted block")
    assert read(b.mountpoint / "lost.bin") == payload
