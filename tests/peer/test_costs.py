"""Costs that must not grow with the volume's age or size (issue 9): each test
counts the work one operation does (rows built, transactions), never time."""

from __future__ import annotations

import os
from pathlib import Path

from crdt.ops import ROOT, Create
from peer.keys import VolumeKeys
from peer.node import Node
from peer.volume import ROOT_INODE
from tests.peer.test_gc import make_node
from tests.peer.test_sync import CALLER


def _fill(node: Node, count: int) -> None:
    """`count` empty files in ROOT, made in one commit (as a peer's batch arrives)."""
    node.journal.commit(
        lambda stamp: [
            Create(stamp(), os.urandom(16), ROOT, f"f{i:06d}".encode(), "file", 0o644, 0, 0)
            for i in range(count)
        ]
    )


def _list_in_pages(node: Node, page: int) -> list[bytes]:
    """List ROOT the way the kernel does with a small buffer: `page` rows a call,
    each call starting after the last inode it took."""
    vol = node.volume
    fh = vol.opendir(ROOT_INODE, CALLER)
    names: list[bytes] = []
    after = 0
    try:
        while True:
            taken = 0
            for name, attrs in vol.readdir(fh, after):
                names.append(name)
                after = attrs.inode
                taken += 1
                if taken == page:
                    break
            if taken < page:
                return names
    finally:
        vol.releasedir(fh)


def test_listing_a_directory_in_small_pages_builds_each_row_once(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    node = make_node(tmp_path, "a", keys)
    try:
        _fill(node, 1000)
        before = node.volume.readdir_rows_built
        names = _list_in_pages(node, page=10)
        assert len(names) == 1000
        assert len(set(names)) == 1000
        built = node.volume.readdir_rows_built - before
        # Each page builds its rows (one more: the one that did not fit), not
        # the whole rest of the directory: 1,100, where it was ~50,000.
        assert built <= 1000 + 1000 // 10 + 1, f"{built} rows built for 1000 entries"
    finally:
        node.close()


def test_new_inodes_of_a_listing_take_one_transaction(tmp_path: Path, keys: VolumeKeys) -> None:
    node = make_node(tmp_path, "a", keys)
    try:
        _fill(node, 500)
        before = node.store.commits
        assert len(_list_in_pages(node, page=1000)) == 500
        assert node.store.commits - before == 1, "each new inode took its own transaction"
    finally:
        node.close()
