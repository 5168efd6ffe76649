"""Costs that must not grow with the volume's age or size (issue 9): each test
counts the work one operation does (rows built, transactions), never time."""

from __future__ import annotations

import asyncio
import os
import threading
import tracemalloc
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from crdt.merge import Changes, Replica
from crdt.ops import BLOCK_SIZE, ROOT, Create, Forget, Op
from peer import node as node_module
from peer.fs.volume import ROOT_INODE, Volume
from peer.keys import VolumeKeys
from peer.net import client as client_module
from peer.net import fetching, wire
from peer.node import Node
from peer.storage import journal as journal_module
from peer.storage.journal import MERGE_PIECE_OPS
from tests.peer.test_gc import make_node
from tests.peer.test_sync import CALLER, link, read_file, running, wait_until, write_file


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


def test_a_file_extracted_the_way_tar_does_takes_one_transaction_per_call(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    """A create is one transaction (the op with its new inode number, which
    was a second one); an mtime set on a file with buffered writes (tar, cp
    -p, rsync) commits the write and the mtime together (it was two)."""
    node = make_node(tmp_path, "a", keys)
    vol = node.volume
    try:
        before = node.store.commits
        fh, attrs = vol.create(ROOT_INODE, b"f.py", 0o600, os.O_WRONLY, CALLER)
        assert node.store.commits - before == 1
        assert vol.lookup(ROOT_INODE, b"f.py").inode == attrs.inode
        vol.write(fh, 0, b"print('hi')\n")
        before = node.store.commits
        mtime = 1_700_000_000 * 10**9
        vol.setattr(attrs.inode, mtime_ns=mtime, fh=fh, caller=CALLER)
        assert node.store.commits - before == 1
        vol.flush(fh)
        vol.release(fh)
        assert node.store.commits - before == 1, "the close found something left to write"
        got = vol.getattr(attrs.inode)
        assert (got.size, got.mtime_ns) == (12, mtime)
        assert read_file(node, b"f.py") == b"print('hi')\n"
    finally:
        node.close()
    # The inode number was stored with the create: a restart finds it.
    node = make_node(tmp_path, "a", keys)
    try:
        assert node.volume.lookup(ROOT_INODE, b"f.py").inode == attrs.inode
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


def _folded(tmp_path: Path, keys: VolumeKeys, dirs: int) -> Node:
    """A node holding `dirs` directories of 1,000 files, all folded into its checkpoint."""
    full = make_node(tmp_path, "full", keys)
    for _ in range(dirs):
        _fill_dir(full, 1000)
    full.collector.collect()  # alone: folds all of it
    assert full.store.get_checkpoint() is not None
    return full


@pytest.mark.asyncio
async def test_merging_a_peers_checkpoint_lets_the_loop_run_between_pieces(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    full = _folded(tmp_path, keys, 5)
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


@pytest.mark.asyncio
async def test_after_a_fold_or_an_adoption_stability_decodes_no_checkpoint(
    tmp_path: Path, keys: VolumeKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = _folded(tmp_path, keys, 3)
    own = full.identity.node_id
    newest = full.journal.tops[own]
    fresh = make_node(tmp_path, "fresh", keys)
    async with running(full, fresh) as (a, b):
        link(a, b)
        await wait_until(
            lambda: fresh.store.get_checkpoint() is not None and fresh.replica.counts()[1] >= 3000,
            "the fresh node to adopt the checkpoint",
            120,
        )

        def decode(*args: object, **kwargs: object) -> None:
            raise AssertionError("the whole checkpoint was decoded to learn its newest stamps")

        # Stability asks for the stamp of a node's last folded entry after
        # each fold or adoption: that decoded the whole checkpoint on the loop
        # (2.7 s at 20,000 files; in a 100,000-file catch-up `status` went
        # unanswered for 10 s).
        monkeypatch.setattr(journal_module, "open_checkpoint", decode)
        assert full.journal.folded_stamp(own) == newest
        assert fresh.journal.folded_stamp(own) == newest


@pytest.mark.asyncio
async def test_enforcing_a_forget_rebuilds_the_replica_off_the_loop(
    tmp_path: Path,
    keys: VolumeKeys,
    monkeypatch: pytest.MonkeyPatch,
    expect_logs: Callable[..., None],
) -> None:
    expect_logs("dropped 2 operation", logger="peer.journal")
    a, c = make_node(tmp_path, "a", keys), make_node(tmp_path, "c", keys)
    c_id = c.identity.node_id
    forgetting: asyncio.Task[None] | None = None
    try:
        for _ in range(3):
            _fill_dir(a, 1000)  # what a rebuild replays
        write_file(c, b"x", b"1")
        blocks = [(bid, c.store.get_block(bid) or b"") for bid in c.store.block_ids()]
        a.journal.merge_remote(list(c.store.iter_log()), blocks=blocks)
        assert read_file(a, b"x") == b"1"
        forgetting = asyncio.create_task(a.enforce_forgets())  # as the running node does
        await asyncio.sleep(0)

        loop_thread = threading.get_ident()
        on_loop = 0
        apply = Replica.apply

        def counted(self: Replica, ops: Iterable[Op]) -> Changes:
            nonlocal on_loop
            ops = list(ops)
            if threading.get_ident() == loop_thread:
                on_loop += len(ops)
            return apply(self, ops)

        monkeypatch.setattr(Replica, "apply", counted)
        # Forgotten after its Member op (seq 1), before its write: a merged
        # the write, so its replica is rebuilt without it (a full replay).
        a.journal.commit(lambda stamp: [Forget(stamp(), c_id, 1)])
        await wait_until(lambda: read_file(a, b"x") is None, "the forget to be enforced", 60)
        assert a.journal.vv[c_id] == 1
        assert a.replica.counts()[1] >= 3000, "the rebuilt replica lost the volume"
        # The loop merged the Forget itself, not the 3,000-op replay.
        assert on_loop <= MERGE_PIECE_OPS, f"{on_loop} ops merged on the loop"
    finally:
        if forgetting is not None:
            forgetting.cancel()
        a.close()
        c.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("folded", [True, False], ids=["checkpoint", "log"])
async def test_a_fresh_node_catching_up_never_holds_all_the_blocks_in_memory(
    tmp_path: Path, keys: VolumeKeys, monkeypatch: pytest.MonkeyPatch, folded: bool
) -> None:
    # The blocks a checkpoint's files need can be the whole volume: a fresh
    # node kept all of them in memory until it stored them in one go (RSS of
    # ~200 MiB after catching up 208 MiB); from the log, up to 64 MiB a piece.
    # Small requests make what is in flight small, so the bound below
    # measures what the node keeps.
    monkeypatch.setattr(wire, "BLOCKS_PER_REQUEST", 4)
    size = 24 << 20
    full = _three_big_files(tmp_path, keys, size)
    if folded:
        _fill(full, 1200)  # enough entries for a fold
        full.collector.collect()
    assert (full.store.get_checkpoint() is not None) == folded
    fresh = make_node(tmp_path, "fresh", keys)
    peak = await _peak_until(
        full,
        fresh,
        lambda: (
            fresh.replica.counts()[0] >= full.replica.counts()[0]
            and len(fresh.store.block_ids()) >= size // BLOCK_SIZE
        ),
        "the fresh node to merge and hold every block",
    )
    assert peak < size // 2, f"peak {peak / 2**20:.1f} MiB of Python memory for {size >> 20} MiB"


def _three_big_files(tmp_path: Path, keys: VolumeKeys, size: int) -> Node:
    """A node holding three files of `size` bytes in all."""
    full = make_node(tmp_path, "full", keys)
    for i in range(3):
        write_file(full, f"big{i}".encode(), os.urandom(size // 3))
    return full


async def _peak_until(full: Node, fresh: Node, done: Callable[[], bool], what: str) -> int:
    """The peak of Python memory (both nodes, in this process) from linking
    `fresh` to `full` until `done()`."""
    tracemalloc.start()
    try:
        async with running(full, fresh) as (a, b):
            link(a, b)
            await wait_until(done, what, 120)
            return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.asyncio
async def test_blocks_in_flight_during_a_catch_up_stay_a_few_mib(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    # Each answer to /blocks is held a few times over while it is read, its
    # MAC checked and decoded, and four are in flight: with 64-block (8 MiB)
    # answers, a catch-up of 24 MiB peaked at 57 MiB of Python memory (a
    # 208 MiB one at 109-112 MiB resident); the node asks 16 blocks at a time.
    size = 24 << 20
    full = _three_big_files(tmp_path, keys, size)
    fresh = make_node(tmp_path, "fresh", keys)
    peak = await _peak_until(
        full,
        fresh,
        lambda: len(fresh.store.block_ids()) >= size // BLOCK_SIZE,
        "the fresh node to hold every block",
    )
    # 4 answers of 16 blocks are 8 MiB in flight: measured 20 MiB at the peak
    # (57 MiB with 64-block answers).
    assert peak < 32 << 20, (
        f"peak {peak / 2**20:.1f} MiB of Python memory, {fetching.FETCH_BLOCKS} blocks an answer"
    )


@pytest.mark.asyncio
async def test_after_merging_a_peers_checkpoint_the_kernel_is_told_a_piece_at_a_time(
    tmp_path: Path, keys: VolumeKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = _folded(tmp_path, keys, 3)
    fresh = make_node(tmp_path, "fresh", keys)
    monkeypatch.setattr(node_module, "REMOTE_CHANGED_PIECE", 500)
    invalidated: list[int] = []

    class Kernel:
        async def invalidate(self, inodes: Iterable[int], entries: Iterable[object]) -> None:
            invalidated.extend(inodes)

    fresh.operations = Kernel()  # type: ignore[assignment]  # as if mounted
    # What the volume looked at in one turn of the loop: after a checkpoint's
    # merge, every entry of the volume changed (~100 ms of the loop at
    # 100,000 files, while stat on the mount waited).
    looked: list[int] = []
    remote_changed = Volume.remote_changed

    def counted(self: Volume, changes: Changes) -> tuple[list[int], list[tuple[int, bytes]]]:
        looked.append(max(len(changes.dirs), len(changes.entries)))
        return remote_changed(self, changes)

    monkeypatch.setattr(Volume, "remote_changed", counted)
    async with running(full, fresh) as (a, b):
        link(a, b)
        await wait_until(lambda: sum(looked) >= 3000, "the fresh node to merge the checkpoint", 120)
    assert max(looked) <= 500, f"{max(looked)} changed entries looked at in one turn"


@pytest.mark.asyncio
async def test_a_peers_checkpoint_is_decoded_off_the_loop(
    tmp_path: Path, keys: VolumeKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = _folded(tmp_path, keys, 3)
    fresh = make_node(tmp_path, "fresh", keys)
    loop_thread = threading.get_ident()
    # The size of each /log answer decoded on the loop thread, and off it.
    on_loop: list[int] = []
    off_loop: list[int] = []
    decode = wire.decode_log_response

    def counted(body: bytes) -> wire.LogResponse:
        (on_loop if threading.get_ident() == loop_thread else off_loop).append(len(body))
        return decode(body)

    monkeypatch.setattr(wire, "decode_log_response", counted)
    monkeypatch.setattr(client_module, "DECODE_ON_LOOP_BYTES", 64 * 1024)
    async with running(full, fresh) as (a, b):
        link(a, b)
        await wait_until(
            lambda: fresh.replica.counts()[1] >= 3000, "the fresh node to merge the checkpoint", 120
        )
    # (a 100,000-file checkpoint's answer took ~50 ms of the loop to decode)
    assert max(on_loop, default=0) <= 64 * 1024, f"a {max(on_loop)}-byte answer decoded on the loop"
    assert max(off_loop, default=0) > 64 * 1024, "the checkpoint's answer was never decoded"
