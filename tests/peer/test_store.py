"""The SQLite store: atomic batches, the log, blocks, inodes, schema and stats."""

from __future__ import annotations

import contextlib
import os
import resource
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from crdt.ops import ROOT
from peer.errors import CorruptStore
from peer.keys import VolumeKeys
from peer.sealing import LogEntry
from peer.storage.blocks import Blocks
from peer.storage.store import ROOT_INODE, SCHEMA_VERSION, ReadOnlyStore, Store

NODE_A = b"\xaa" * 32
NODE_B = b"\xbb" * 32


def entry(node: bytes, seq: int) -> LogEntry:
    return LogEntry(node, seq, f"sealed {seq}".encode(), b"s" * 64)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "node.db") as opened:
        yield opened


def test_store_runs_in_wal_mode_with_normal_sync(store: Store) -> None:
    conn = store._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL: sync() on demand
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000


def test_exception_inside_transaction_writes_nothing(store: Store) -> None:
    def failing_batch() -> None:
        with store.transaction():
            store.set_meta("k", b"v")
            store.append_log([entry(NODE_A, 1)])
            store.put_blocks([(b"i" * 32, b"sealed")])
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing_batch()
    assert store.get_meta("k") is None
    assert store.version_vector() == {}
    assert store.get_block(b"i" * 32) is None


def test_nested_transaction_joins_the_outer_one(store: Store) -> None:
    def failing_batch() -> None:
        with store.transaction():
            with store.transaction():
                store.set_meta("inner", b"1")
            store.set_meta("outer", b"1")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing_batch()
    assert store.get_meta("inner") is None
    with store.transaction(), store.transaction():
        store.set_meta("inner", b"2")
    assert store.get_meta("inner") == b"2"


def test_writes_outside_a_transaction_are_refused(store: Store) -> None:
    with pytest.raises(AssertionError):
        store.set_meta("k", b"v")
    with pytest.raises(AssertionError):
        store.append_log([entry(NODE_A, 1)])
    with pytest.raises(AssertionError):
        store.put_blocks([(b"i" * 32, b"x")])
    with pytest.raises(AssertionError):
        store.delete_block(b"i" * 32)


def test_another_thread_cannot_write_into_our_transaction(store: Store) -> None:
    refused: list[AssertionError] = []

    def write_unwrapped() -> None:
        try:
            store.set_meta("k", b"v")
        except AssertionError as exc:
            refused.append(exc)

    with store.transaction():
        thread = threading.Thread(target=write_unwrapped)
        thread.start()
        thread.join(timeout=10)
        assert not thread.is_alive()
    assert len(refused) == 1
    assert store.get_meta("k") is None


def test_meta_round_trips_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    with Store.open(path) as store, store.transaction():
        store.set_meta("check", b"\x00\x01")
        store.set_meta("check", b"\x02")
    with Store.open(path) as store:
        assert store.get_meta("check") == b"\x02"
        assert store.get_meta("absent") is None


def test_version_vector_and_next_seq(store: Store) -> None:
    assert store.next_seq(NODE_A) == 1
    with store.transaction():
        assert store.append_log([entry(NODE_A, s) for s in (1, 2, 3)]) == 3
        assert store.append_log([entry(NODE_B, 1)]) == 1
    with store.transaction():
        # Duplicates are ignored and not counted.
        assert store.append_log([entry(NODE_A, 3), entry(NODE_A, 4)]) == 1
    assert store.version_vector() == {NODE_A: 4, NODE_B: 1}
    assert store.next_seq(NODE_A) == 5
    assert store.next_seq(NODE_B) == 2


def test_append_refuses_a_gap_and_rolls_back_the_batch(store: Store) -> None:
    with store.transaction():
        store.append_log([entry(NODE_A, 1)])
    with pytest.raises(ValueError, match="gap"), store.transaction():
        store.append_log([entry(NODE_B, 1), entry(NODE_A, 3)])
    with pytest.raises(ValueError, match="gap"), store.transaction():
        store.append_log([entry(NODE_B, 2)])
    assert store.version_vector() == {NODE_A: 1}


def test_append_accepts_a_batch_out_of_order(store: Store) -> None:
    with store.transaction():
        store.append_log([entry(NODE_A, s) for s in (3, 1, 2)])
    assert store.version_vector() == {NODE_A: 3}


def test_log_after_pages_through_one_node(store: Store) -> None:
    with store.transaction():
        store.append_log(entry(NODE_A, s) for s in range(1, 11))
        store.append_log(entry(NODE_B, s) for s in range(1, 4))
    page = store.log_after(NODE_A, 0, 4)
    assert [e.seq for e in page] == [1, 2, 3, 4]
    assert page[0] == entry(NODE_A, 1)
    assert [e.seq for e in store.log_after(NODE_A, 4, 4)] == [5, 6, 7, 8]
    assert [e.seq for e in store.log_after(NODE_A, 8, 4)] == [9, 10]
    assert store.log_after(NODE_A, 10, 4) == []
    assert store.log_after(b"\xcc" * 32, 0, 4) == []


def test_iter_log_streams_everything_in_node_seq_order(store: Store) -> None:
    # More than one chunk per node, so the paging is exercised.
    with store.transaction():
        store.append_log(entry(NODE_B, s) for s in range(1, 2502))
        store.append_log(entry(NODE_A, s) for s in range(1, 4))
    keys = [(e.node, e.seq) for e in store.iter_log()]
    assert keys == [(NODE_A, s) for s in range(1, 4)] + [(NODE_B, s) for s in range(1, 2502)]


def test_blocks_put_get_has_delete(store: Store) -> None:
    ids = [bytes([i]) * 32 for i in range(3)]
    with store.transaction():
        assert store.put_blocks([(ids[0], b"zero"), (ids[1], b"one")]) == 2
        assert store.put_blocks([(ids[1], b"one again")]) == 0
    assert store.get_block(ids[1]) == b"one"
    assert store.get_block(ids[2]) is None
    assert store.has_blocks(ids) == {ids[0], ids[1]}
    assert store.has_blocks([]) == set()
    with store.transaction():
        assert store.delete_block(ids[0])
        assert not store.delete_block(ids[0])
    assert store.has_blocks(ids) == {ids[1]}


def test_has_blocks_handles_more_ids_than_one_query(store: Store) -> None:
    ids = [i.to_bytes(32, "big") for i in range(1200)]
    with store.transaction():
        store.put_blocks((bid, b"x") for bid in ids[::2])
    assert store.has_blocks(ids) == set(ids[::2])


def test_root_has_inode_one_and_others_start_at_two(store: Store) -> None:
    assert store.inode_of(ROOT) == ROOT_INODE == 1
    assert store.inode_of(b"\x01" * 16) == 2
    assert store.inode_of(b"\x02" * 16) == 3
    assert store.inode_of(b"\x01" * 16) == 2
    assert store.entry_of(3) == b"\x02" * 16
    assert store.entry_of(99) is None


def test_inodes_are_stable_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    entries = [bytes([i]) * 16 for i in range(1, 6)]
    with Store.open(path) as store:
        given = {e: store.inode_of(e) for e in entries}
    with Store.open(path) as store:
        assert store.load_inodes() == {ROOT: 1, **given}
        assert {e: store.inode_of(e) for e in entries} == given
        assert store.inode_of(b"\x09" * 16) == 7


def test_inode_allocated_in_a_rolled_back_transaction_is_forgotten(
    store: Store,
) -> None:
    def failing_batch() -> None:
        with store.transaction():
            store.inode_of(b"\x01" * 16)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing_batch()
    assert store.load_inodes() == {ROOT: 1}


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    with Store.open(path) as store, store.transaction():
        store.set_meta("schema_version", str(SCHEMA_VERSION + 1).encode())
    with pytest.raises(CorruptStore, match="upgrade dfs-peer"):
        Store.open(path)


def test_foreign_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE things (x)")
    conn.commit()
    conn.close()
    with pytest.raises(CorruptStore, match="not a dfs-peer store"):
        Store.open(path)


def test_garbage_file_is_refused_as_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    path.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(CorruptStore):
        Store.open(path)


def test_stats_count_log_and_blocks(store: Store) -> None:
    empty = store.stats()
    assert (empty.log_entries, empty.blocks, empty.block_bytes) == (0, 0, 0)
    with store.transaction():
        store.append_log(entry(NODE_A, s) for s in (1, 2))
        store.put_blocks([(b"a" * 32, b"x" * 1000), (b"b" * 32, b"y" * 24)])
    stats = store.stats()
    assert (stats.log_entries, stats.blocks, stats.block_bytes) == (2, 2, 1024)
    assert stats.db_bytes > 0


def test_sync_fsyncs_the_wal_only_after_a_commit(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    store.sync()  # whatever opening the store committed
    synced.clear()
    store.sync()
    assert synced == []  # nothing committed since: nothing to make durable
    with store.transaction():
        store.set_meta("k", b"v")
    store.sync()
    assert len(synced) == 1
    store.sync()
    assert len(synced) == 1


def test_a_deferred_wal_checkpoint_leaves_the_commit_alone_until_asked(store: Store) -> None:
    """A large commit (an adopted checkpoint) copies the WAL into the database
    file inside the commit unless deferred; `checkpoint_wal` then does it (from
    a worker thread in the node), and the automatic checkpoint comes back."""
    conn = store._conn
    (limit,) = conn.execute("PRAGMA wal_autocheckpoint").fetchone()
    big = 12 * 1024 * 1024
    before = os.path.getsize(store.path)
    with store.checkpoint_deferred():
        assert conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
        with store.transaction():
            store.set_meta("big", os.urandom(big))
        assert os.path.getsize(store.path) - before < big // 2  # still in the WAL only
    assert conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (limit,)
    store.checkpoint_wal()
    assert os.path.getsize(store.path) - before > big


def test_a_small_commit_writes_kilobytes_to_the_wal_not_whole_large_pages(store: Store) -> None:
    """Each commit writes every page it changed, whole, to the WAL; a created
    file is a few small commits. With the 64 KiB pages stores had before, one
    log row and one inode wrote ~200 KiB and a file ~370 KiB (a checkpoint
    with two fsyncs every ~10 files); 4 KiB pages keep it to a few pages."""
    wal = store.path.with_name(store.path.name + "-wal")
    with store.transaction():  # let the tables' first pages exist
        store.append_log([entry(NODE_A, 1)])
    store.inode_of(b"\x01" * 16)
    store._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    assert os.path.getsize(wal) == 0
    for seq in range(2, 12):
        with store.transaction():
            store.append_log([entry(NODE_A, seq)])
        store.inode_of(bytes([seq]) * 16)
    per_commit = os.path.getsize(wal) / 20
    assert per_commit < 16 * 1024, f"{per_commit:.0f} bytes of WAL per small commit"


def test_a_store_made_with_large_pages_keeps_them_and_its_wal_stays_4_mib(tmp_path: Path) -> None:
    """The page size is the store's own (SQLite fixes it when the file is
    made): an older store with 64 KiB pages opens as it is, and its WAL is
    checkpointed at the same length in bytes as a new store's."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA page_size = 65536")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    with Store.open(path) as old:
        pragma = old._conn.execute
        assert pragma("PRAGMA page_size").fetchone() == (65536,)
        assert pragma("PRAGMA wal_autocheckpoint").fetchone() == (64,)
        with old.transaction():
            old.append_log([entry(NODE_A, 1)])
    with Store.open(tmp_path / "new.db") as new:
        pragma = new._conn.execute
        assert pragma("PRAGMA page_size").fetchone() == (4096,)
        assert pragma("PRAGMA wal_autocheckpoint").fetchone() == (1024,)
        assert pragma("PRAGMA journal_size_limit").fetchone() == (4 << 20,)


def test_patch_bases_are_read_from_an_index_not_from_the_blocks(store: Store) -> None:
    whole, patch = b"w" * 32, b"p" * 32
    with store.transaction():
        store.put_blocks([(whole, b"\x02" + bytes(5000)), (patch, b"\x05" + whole + bytes(900))])
    assert store.patch_bases() == {patch: whole}
    # `base` comes after the sealed bytes in a row: a scan of the table would
    # walk every block's overflow pages at each collection.
    plan = store._conn.execute(
        "EXPLAIN QUERY PLAN SELECT id, base FROM blocks WHERE base IS NOT NULL"
    ).fetchall()
    assert "COVERING INDEX blocks_patches" in plan[0][3]


def test_a_store_made_before_patches_gets_their_column_at_its_next_open(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with Store.open(path) as store, store.transaction():
        store.put_blocks([(b"w" * 32, b"\x02" + bytes(100))])
    # What a store made before patches looked like: no `base`, no index.
    conn = sqlite3.connect(path)
    conn.execute("DROP INDEX blocks_patches")
    conn.execute("ALTER TABLE blocks DROP COLUMN base")
    conn.commit()
    conn.close()
    # A read-only open (`--at`) changes nothing: the store holds no patches.
    with ReadOnlyStore.open(path) as store:
        assert store.patch_bases() == {}
        assert store.get_block(b"w" * 32) == b"\x02" + bytes(100)
    with Store.open(path) as store:
        assert store.get_block(b"w" * 32) == b"\x02" + bytes(100)
        with store.transaction():
            store.put_blocks([(b"p" * 32, b"\x05" + b"w" * 32 + bytes(50))])
        assert store.patch_bases() == {b"p" * 32: b"w" * 32}


def test_sync_needs_no_free_file_descriptor(store: Store) -> None:
    """A flood of connections can hold every descriptor the process may open
    while the node's own entries wait for an fsync (they are served only once
    durable): the fsync must not need a new one."""
    with store.transaction():
        store.put_blocks([(b"a" * 32, b"sealed bytes")])
    store.sync()
    with store.transaction():
        store.put_blocks([(b"b" * 32, b"more sealed bytes")])
    with _every_descriptor_taken():
        store.sync()
    assert store.has_blocks([b"b" * 32]) == {b"b" * 32}


@contextlib.contextmanager
def _every_descriptor_taken() -> Iterator[None]:
    """Inside, this process can open no file (EMFILE), as under a flood."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    taken: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 4096), hard))
    try:
        with contextlib.suppress(OSError):
            while True:
                taken.append(os.open(os.devnull, os.O_RDONLY))
        with pytest.raises(OSError, match="Too many open files"):
            os.open(os.devnull, os.O_RDONLY)  # none left
        yield
    finally:
        for fd in taken:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _fds_on(path: Path) -> int:
    """How many of this process's descriptors are open on `path`."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                count += 1
    return count


def test_threads_read_blocks_on_their_own_connections_without_the_store_lock(
    store: Store,
) -> None:
    """Reads of a file open blocks on opener threads (`read_block`): two of them
    read side by side, and neither waits for the store's lock, which a commit
    on the loop holds. A block of a transaction still open is not seen yet
    (the loop's own read finds it), and closing the store closes every
    reader's connection."""
    with store.transaction():
        store.put_blocks([(b"a" * 32, b"committed")])
    db = store.path.absolute()
    before = _fds_on(db)
    results: dict[str, bytes | None] = {}
    read_at_once = threading.Event()

    def read(name: str, bid: bytes) -> None:
        results[name] = store.read_block(bid)
        read_at_once.set()

    with store.transaction():  # holds the store's lock, as a commit on the loop does
        store.put_blocks([(b"b" * 32, b"not yet committed")])
        readers = [
            threading.Thread(target=read, args=("a", b"a" * 32)),
            threading.Thread(target=read, args=("b", b"b" * 32)),
        ]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(timeout=10)
        waited = [reader for reader in readers if reader.is_alive()]
        assert not waited, "a reader waited for the store's lock"
        assert store.get_block(b"b" * 32) == b"not yet committed"
    assert results == {"a": b"committed", "b": None}
    assert read_at_once.is_set()
    assert _fds_on(db) == before + 2  # one connection per reader thread
    store.close()
    assert _fds_on(db) == 0
    assert store.read_block(b"a" * 32) is None  # closed: nothing, and no new connection
    assert _fds_on(db) == 0


def test_a_read_only_store_reads_blocks_on_read_only_connections(tmp_path: Path) -> None:
    with Store.open(tmp_path / "node.db") as writable:
        with writable.transaction():
            writable.put_blocks([(b"a" * 32, b"sealed")])
        reader = ReadOnlyStore.open(tmp_path / "node.db")
        try:
            got: list[bytes | None] = []
            thread = threading.Thread(target=lambda: got.append(reader.read_block(b"a" * 32)))
            thread.start()
            thread.join()
            assert got == [b"sealed"]
            ((lock, conn),) = reader._reader_conns
            with lock, pytest.raises(sqlite3.OperationalError, match="readonly"):
                conn.execute("DELETE FROM blocks")
        finally:
            reader.close()


def test_a_reader_that_cannot_open_leaves_the_read_to_the_store_connection(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    """A flood of connections can take every descriptor: an opener thread
    that cannot open its connection then opens nothing, and the read is
    served on the store's own connection, open all along."""
    with Store.open(tmp_path / "node.db") as store:
        pairs = Blocks(store, keys).seal([b"x" * 1000])
        with store.transaction():
            store.put_blocks(pairs)
        ((bid, _),) = pairs
        fresh = Blocks(store, keys)  # nothing cached
        with ThreadPoolExecutor(max_workers=1) as opener:
            with _every_descriptor_taken():
                assert opener.submit(fresh.open_stored, [bid]).result() == {}
                assert fresh.get(bid) == b"x" * 1000
            assert opener.submit(fresh.open_stored, [bid]).result() == {bid: b"x" * 1000}
