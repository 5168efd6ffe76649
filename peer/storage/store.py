"""The node's store: one SQLite database holding the sealed log, sealed blocks,
the inode table and small settings.

Invariant: every batch of writes commits whole or not at all (one `BEGIN
IMMEDIATE` transaction on one connection), durable once `sync()` returns after
it (see `_configure` for why commits themselves are not synced), and each node's
log in the store is contiguous: entry (node, seq) is only ever present with
(node, seq - 1), which `append_log` enforces, so a node's highest seq is its
version-vector component. Everything here is sealed or public (ids, seqs,
signatures); the store never sees a key. An inode number, once given to an
entry, stays that entry's for the life of the store.

Threading: one connection, guarded by a lock. A transaction holds the lock from
BEGIN to COMMIT, so another thread's reads and writes wait for it rather than
see half of it. Never `await` inside `transaction()`: other coroutines on the
same thread would silently join it.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import cbor2

from crdt.ops import ROOT
from peer.errors import CorruptStore
from peer.sealing import LogEntry, patch_base

# 2: incremental auto-vacuum, so collected blocks give their space back.
# 3: chained log entries (`log.prev`) and the evidence of members that lied.
SCHEMA_VERSION = 3
ROOT_INODE = 1
_BUSY_TIMEOUT_MS = 5000
# The page size of a new store (an existing one keeps its own). Every commit
# writes each page it changed whole to the WAL, and most commits are small:
# a created file is a few log rows and an inode, which with the 64 KiB pages
# stores were made with before wrote ~370 KiB to the WAL (and checkpointed,
# with two fsyncs, every ~10 files); with 4 KiB pages it writes ~30 KiB, and
# a three-commit small file costs 0.2-0.5 ms of SQLite instead of 1.2-1.9 ms
# (a micro-benchmark on this machine, synchronous=NORMAL). Blocks (128 KiB) are overflow
# chains of 4 KiB pages: inserted at ~0.85x and read at ~0.7x the speed of 64
# KiB pages, still 150 and 1,800 MB/s, above what the mount moves.
_PAGE_SIZE = 4096
# The WAL is checkpointed and truncated at this length, in pages of the
# store's own size (`Store._wal_pages`).
_WAL_BYTES = 4 << 20
# The page cache of each reader connection (`Store.read_block`), in KiB.
_READER_CACHE_KIB = 256
# Rows per query when streaming the log, and ids per `IN (...)` list (well
# under SQLite's bound-parameter limit).
_LOG_CHUNK = 1000
_IN_CHUNK = 500
# The checkpoint (`peer.storage.checkpoint`, sealed) and the vector it covers (public,
# like the log's (node, seq) keys), kept in `meta`: one row each.
_CHECKPOINT_META = "checkpoint"
_COVERS_META = "checkpoint_covers"

# What a member signed that contradicts itself or the rest (`peer.storage.chain`):
# kept, never overwritten, shown by `status`. `a` and `b` are the two signed
# statements (CBOR heads or entries), `detail` says what they show.
_EVIDENCE_TABLE = """CREATE TABLE evidence (
        node BLOB NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL,
        source TEXT NOT NULL,
        seen_ms INTEGER NOT NULL,
        a BLOB NOT NULL,
        b BLOB NOT NULL,
        PRIMARY KEY (node, seq, kind)
    ) WITHOUT ROWID"""

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB) WITHOUT ROWID",
    """CREATE TABLE log (
        node BLOB NOT NULL,
        seq INTEGER NOT NULL,
        sealed BLOB NOT NULL,
        sig BLOB NOT NULL,
        prev BLOB NOT NULL DEFAULT x'',
        PRIMARY KEY (node, seq)
    ) WITHOUT ROWID""",
    # A rowid table, not WITHOUT ROWID: a WITHOUT ROWID row lives in the
    # primary-key b-tree, whose cells keep only ~1/16 of a page local, which
    # suits small rows; for 128 KiB blobs it halved insert speed (measured:
    # 104 vs 206 MB/s at 4 KiB pages).
    # `base`: for a patch (`peer.sealing.Patch`), the block it is written over,
    # which it keeps alive (`patch_bases`); NULL for a whole block.
    """CREATE TABLE blocks (
        id BLOB UNIQUE NOT NULL,
        sealed BLOB NOT NULL,
        base BLOB
    )""",
    # AUTOINCREMENT: a number once given is never handed out again, even after
    # rows are deleted, so the kernel can never confuse two entries.
    """CREATE TABLE inodes (
        inode INTEGER PRIMARY KEY AUTOINCREMENT,
        entry BLOB UNIQUE NOT NULL
    )""",
    _EVIDENCE_TABLE,
)
# Blocks the merged state needs that no peer could provide when their
# operations merged (`peer.net.sync`): fetched again in the background, and until
# then reads of what they hold fail with EIO. Added without a schema version
# bump: a store of schema 2 without it gets it at the next open.
_WANTED_SCHEMA = """CREATE TABLE IF NOT EXISTS wanted_blocks (
    id BLOB PRIMARY KEY,
    since_ms INTEGER NOT NULL
) WITHOUT ROWID"""


# The patches held and their bases (`patch_bases`), read without the blocks:
# `base` comes after the sealed bytes in a row, so reading it from the table
# would walk every block's overflow pages, the whole store, at each collection.
_PATCHES_INDEX = """CREATE INDEX IF NOT EXISTS blocks_patches ON blocks (base, id)
    WHERE base IS NOT NULL"""


def _connection(database: str, uri: bool) -> sqlite3.Connection:
    """A connection to `database` (a path, or a URI with `uri`) in autocommit
    mode, usable from any thread, waiting up to the busy timeout for locks."""
    return sqlite3.connect(
        database,
        uri=uri,
        isolation_level=None,
        check_same_thread=False,
        timeout=_BUSY_TIMEOUT_MS / 1000,
    )


def _sealed_block(conn: sqlite3.Connection, block_id: bytes) -> bytes | None:
    """The sealed bytes of block `block_id` as `conn` sees it, or None."""
    row = conn.execute("SELECT sealed FROM blocks WHERE id = ?", (block_id,)).fetchone()
    return None if row is None else bytes(row[0])


@dataclass(frozen=True, slots=True)
class StoreStats:
    """A snapshot of the store's size, for `status`."""

    log_entries: int
    blocks: int
    block_bytes: int
    db_bytes: int


@dataclass(frozen=True, slots=True)
class Evidence:
    """Two statements signed by `node` that cannot both be true (`peer.storage.chain`)."""

    node: bytes
    seq: int
    kind: str  # "fork" (two entries at one seq), "forged checkpoint", ...
    detail: str
    source: str  # the peer address it came from
    seen_ms: int
    a: bytes
    b: bytes


class Store:
    """The SQLite store of one node; open with `Store.open(path)`."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn
        self._lock = threading.RLock()
        self._depth = 0
        self._owner: int | None = None
        self._unsynced = False
        self._wal_fd: int | None = None  # kept open for `sync`: see `_durable_fd`
        self._db_fd: int | None = None
        self._covers: dict[bytes, int] | None = None
        # A read-only store of an older schema has no `log.prev` (format-1 entries).
        self._prev_column = "prev"
        self.commits = 0  # transactions committed (what a change costs in fsyncs)
        self._wal_pages = _WAL_BYTES // _PAGE_SIZE  # set from the store's own page size
        # Connections of the threads that open blocks for reads (`read_block`),
        # one per thread, each with a lock only `close` contends for.
        self._readers = threading.local()
        self._reader_conns: list[tuple[threading.Lock, sqlite3.Connection]] = []
        self._readers_lock = threading.Lock()  # the list above, and `_closed`
        self._database = (str(path), False)  # what `_connect` opened: (database, uri)
        self._closed = False

    @classmethod
    def open(cls, path: Path) -> Store:
        """Open (creating if new) the store at `path`; `CorruptStore` if unusable.

        The file is made (or made again) owner-only, mode 0600, before SQLite
        opens it: SQLite gives its `-wal` and `-shm` files the database's mode."""
        with contextlib.suppress(OSError):  # unusable paths are reported by the connect
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            os.chmod(path, 0o600)
        return cls._connect(path, str(path))

    @classmethod
    def _connect(cls, path: Path, database: str, *, uri: bool = False) -> Store:
        """Connect to `database` (a path, or a URI with `uri`) as the store at
        `path`, then `_configure` and `_migrate`; `CorruptStore` if unusable."""
        try:
            conn = _connection(database, uri)
        except sqlite3.Error as exc:
            raise CorruptStore(path=path, detail=str(exc)) from exc
        store = cls(path, conn)
        store._database = (database, uri)
        try:
            store._configure()
            store._migrate()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise CorruptStore(path=path, detail=str(exc)) from exc
        except BaseException:
            conn.close()
            raise
        return store

    def _configure(self) -> None:
        conn = self._conn
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        conn.execute(f"PRAGMA page_size = {_PAGE_SIZE}")
        # Freed pages go back to the file system, a bit at a time, after each
        # collection (`reclaim`). Takes effect only before the first table is
        # made; older stores are converted once by `_migrate`.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if str(mode).lower() != "wal":
            raise CorruptStore(path=self.path, detail=f"cannot use a WAL journal here (got {mode})")
        # NORMAL plus an explicit `sync()`, a group commit. With WAL, NORMAL
        # writes each commit to the WAL without fsync: a crash of the process
        # loses nothing, power loss may lose the newest commits. Where that
        # matters the caller syncs: on fsync(2), and (the reason FULL is the
        # textbook choice) before any of our own log entries leave the node,
        # since an entry already sent to peers and then lost here would let
        # this node reissue the same (node, seq) with other content. Measured:
        # FULL made every metadata call pay an fsync, ~7 ms per small file
        # created; NORMAL + sync on demand keeps fsync where POSIX puts it.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        # A short WAL, truncated after each checkpoint: pages in the WAL need
        # as much room again in the database when checkpointed, so a WAL that
        # held the whole volume (1,000 pages of 64 KiB by default) could never
        # be checkpointed on a full disk, and deletes there could free nothing.
        # Measured: no loss of write speed with this (146 vs 132 MB/s).
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        self._wal_pages = max(16, _WAL_BYTES // int(page_size))
        conn.execute(f"PRAGMA wal_autocheckpoint = {self._wal_pages}")
        # Debian's SQLite zeroes every freed page (secure_delete ON), so a
        # delete wrote as many bytes to the WAL as it freed: on a full disk,
        # no delete could run. Freed pages hold only sealed bytes; FAST still
        # clears what costs no extra I/O.
        conn.execute("PRAGMA secure_delete = FAST")
        conn.execute(f"PRAGMA journal_size_limit = {_WAL_BYTES}")

    def _migrate(self) -> None:
        with self.transaction():
            tables = {
                name
                for (name,) in self._conn.execute(
                    "SELECT name FROM sqlite_schema WHERE type = 'table'"
                )
            }
            if "meta" not in tables:
                if tables - {"sqlite_sequence"}:
                    raise CorruptStore(path=self.path, detail="it is not a dfs-peer store")
                for statement in (*_SCHEMA, _WANTED_SCHEMA, _PATCHES_INDEX):
                    self._conn.execute(statement)
                self.set_meta("schema_version", str(SCHEMA_VERSION).encode())
                self._conn.execute(
                    "INSERT INTO inodes (inode, entry) VALUES (?, ?)",
                    (ROOT_INODE, ROOT),
                )
                return
            raw = self.get_meta("schema_version")
            try:
                version = int(raw.decode("ascii")) if raw is not None else None
            except (UnicodeDecodeError, ValueError):
                version = None
            if version is None:
                raise CorruptStore(path=self.path, detail="its schema version is lost")
            if version > SCHEMA_VERSION:
                raise CorruptStore(
                    path=self.path,
                    detail=(
                        f"it has schema version {version}, newer than this "
                        f"dfs-peer understands ({SCHEMA_VERSION}): upgrade dfs-peer"
                    ),
                )
            self._conn.execute(_WANTED_SCHEMA)
            # Patches came without a schema version bump: a store made before
            # gets the column (NULL: it holds whole blocks only) at its next open.
            columns = {row[1] for row in self._conn.execute("PRAGMA table_info(blocks)")}
            if "base" not in columns:
                self._conn.execute("ALTER TABLE blocks ADD COLUMN base BLOB")
            self._conn.execute(_PATCHES_INDEX)
        if version < 2:
            self._migrate_to_incremental_vacuum()
        if version < 3:
            self._migrate_to_chained_log()

    def _migrate_to_incremental_vacuum(self) -> None:
        """Version 1 -> 2: switch on incremental auto-vacuum (a one-off VACUUM,
        which rewrites the file; it cannot run inside a transaction)."""
        with self._lock:
            self._conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            self._conn.execute("VACUUM")
        with self.transaction():
            self.set_meta("schema_version", b"2")

    def _migrate_to_chained_log(self) -> None:
        """Version 2 -> 3: a `prev` column (empty: the entries already held are
        format 1, unchained) and the evidence table. Entries keep their bytes."""
        with self.transaction():
            columns = {row[1] for row in self._conn.execute("PRAGMA table_info(log)")}
            if "prev" not in columns:
                self._conn.execute("ALTER TABLE log ADD COLUMN prev BLOB NOT NULL DEFAULT x''")
            self._conn.execute(
                _EVIDENCE_TABLE.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS")
            )
            self.set_meta("schema_version", b"3")

    def close(self) -> None:
        with self._lock, self._readers_lock:
            self._closed = True
            for lock, conn in self._reader_conns:
                with lock:
                    conn.close()
            self._reader_conns.clear()
            self._conn.close()
            for fd in (self._wal_fd, self._db_fd):
                if fd is not None:
                    os.close(fd)
            self._wal_fd = self._db_fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Transactions

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic batch: commit on success, roll back on any exception.

        Nested use joins the outer transaction (it commits or rolls back with
        it); it is not a savepoint.
        """
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self._conn.execute("BEGIN IMMEDIATE")
            self._depth, self._owner = 1, threading.get_ident()
            try:
                yield
                self._conn.execute("COMMIT")
                self._unsynced = True
                self.commits += 1
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                self._covers = None  # re-read: a rolled-back checkpoint never was
                raise
            finally:
                self._depth, self._owner = 0, None

    def sync(self) -> None:
        """Make every transaction committed so far durable (fsync the WAL)."""
        with self._lock:
            if not self._unsynced:
                return
            os.fsync(self._durable_fd())
            self._unsynced = False

    def _durable_fd(self) -> int:
        """What `sync` fsyncs: the WAL, or the database while there is no WAL
        (all checkpointed). Each is opened once and kept until `close`: an
        fsync must not need a free descriptor (a flood of connections can
        hold every one the process may open while our own entries wait for
        it), and closing a descriptor of the database would drop SQLite's
        locks on it (POSIX locks belong to the process, not the descriptor;
        SQLite keeps none on the WAL itself)."""
        wal = self.path.with_name(self.path.name + "-wal")
        try:
            inode = os.stat(wal).st_ino
        except FileNotFoundError:
            if self._db_fd is None:
                self._db_fd = os.open(self.path, os.O_RDONLY)
            return self._db_fd
        if self._wal_fd is not None and os.fstat(self._wal_fd).st_ino != inode:
            os.close(self._wal_fd)  # a WAL made again (the old one was deleted)
            self._wal_fd = None
        if self._wal_fd is None:
            self._wal_fd = os.open(wal, os.O_RDONLY)
        return self._wal_fd

    def _require_transaction(self) -> None:
        # An explicit raise, not `assert`: a write outside a transaction would
        # autocommit statement by statement, and -O must not hide that.
        if not self._depth or self._owner != threading.get_ident():
            raise AssertionError("store writes must run inside Store.transaction()")

    # Settings

    def get_meta(self, key: str) -> bytes | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def set_meta(self, key: str, value: bytes) -> None:
        self._require_transaction()
        self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # Log

    def append_log(self, entries: Iterable[LogEntry]) -> int:
        """Add entries (already verified); returns how many were new.

        Entries already present are left as they are. Raises `ValueError` if
        the batch would leave a gap in a node's log.
        """
        self._require_transaction()
        batch = list(entries)
        before = self._conn.total_changes
        self._conn.executemany(
            "INSERT OR IGNORE INTO log (node, seq, sealed, sig, prev) VALUES (?, ?, ?, ?, ?)",
            [(e.node, e.seq, e.sealed, e.sig, e.prev) for e in batch],
        )
        inserted = self._conn.total_changes - before
        keys = {(e.node, e.seq) for e in batch}
        covers = self.covers()
        for node, seq in keys:
            # After a checkpoint a node's log goes on at covers + 1.
            if seq == 1 or (node, seq - 1) in keys or seq - 1 <= covers.get(node, 0):
                continue
            row = self._conn.execute(
                "SELECT 1 FROM log WHERE node = ? AND seq = ?", (node, seq - 1)
            ).fetchone()
            if row is None:
                raise ValueError(
                    f"log entry {node.hex()[:8]}/{seq} would leave a gap (no {seq - 1})"
                )
        return inserted

    def log_after(self, node: bytes, after_seq: int, limit: int) -> list[LogEntry]:
        """Up to `limit` entries of `node`'s log with seq > `after_seq`, in order."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT seq, sealed, sig, {self._prev_column} FROM log"
                " WHERE node = ? AND seq > ? ORDER BY seq LIMIT ?",
                (node, after_seq, limit),
            ).fetchall()
        return [
            LogEntry(node, seq, bytes(sealed), bytes(sig), bytes(prev))
            for seq, sealed, sig, prev in rows
        ]

    def entry_at(self, node: bytes, seq: int) -> LogEntry | None:
        """Entry (node, seq), if the log holds it."""
        chunk = self.log_after(node, seq - 1, 1)
        return chunk[0] if chunk and chunk[0].seq == seq else None

    def _nodes(self) -> list[bytes]:
        # A seek per node rather than SELECT DISTINCT, which would read every
        # row of the log (the sealed ops live in the primary-key b-tree).
        nodes: list[bytes] = []
        with self._lock:
            row = self._conn.execute("SELECT node FROM log ORDER BY node LIMIT 1").fetchone()
            while row is not None:
                nodes.append(bytes(row[0]))
                row = self._conn.execute(
                    "SELECT node FROM log WHERE node > ? ORDER BY node LIMIT 1",
                    (row[0],),
                ).fetchone()
        return nodes

    def iter_log(self) -> Iterator[LogEntry]:
        """Every log entry, ordered by (node, seq), fetched a chunk at a time.

        Entries appended while iterating may or may not be included.
        """
        for node in self._nodes():
            after = 0
            while True:
                chunk = self.log_after(node, after, _LOG_CHUNK)
                yield from chunk
                if len(chunk) < _LOG_CHUNK:
                    break
                after = chunk[-1].seq

    def _last_seq(self, node: bytes) -> int:
        with self._lock:
            row = self._conn.execute(
                "SELECT seq FROM log WHERE node = ? ORDER BY seq DESC LIMIT 1", (node,)
            ).fetchone()
        return 0 if row is None else int(row[0])

    def version_vector(self) -> dict[bytes, int]:
        """{node: highest seq held}, in the log or folded into the checkpoint;
        contiguous by `append_log`'s invariant."""
        with self._lock:
            vv = dict(self.covers())
            for node in self._nodes():
                vv[node] = max(vv.get(node, 0), self._last_seq(node))
            return vv

    def next_seq(self, node: bytes) -> int:
        """The seq the next entry of `node`'s log takes."""
        return max(self._last_seq(node), self.covers().get(node, 0)) + 1

    # Checkpoint

    def covers(self) -> dict[bytes, int]:
        """{node: last seq folded into the checkpoint}; empty without one."""
        with self._lock:
            if self._covers is None:
                raw = self.get_meta(_COVERS_META)
                self._covers = {}
                if raw is not None:
                    try:
                        items = cbor2.loads(raw)
                        self._covers = {bytes(n): int(s) for n, s in items.items()}
                    except (ValueError, TypeError, AttributeError, cbor2.CBORDecodeError) as exc:
                        raise CorruptStore(
                            path=self.path, detail=f"its checkpoint vector is malformed ({exc})"
                        ) from exc
            return dict(self._covers)

    def get_checkpoint(self) -> bytes | None:
        """The sealed checkpoint, if this node has one."""
        return self.get_meta(_CHECKPOINT_META)

    def set_checkpoint(self, sealed: bytes, covers: dict[bytes, int]) -> int:
        """Store a checkpoint covering `covers` and drop the log entries it
        folds (seq <= covers[node]); returns how many were dropped. The caller's
        transaction makes the two one change."""
        self._require_transaction()
        self.set_meta(_CHECKPOINT_META, sealed)
        self.set_meta(_COVERS_META, cbor2.dumps(dict(covers), canonical=True))
        dropped = 0
        for node, seq in covers.items():
            cursor = self._conn.execute("DELETE FROM log WHERE node = ? AND seq <= ?", (node, seq))
            dropped += cursor.rowcount
        self._covers = dict(covers)
        return dropped

    # Blocks

    def put_blocks(self, blocks: Iterable[tuple[bytes, bytes]]) -> int:
        """Store (id, sealed) pairs; returns how many were new."""
        self._require_transaction()
        before = self._conn.total_changes
        self._conn.executemany(
            "INSERT OR IGNORE INTO blocks (id, sealed, base) VALUES (?, ?, ?)",
            ((bid, sealed, patch_base(sealed)) for bid, sealed in blocks),
        )
        return self._conn.total_changes - before

    def block_header(self, block_id: bytes) -> tuple[int, int] | None:
        """(sealed length, format version byte) of a block, read without its
        bytes (SQLite knows a blob's length from the row's header)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT length(sealed), substr(sealed, 1, 1) FROM blocks WHERE id = ?",
                (block_id,),
            ).fetchone()
        if row is None or not row[1]:
            return None
        return int(row[0]), bytes(row[1])[0]

    def patch_bases(self) -> dict[bytes, bytes]:
        """{patch id: the id of the block it is written over} for every patch held."""
        with self._lock:
            return {
                bytes(pid): bytes(base)
                for pid, base in self._conn.execute(
                    "SELECT id, base FROM blocks WHERE base IS NOT NULL"
                )
            }

    def get_block(self, block_id: bytes) -> bytes | None:
        with self._lock:
            return _sealed_block(self._conn, block_id)

    def read_block(self, block_id: bytes) -> bytes | None:
        """`get_block` on a connection of the calling thread's own: the
        threads that open blocks for reads (`peer.storage.blocks.openers`)
        read side by side, neither waiting for the store's lock nor for each
        other (SQLite lets go of the GIL while it reads). A reader sees what
        was committed when its statement began: a block written in a
        transaction still open is not there yet (None), as after a restart."""
        reader: tuple[threading.Lock, sqlite3.Connection] | None = getattr(
            self._readers, "reader", None
        )
        if reader is None:
            reader = self._new_reader()
            if reader is None:
                return None
        lock, conn = reader
        with lock:
            return None if self._closed else _sealed_block(conn, block_id)

    def _new_reader(self) -> tuple[threading.Lock, sqlite3.Connection] | None:
        """This thread's reader connection, made and kept till `close` (None
        once closed); `sqlite3.Error` if it cannot be opened now (the
        caller's read is then left to the store's own connection)."""
        with self._readers_lock:
            if self._closed:
                return None
            conn = _connection(*self._database)  # as the store's: read-only for a read-only one
            try:
                conn.execute("PRAGMA query_only = ON")
                # A block is read once, page by page: a small page cache will do.
                conn.execute(f"PRAGMA cache_size = -{_READER_CACHE_KIB}")
            except BaseException:
                conn.close()
                raise
            reader = (threading.Lock(), conn)
            self._reader_conns.append(reader)
        self._readers.reader = reader
        return reader

    def has_blocks(self, ids: Iterable[bytes]) -> set[bytes]:
        """The subset of `ids` held here."""
        wanted = list(dict.fromkeys(ids))
        found: set[bytes] = set()
        with self._lock:
            for start in range(0, len(wanted), _IN_CHUNK):
                chunk = wanted[start : start + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))
                found.update(
                    bytes(bid)
                    for (bid,) in self._conn.execute(
                        f"SELECT id FROM blocks WHERE id IN ({marks})", chunk
                    )
                )
        return found

    def delete_block(self, block_id: bytes) -> bool:
        """Drop a block (found corrupt, or garbage); returns whether it was here."""
        self._require_transaction()
        cursor = self._conn.execute("DELETE FROM blocks WHERE id = ?", (block_id,))
        return cursor.rowcount > 0

    def block_ids(self) -> list[bytes]:
        """The id of every block held (read from the id index, not the blobs)."""
        with self._lock:
            return [bytes(bid) for (bid,) in self._conn.execute("SELECT id FROM blocks")]

    def delete_blocks(self, ids: Iterable[bytes]) -> tuple[int, int]:
        """Drop blocks (garbage); returns (blocks, sealed bytes) deleted."""
        self._require_transaction()
        wanted = list(dict.fromkeys(ids))
        count = size = 0
        for start in range(0, len(wanted), _IN_CHUNK):
            chunk = wanted[start : start + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            n, b = self._conn.execute(
                f"SELECT count(*), coalesce(sum(length(sealed)), 0) FROM blocks WHERE id IN ({marks})",
                chunk,
            ).fetchone()
            self._conn.execute(f"DELETE FROM blocks WHERE id IN ({marks})", chunk)
            count, size = count + int(n), size + int(b)
        return count, size

    # Wanted blocks

    def want_blocks(self, ids: Iterable[bytes], since_ms: int) -> None:
        """Record blocks the merged state needs and no peer had (kept once)."""
        self._require_transaction()
        self._conn.executemany(
            "INSERT OR IGNORE INTO wanted_blocks (id, since_ms) VALUES (?, ?)",
            [(bid, since_ms) for bid in ids],
        )

    def unwant_blocks(self, ids: Iterable[bytes]) -> int:
        """Forget wanted blocks (arrived, or needed no more); returns how many."""
        self._require_transaction()
        before = self._conn.total_changes
        self._conn.executemany("DELETE FROM wanted_blocks WHERE id = ?", [(b,) for b in ids])
        return self._conn.total_changes - before

    def wanted_blocks(self) -> list[bytes]:
        """Every wanted block, oldest first."""
        with self._lock:
            try:
                rows = self._conn.execute(
                    "SELECT id FROM wanted_blocks ORDER BY since_ms, id"
                ).fetchall()
            except sqlite3.OperationalError:
                return []  # a read-only store of an older dfs-peer: none recorded
        return [bytes(bid) for (bid,) in rows]

    def reclaim(self, max_pages: int | None = None) -> int:
        """Give free pages back to the file system (incremental vacuum, then a
        WAL checkpoint so the shorter file is the one on disk); returns the
        bytes the store shrank by. Runs in its own transaction."""
        before = self.stats().db_bytes
        with self._lock:
            if self._depth:
                raise AssertionError("reclaim() cannot run inside a transaction")
            # In steps of half the WAL's length, each checkpointed and the WAL
            # truncated before the next: every page moved is written to the
            # WAL first, so one big step needs room for all of them (a full
            # disk has none), a small one only for a few.
            left = max_pages
            while left is None or left > 0:
                half = self._wal_pages // 2
                step = half if left is None else min(left, half)
                (free,) = self._conn.execute("PRAGMA freelist_count").fetchone()
                if not free:
                    break
                # executescript, not execute: the module steps this pragma
                # once, which frees one page; a script runs it to completion.
                self._conn.executescript(f"PRAGMA incremental_vacuum({step});")
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                if left is not None:
                    left -= step
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        return max(0, before - self.stats().db_bytes)

    @contextlib.contextmanager
    def checkpoint_deferred(self) -> Iterator[None]:
        """Commits inside do not checkpoint the write-ahead log themselves: a
        large one (an adopted checkpoint, 11 MB for 100,000 files) copied its
        pages to the database file inside the commit, on the caller's thread.
        Run `checkpoint_wal` after, from a worker thread."""
        with self._lock:
            self._conn.execute("PRAGMA wal_autocheckpoint = 0")
        try:
            yield
        finally:
            with self._lock:
                self._conn.execute(f"PRAGMA wal_autocheckpoint = {self._wal_pages}")

    def checkpoint_wal(self) -> None:
        """What SQLite does after a commit past the WAL's size (a passive
        checkpoint); reads and writes only the store's files."""
        with self._lock:
            if not self._depth:
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def shrink_wal(self) -> None:
        """Checkpoint and truncate the WAL (after a failed write left it long)."""
        with self._lock:
            if not self._depth:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def free_bytes(self) -> int:
        """Bytes of pages inside the file that hold nothing (reclaimable)."""
        with self._lock:
            (pages,) = self._conn.execute("PRAGMA freelist_count").fetchone()
            (size,) = self._conn.execute("PRAGMA page_size").fetchone()
        return int(pages) * int(size)

    def delete_log_after(self, node: bytes, seq: int) -> int:
        """Drop `node`'s entries past `seq` (a forgotten node's refused tail);
        returns how many were dropped. Keeps the log contiguous."""
        self._require_transaction()
        cursor = self._conn.execute("DELETE FROM log WHERE node = ? AND seq > ?", (node, seq))
        return cursor.rowcount

    # Evidence

    def add_evidence(self, ev: Evidence) -> bool:
        """Keep `ev` unless one of its (node, seq, kind) is kept already;
        returns whether it is new. Joins the caller's transaction, if any."""
        with self.transaction():
            before = self._conn.total_changes
            self._conn.execute(
                "INSERT OR IGNORE INTO evidence (node, seq, kind, detail, source, seen_ms, a, b)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (ev.node, ev.seq, ev.kind, ev.detail, ev.source, ev.seen_ms, ev.a, ev.b),
            )
            return self._conn.total_changes > before

    def evidence(self, kinds: Sequence[str] | None = None, proofs: bool = True) -> list[Evidence]:
        """The contradictions kept (of `kinds`, or all), oldest first; without
        `proofs`, their `a` and `b` are left empty (a forged checkpoint's is
        the whole checkpoint)."""
        where = f" WHERE kind IN ({','.join('?' * len(kinds))})" if kinds is not None else ""
        blobs = "a, b" if proofs else "x'', x''"
        with self._lock:
            rows = self._conn.execute(
                f"SELECT node, seq, kind, detail, source, seen_ms, {blobs} FROM evidence{where}"
                " ORDER BY seen_ms, node, seq",
                tuple(kinds or ()),
            ).fetchall()
        return [
            Evidence(bytes(n), int(s), str(k), str(d), str(src), int(ms), bytes(a), bytes(b))
            for n, s, k, d, src, ms, a, b in rows
        ]

    # Inodes

    def inode_of(self, entry: bytes) -> int:
        """The inode number of `entry`, allocated on first use.

        Allocation is a single-row write, so it runs in its own transaction if
        the caller has none (and joins the caller's if it has one).
        """
        with self._lock:
            row = self._conn.execute(
                "SELECT inode FROM inodes WHERE entry = ?", (entry,)
            ).fetchone()
            if row is not None:
                return int(row[0])
            with self.transaction():
                cursor = self._conn.execute("INSERT INTO inodes (entry) VALUES (?)", (entry,))
                inode = cursor.lastrowid
            assert inode is not None
            return inode

    def inodes_of(self, entries: Iterable[bytes]) -> dict[bytes, int]:
        """{entry: inode} for many entries, allocating the new ones (in order)
        with a few statements in one transaction."""
        wanted = list(dict.fromkeys(entries))
        found: dict[bytes, int] = {}
        with self.transaction():
            (last,) = self._conn.execute("SELECT coalesce(max(inode), 0) FROM inodes").fetchone()
            self._conn.executemany(
                "INSERT OR IGNORE INTO inodes (entry) VALUES (?)", [(e,) for e in wanted]
            )
            # What this transaction inserted (the usual case: every one) in one
            # range read; only entries that already had a number are looked up.
            found.update(
                (bytes(entry), int(inode))
                for entry, inode in self._conn.execute(
                    "SELECT entry, inode FROM inodes WHERE inode > ?", (last,)
                )
            )
            known = [e for e in wanted if e not in found]
            for start in range(0, len(known), _IN_CHUNK):
                chunk = known[start : start + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))
                found.update(
                    (bytes(entry), int(inode))
                    for entry, inode in self._conn.execute(
                        f"SELECT entry, inode FROM inodes WHERE entry IN ({marks})", chunk
                    )
                )
        return found

    def entry_of(self, inode: int) -> bytes | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT entry FROM inodes WHERE inode = ?", (inode,)
            ).fetchone()
        return None if row is None else bytes(row[0])

    def load_inodes(self) -> dict[bytes, int]:
        """{entry: inode} for every entry ever given an inode."""
        with self._lock:
            return {
                bytes(entry): int(inode)
                for entry, inode in self._conn.execute("SELECT entry, inode FROM inodes")
            }

    # Statistics

    def stats(self) -> StoreStats:
        with self._lock:
            (log_entries,) = self._conn.execute("SELECT count(*) FROM log").fetchone()
            blocks, block_bytes = self._conn.execute(
                "SELECT count(*), coalesce(sum(length(sealed)), 0) FROM blocks"
            ).fetchone()
        db_bytes = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(FileNotFoundError):
                db_bytes += Path(f"{self.path}{suffix}").stat().st_size
        return StoreStats(int(log_entries), int(blocks), int(block_bytes), db_bytes)


class ReadOnlyStore(Store):
    """A store opened read-only (`dfs-peer join --read-only --at`): it can run
    beside the node that owns the data dir and never changes a byte of it.

    SQLite refuses every write on the connection; inode numbers for entries the
    inode table does not list yet are handed out in memory, above every number
    the table held when it was loaded, and forgotten at exit.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        super().__init__(path, conn)
        self._next_inode = 0
        self._memory_inodes: dict[bytes, int] = {}

    @classmethod
    def open(cls, path: Path) -> Store:
        if not path.exists():
            raise CorruptStore(path=path, detail="there is no store there")
        return cls._connect(path, path.absolute().as_uri() + "?mode=ro", uri=True)

    def _configure(self) -> None:
        self._conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        self._conn.execute("PRAGMA query_only = ON")

    def _migrate(self) -> None:
        # Versions before 3 lack `log.prev` and the evidence table; a newer one may differ.
        raw = self.get_meta("schema_version") or b""
        if not raw.isdigit() or not 1 <= int(raw) <= SCHEMA_VERSION:
            raise CorruptStore(path=self.path, detail=f"unknown schema version {raw!r}")
        if int(raw) < 3:
            self._prev_column = "x''"

    def evidence(self, kinds: Sequence[str] | None = None, proofs: bool = True) -> list[Evidence]:
        if self._prev_column != "prev":
            return []  # a store from before evidence was kept
        return super().evidence(kinds, proofs)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        # Nothing to commit: reads need no transaction, and writes fail.
        with self._lock:
            yield

    def sync(self) -> None:
        return None

    def delete_block(self, block_id: bytes) -> bool:
        return False  # a corrupt block stays for its owner to find and replace

    def patch_bases(self) -> dict[bytes, bytes]:
        try:
            return super().patch_bases()
        except sqlite3.OperationalError:
            return {}  # a store made before patches: it holds none

    def load_inodes(self) -> dict[bytes, int]:
        table = super().load_inodes()
        self._next_inode = max(self._next_inode, max(table.values(), default=ROOT_INODE) + 1)
        return {**table, **self._memory_inodes}

    def inode_of(self, entry: bytes) -> int:
        with self._lock:
            inode = self._memory_inodes.get(entry)
            if inode is None:
                if not self._next_inode:
                    self.load_inodes()
                inode = self._memory_inodes[entry] = self._next_inode
                self._next_inode += 1
            return inode

    def inodes_of(self, entries: Iterable[bytes]) -> dict[bytes, int]:
        return {entry: self.inode_of(entry) for entry in entries}
