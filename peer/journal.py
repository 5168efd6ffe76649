"""The node's side of the log: stamping, sealing, storing and merging operations.

Invariant: an operation enters the merged state only together with its log
entry (and the blocks it references) in one store transaction, and the local
log's sequence numbers are 1, 2, 3... without gaps. A crash leaves either the
whole batch or none of it, and restart rebuilds the same merged state from the
log alone (the log is the truth; the `Replica` is derived).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from crdt.clock import Clock, Hlc
from crdt.compact import compact
from crdt.merge import Changes, Replica
from crdt.ops import Forget, MalformedOp, Member, Op, decode_op, encode_op
from fuse.errors import NoSpace
from peer.checkpoint import (
    Checkpoint,
    CheckpointTooLarge,
    iter_checkpoint_ops,
    open_checkpoint,
    seal_checkpoint,
)
from peer.errors import CorruptEntry
from peer.identity import NodeIdentity
from peer.keys import VolumeKeys
from peer.sealing import LogEntry, open_entry, seal_entry
from peer.store import Store

log = logging.getLogger(__name__)

# Replay decodes the log in chunks so a large log does not sit in memory twice.
REPLAY_CHUNK = 4096
# Fold the stable prefix into the checkpoint once this many more entries are
# stable (and a quarter of the checkpoint's ops: `Journal.fold_target`).
FOLD_MIN_ENTRIES = 1000
# Ops merged into the replica between two chances for the loop to answer FUSE
# (`apply_in_pieces`): 10-30 ms of merging on this machine kind.
MERGE_PIECE_OPS = 128


def _tops(ops: Iterable[Op]) -> dict[bytes, Hlc]:
    """{node: its newest stamp among `ops`}."""
    tops: dict[bytes, Hlc] = {}
    for op in ops:
        cur = tops.get(op.hlc.node)
        if cur is None or op.hlc > cur:
            tops[op.hlc.node] = op.hlc
    return tops


def _settle() -> None:
    """Move every object alive now out of the cyclic collector's reach after a
    bulk build (replay, a checkpoint): the replica is long-lived and holds no
    garbage cycles, and a full collection walking all of it stalls the loop
    that answers FUSE for a time that grows with the volume."""
    gc.freeze()


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Adoption:
    """A peer's checkpoint merged with this node's, sealed, ready to store
    (`Journal.prepare_adoption`): valid while the store's covers are `covers`."""

    covers: dict[bytes, int]
    new_covers: dict[bytes, int]
    sealed: bytes
    ops: int
    tops: dict[bytes, Hlc]


@dataclass(frozen=True, slots=True)
class JournalStatistics:
    operations: int
    entries: int
    own_seq: int


class Journal:
    """Appends this node's operations and merges everyone's into the replica."""

    def __init__(
        self,
        store: Store,
        keys: VolumeKeys,
        identity: NodeIdentity,
        replica: Replica,
        now: Callable[[], int] = wall_ms,
    ) -> None:
        self.store = store
        self.keys = keys
        self.identity = identity
        self.replica = replica
        self._now = now
        self._next_seq = store.next_seq(identity.node_id)
        self.clock = Clock(identity.node_id)
        self.listeners: list[Callable[[Changes], None]] = []
        # Called after every commit or merge that grew the log (the peer
        # server's long polls wait on this).
        self.grew: list[Callable[[], None]] = []
        # {node: highest seq held}, kept in step with the store's log.
        self.vv: dict[bytes, int] = store.version_vector()
        # The folded stable prefix (`peer.checkpoint`), if any: replay merges
        # its ops, then the log after `covers`.
        # The checkpoint stays in the store, read when needed (replay, a new
        # fold): 200,000 decoded ops would cost ~100 MiB for the life of the
        # process, the sealed blob ~20 MiB.
        self._tops: dict[bytes, Hlc] | None = None
        # How far back `--at` must stay exact: folding drops an op another
        # overrides only if that one is older than this (`crdt.compact`).
        self.history_ms = 0
        # How many ops the checkpoint holds (counted by replay and each fold),
        # and how many all folds so far re-encoded (what folding has cost).
        self._folded_ops = 0
        self.folded_ops_written = 0

    @property
    def checkpoint(self) -> Checkpoint | None:
        """The stored checkpoint, opened (read and decoded anew at each use)."""
        blob = self.store.get_checkpoint()
        return None if blob is None else open_checkpoint(self.keys, blob, stored_here=True)

    def _set_checkpoint(self, ops: Sequence[Op] | None) -> None:
        """Note a new checkpoint holding `ops` (None: unknown, read when needed)."""
        self._tops = None if ops is None else _tops(ops)
        self._folded_ops = 0 if ops is None else len(ops)

    # -- start-up --------------------------------------------------------------
    def replay(self, until_ms: int | None = None) -> int:
        """Rebuild the replica from the stored log; return the number of ops.

        With `until_ms`, merge only the ops stamped at or before that wall time
        (unix ms): the state as it was then (`peer.history`)."""
        # Replay builds millions of long-lived objects and no garbage cycles:
        # the cyclic collector's passes over them took a fifth of a
        # 100,000-file restart (1.3 of 6.7 s), for nothing.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._replay(until_ms)
        finally:
            if gc_was_enabled:
                gc.enable()
            _settle()

    def _replay(self, until_ms: int | None) -> int:
        batch: list[Op] = []
        count = 0
        for op in self._stored_ops():
            # Folded ops keep their stamps, so `until_ms` filters them as it
            # does entries (history older than the retention is gone anyway).
            if until_ms is not None and op.hlc.wall_ms > until_ms:
                continue
            batch.append(op)
            if len(batch) >= REPLAY_CHUNK:
                self.replica.apply(batch)
                count += len(batch)
                batch = []
        self.replica.apply(batch)
        count += len(batch)
        latest = self.replica.latest()
        if latest is not None:
            self.clock.observe(latest, self._now())
        return count

    def _stored_ops(self) -> Iterator[Op]:
        """Every op this store holds: the checkpoint's, then the log's."""
        blob = self.store.get_checkpoint()
        if blob is not None:
            tops: dict[bytes, Hlc] = {}
            folded = 0
            for op in iter_checkpoint_ops(self.keys, blob):
                folded += 1
                cur = tops.get(op.hlc.node)
                if cur is None or op.hlc > cur:
                    tops[op.hlc.node] = op.hlc
                yield op
            self._tops, self._folded_ops = tops, folded
        for entry in self.store.iter_log():
            yield self._open(entry, signed_already=True)

    def _open(self, entry: LogEntry, signed_already: bool = False) -> Op:
        # Entries in our store had their signature and canonical encoding
        # checked when they entered it; replay still decrypts each one, whose
        # MAC (under a key derived from the secret) catches any change to the
        # stored bytes.
        try:
            op = decode_op(
                open_entry(self.keys, entry, check_signature=not signed_already),
                check_canonical=not signed_already,
            )
        except MalformedOp as exc:
            raise CorruptEntry(f"entry {entry.node[:4].hex()}/{entry.seq}: {exc}") from exc
        if op.hlc.node != entry.node:
            raise CorruptEntry(f"entry {entry.node[:4].hex()}/{entry.seq} claims another node")
        return op

    def ensure_member(self, name: str) -> None:
        """Announce this node (and its name) once, or again when the name changes."""
        if self.replica.members().get(self.identity.node_id) != name:
            self.commit(lambda stamp: [Member(stamp(), name)])

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """One store transaction; a full disk becomes `NoSpace` (ENOSPC)."""
        try:
            with self.store.transaction():
                yield
        except sqlite3.OperationalError as exc:
            if "full" in str(exc):
                raise NoSpace() from exc
            raise

    def _apply(self, ops: Sequence[Op]) -> Changes:
        """Merge stored `ops` into the replica, then tell who listens."""
        changes = self.replica.apply(ops)
        if any(isinstance(op, Forget) for op in ops):
            changes = self.enforce_forgets() or changes
        self._notify(changes)
        self._grown()
        return changes

    # -- local operations ------------------------------------------------------
    def stamp(self) -> Hlc:
        return self.clock.tick(self._now())

    def commit(
        self,
        make: Callable[[Callable[[], Hlc]], Sequence[Op]],
        blocks: Iterable[tuple[bytes, bytes]] = (),
    ) -> Changes:
        """Stamp, seal, store and merge the ops `make(stamp)` returns, with `blocks`,
        in one transaction."""
        # In stamp order, so a node's seqs and stamps grow together (causal
        # stability turns a stable seq into a stamp bound: `peer.gc`).
        ops = sorted(make(self.stamp), key=lambda op: op.hlc)
        if not ops:
            return Changes(frozenset(), frozenset())
        entries = []
        seq = self._next_seq
        for op in ops:
            entries.append(seal_entry(self.keys, self.identity, seq, encode_op(op)))
            seq += 1
        with self._writing():
            self.store.put_blocks(blocks)
            self.store.append_log(entries)
        self._next_seq = seq
        self.vv[self.identity.node_id] = seq - 1
        return self._apply(ops)

    # -- remote operations -------------------------------------------------------
    def open_entries(self, entries: Sequence[LogEntry]) -> list[Op]:
        """Verify and decode entries from a peer; `CorruptEntry` if any is bad.

        Pure CPU (signatures, decryption): safe to run in a worker thread."""
        return [self._open(e) for e in entries]

    def merge_remote(
        self,
        entries: Sequence[LogEntry],
        ops: Sequence[Op] | None = None,
        blocks: Iterable[tuple[bytes, bytes]] = (),
    ) -> Changes:
        """Store and merge entries from peers, with the blocks they reference,
        in one transaction. `ops` are the entries opened by `open_entries`
        (opened here if not given). Entries already held are skipped."""
        if ops is None:
            ops = self.open_entries(entries)
        cuts = self.replica.forgotten()
        fresh = [
            (e, op)
            for e, op in zip(entries, ops, strict=True)
            if e.seq > self.vv.get(e.node, 0) and self._within(cuts, e.node, e.seq)
        ]
        if not fresh:
            return Changes(frozenset(), frozenset())
        with self._writing():
            self.store.put_blocks(blocks)
            self.store.append_log(e for e, _ in fresh)
        for e, _ in fresh:
            if e.seq > self.vv.get(e.node, 0):
                self.vv[e.node] = e.seq
        # Our own entries from a peer (this data dir was restored from an old
        # copy): never reuse their seqs for other operations.
        self._next_seq = max(self._next_seq, self.vv.get(self.identity.node_id, 0) + 1)
        now = self._now()
        for _, op in fresh:
            self.clock.observe(op.hlc, now)
        return self._apply([op for _, op in fresh])

    # -- checkpoint --------------------------------------------------------------
    def fold(self, stable: dict[bytes, int], min_entries: int | None = None) -> int:
        """Fold the log entries `stable` covers into the checkpoint, if at least
        `min_entries` are new (default: `FOLD_MIN_ENTRIES`, and a quarter of
        the checkpoint's ops), and drop them from the log in the same
        transaction; returns how many entries were dropped."""
        target = self.fold_target(stable, min_entries)
        return self.fold_to(target) if target is not None else 0

    def fold_target(
        self, stable: dict[bytes, int], min_entries: int | None = None
    ) -> dict[bytes, int] | None:
        """The covers a fold now would reach, or None if not worth one.

        A fold re-encodes the whole checkpoint, so it waits until the new
        entries are a quarter of what is folded already: each op is then
        re-encoded a bounded number of times (geometric growth), and folding
        costs a constant per entry however large the checkpoint grew."""
        if min_entries is None:
            min_entries = max(FOLD_MIN_ENTRIES, self._folded_ops // 4)
        covers = self.store.covers()
        cuts = self.replica.forgotten()
        own = self.identity.node_id
        target: dict[bytes, int] = {}
        for node, seq in stable.items():
            seq = min(seq, self.vv.get(node, 0))
            if node in cuts and node != own:
                seq = min(seq, cuts[node])
            if seq > covers.get(node, 0):
                target[node] = seq
        if not target or sum(s - covers.get(n, 0) for n, s in target.items()) < min_entries:
            return None
        return {**covers, **target}

    def fold_to(self, new_covers: dict[bytes, int]) -> int:
        """Fold the log up to `new_covers` (from `fold_target`) into the checkpoint.

        Reads only the store, never the replica: safe in a worker thread while
        the loop merges and commits. If the checkpoint changed meanwhile (an
        adoption), nothing is written and 0 returned."""
        covers = self.store.covers()
        if any(new_covers.get(n, 0) < s for n, s in covers.items()):
            return 0  # an adoption went further since the target was chosen
        ops = [
            self._open(e, signed_already=True) for e in self._entries_between(covers, new_covers)
        ]
        current = self.checkpoint
        old = current.ops if current is not None else ()
        cp = Checkpoint(new_covers, tuple(compact([*old, *ops], self._horizon())))
        del old, current, ops
        try:
            sealed = seal_checkpoint(self.keys, self.identity, cp)
        except CheckpointTooLarge as exc:
            log.info("not folding the log: the checkpoint would be too large (%s)", exc)
            return 0
        with self.store.transaction():
            if self.store.covers() != covers:
                return 0
            dropped = self.store.set_checkpoint(sealed, new_covers)
        self._set_checkpoint(cp.ops)
        self.folded_ops_written += len(cp.ops)
        log.info(
            "folded the stable log: entries=%d checkpoint_ops=%d bytes=%d",
            dropped,
            len(cp.ops),
            len(sealed),
        )
        return dropped

    def _entries_between(self, low: dict[bytes, int], high: dict[bytes, int]) -> list[LogEntry]:
        """The log entries (n, s) held here with low[n] < s <= high[n]."""
        out: list[LogEntry] = []
        for node, top in high.items():
            after = low.get(node, 0)
            while after < top:
                chunk = self.store.log_after(node, after, min(REPLAY_CHUNK, top - after))
                if not chunk:
                    break
                out.extend(chunk)
                after = chunk[-1].seq
        return out

    def adopt_checkpoint(
        self, cp: Checkpoint, blocks: Iterable[tuple[bytes, bytes]] = ()
    ) -> Changes:
        """Merge a peer's checkpoint (opened by `open_checkpoint`) and the blocks
        its heads need, in one transaction. This node's checkpoint becomes the
        union of both with its own log entries the new `covers` reach (ops are
        a set; covers the elementwise max), and those entries leave the log.

        In three steps, which `Sync` runs apart so the loop stays free:
        `prepare_adoption` (store only: a worker thread), `install_adoption`
        (one transaction), then merging `cp.ops` (`apply_in_pieces`)."""
        prepared = self.prepare_adoption(cp)
        if prepared is None or not self.install_adoption(cp, prepared, blocks):
            return Changes(frozenset(), frozenset())
        return self._apply(cp.ops)

    def prepare_adoption(self, cp: Checkpoint) -> Adoption | None:
        """The checkpoint this node would keep after adopting `cp`, sealed; None
        if `cp` covers nothing new. Reads only the store: safe in a worker thread."""
        covers = self.store.covers()
        new_covers = dict(covers)
        for node, seq in cp.covers.items():
            new_covers[node] = max(new_covers.get(node, 0), seq)
        if new_covers == covers:
            return None
        vv = self.store.version_vector()
        reach = {n: min(s, vv.get(n, 0)) for n, s in new_covers.items()}
        mine = [self._open(e, signed_already=True) for e in self._entries_between(covers, reach)]
        current = self.checkpoint
        old = current.ops if current is not None else ()
        merged = compact([*old, *mine, *cp.ops], self._horizon())
        del old, current, mine
        sealed = seal_checkpoint(self.keys, self.identity, Checkpoint(new_covers, tuple(merged)))
        return Adoption(covers, new_covers, sealed, len(merged), _tops(merged))

    def install_adoption(
        self, cp: Checkpoint, prepared: Adoption, blocks: Iterable[tuple[bytes, bytes]] = ()
    ) -> bool:
        """Store a prepared adoption with `blocks`, in one transaction; False
        (nothing written) if the checkpoint changed since it was prepared. The
        caller then merges `cp.ops` into the replica."""
        with self._writing():
            if self.store.covers() != prepared.covers:
                return False
            self.store.put_blocks(blocks)
            self.store.set_checkpoint(prepared.sealed, prepared.new_covers)
        self._tops, self._folded_ops = dict(prepared.tops), prepared.ops
        for node, seq in prepared.new_covers.items():
            self.vv[node] = max(self.vv.get(node, 0), seq)
        self._next_seq = max(self._next_seq, self.vv.get(self.identity.node_id, 0) + 1)
        now = self._now()
        for op in cp.ops:
            self.clock.observe(op.hlc, now)
        return True

    async def apply_in_pieces(self, ops: Sequence[Op]) -> Changes:
        """Merge stored `ops` into the replica `MERGE_PIECE_OPS` at a time,
        letting the loop answer FUSE between pieces; then tell who listens."""
        dirs: set[bytes] = set()
        entries: set[bytes] = set()
        # As in replay: no cyclic collection while the replica grows (a full
        # pass over it took ~0.2 s of the loop for 20,000 files, at random points).
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for start in range(0, len(ops), MERGE_PIECE_OPS):
                piece = ops[start : start + MERGE_PIECE_OPS]
                changes = self.replica.apply(piece)
                if any(isinstance(op, Forget) for op in piece):
                    changes = self.enforce_forgets() or changes
                dirs |= changes.dirs
                entries |= changes.entries
                await asyncio.sleep(0)
        finally:
            if gc_was_enabled:
                gc.enable()
            _settle()
        changes = Changes(frozenset(dirs), frozenset(entries))
        self._notify(changes)
        self._grown()
        return changes

    def _horizon(self) -> int:
        return self._now() - self.history_ms

    def folded_stamp(self, node: bytes) -> Hlc | None:
        """The newest stamp of `node` in the checkpoint: a lower bound of the
        stamp of its entry covers[node] (folded; compaction may have dropped it)."""
        if self._tops is None:
            cp = self.checkpoint
            if cp is None:
                return None
            self._tops = _tops(cp.ops)
        return self._tops.get(node)

    # -- forgotten nodes ---------------------------------------------------------
    def accepts(self, node: bytes, seq: int) -> bool:
        """False for an entry of a forgotten node past its cut (see `crdt.ops.Forget`)."""
        return self._within(self.replica.forgotten(), node, seq)

    def _within(self, cuts: dict[bytes, int], node: bytes, seq: int) -> bool:
        cut = cuts.get(node)
        return cut is None or seq <= cut or node == self.identity.node_id

    def capped(self, vv: dict[bytes, int]) -> dict[bytes, int]:
        """`vv` without what this node would refuse (forgotten nodes' tails)."""
        cuts = self.replica.forgotten()
        own = self.identity.node_id
        return {n: min(s, cuts[n]) if n in cuts and n != own else s for n, s in vv.items()}

    def enforce_forgets(self) -> Changes | None:
        """Drop entries of forgotten nodes past their cut, if this node holds
        any (it merged them before it learnt of the `Forget`), and rebuild the
        replica from the log without them, so every node ends up with the
        same operations. Returns what changed, or None if nothing was held."""
        own = self.identity.node_id
        over = {
            n: cut
            for n, cut in self.replica.forgotten().items()
            if n != own and self.vv.get(n, 0) > cut
        }
        if not over:
            return None
        with self.store.transaction():
            dropped = sum(self.store.delete_log_after(n, cut) for n, cut in over.items())
        log.warning(
            "dropped %d operation(s) of forgotten node(s) %s written after they were forgotten",
            dropped,
            ",".join(n.hex()[:8] for n in over),
        )
        self.vv = self.store.version_vector()
        self.replica.reset()
        self.replay()
        return self.replica.everything()

    def _notify(self, changes: Changes) -> None:
        for listener in self.listeners:
            listener(changes)

    def _grown(self) -> None:
        for callback in self.grew:
            callback()

    def statistics(self) -> JournalStatistics:
        ops, _ = self.replica.counts()
        return JournalStatistics(ops, ops, self._next_seq - 1)
