"""Costs that must not grow with the volume's age or size (issue 9): each test
counts the work one operation does (rows built, transactions), never time."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from crdt.ops import ROOT, Create
from peer.fs.volume import ROOT_INODE
from peer.keys import VolumeKeys
from peer.node import Node
from peer.storage.journal import MERGE_PIECE_OPS
from tests.peer.test_gc import make_node
from tests.peer.test_sync import CALLER, link, running, wait_until


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


def test_folding_re_encodes_each_op_a_bounded_number_of_times(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    # A single member: everything is stable, and each collection may fold.
    node = make_node(tmp_path, "a", keys)
    try:
        batches, per_batch = 12, 1000
        for _ in range(batches):
            _fill_dir(node, per_batch)
            node.collector.collect()
        written = node.journal.folded_ops_written
        total = batches * per_batch
        # Folding every 1,000 entries re-encoded the whole checkpoint each
        # time: 78,000 ops written for 12,000 (6.5 per op, growing with the
        # volume); geometric folds stay under 5 per op at any size.
        assert written <= 5 * total, f"{written} ops re-encoded to fold {total}"
    finally:
        node.close()


def _fill_dir(node: Node, count: int) -> None:
    d = os.urandom(16)
    node.journal.commit(
        lambda stamp: [
            Create(stamp(), d, ROOT, d.hex().encode(), "dir", 0o755, 0, 0),
            *(
                Create(stamp(), os.urandom(16), d, f"f{i:06d}".encode(), "file", 0o644, 0, 0)
                for i in range(count - 1)
            ),
        ]
    )


@pytest.mark.asyncio
async def test_merging_a_peers_checkpoint_lets_the_loop_run_between_pieces(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    full = make_node(tmp_path, "full", keys)
    for _ in range(5):
        _fill_dir(full, 1000)
    full.collector.collect()  # alone: folds all of it
    assert full.store.get_checkpoint() is not None
    fresh = make_node(tmp_path, "fresh", keys)
    # What the fresh node's replica took in between two turns of the loop
    # (where FUSE requests are answered): one piece, never the whole volume.
    steps: list[int] = []

    async def watch() -> None:
        last = fresh.replica.counts()[0]
        while True:
            await asyncio.sleep(0)
            now = fresh.replica.counts()[0]
            steps.append(now - last)
            last = now

    async with running(full, fresh) as (a, b):
        ticker = asyncio.create_task(watch())
        try:
            link(a, b)
            await wait_until(
                lambda: fresh.replica.counts()[1] >= 5000, "the fresh node to merge", 120
            )
        finally:
            ticker.cancel()
    pieces = [s for s in steps if s]
    assert len(pieces) >= 5000 // MERGE_PIECE_OPS - 1, f"merged in {len(pieces)} steps"
    assert max(steps) <= MERGE_PIECE_OPS + 1, f"{max(steps)} ops merged in one step"
