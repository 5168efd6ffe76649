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
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from crdt.clock import MAX_AHEAD_MS, MAX_FORWARD_MS, Clock, Hlc, refusal
from crdt.merge import Changes, Replica
from crdt.ops import Forget, MalformedOp, Member, Op, Rotate, decode_op, encode_op
from fuse.errors import NoSpace
from peer import epochs
from peer.errors import CorruptEntry
from peer.identity import NodeIdentity
from peer.keys import VolumeKeys
from peer.pacing import collector_paused, pace
from peer.sealing import (
    GENESIS,
    EntryOfUnknownEpoch,
    Head,
    LogEntry,
    entry_hash,
    head_of,
    open_entry,
    seal_entry,
)
from peer.storage import chain
from peer.storage.checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    CheckpointTooLarge,
    iter_checkpoint_ops,
    open_checkpoint,
    seal_checkpoint,
    stored_logs,
)
from peer.storage.space import Space
from peer.storage.store import Evidence, Store

log = logging.getLogger("peer.journal")

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
        pace()
        cur = tops.get(op.hlc.node)
        if cur is None or op.hlc > cur:
            tops[op.hlc.node] = op.hlc
    return tops


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Refused:
    """A node's entries from `seq` on that this node does not take, and why
    (`crdt.clock.refusal`): "ahead" until this node's clock catches up with
    `stamp`, "out of order" for good (that node's log is faulty)."""

    node: bytes
    seq: int
    stamp: Hlc
    why: str

    def describe(self) -> str:
        if self.why == "ahead":
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.stamp.wall_ms // 1000))
            return (
                f"from seq {self.seq}: stamped {when}, ahead of this node's clock; "
                "waiting until this clock catches up (check both machines' clocks)"
            )
        return (
            f"from seq {self.seq}: stamp {self.stamp.short()} not above that node's "
            "previous one (its log is faulty)"
        )


@dataclass(frozen=True, slots=True)
class Adoption:
    """A peer's checkpoint merged with this node's, sealed, ready to store
    (`Journal.prepare_adoption`): valid while the store's covers are `covers`.
    `fork`: (node, seq, proof) if the checkpoint contradicts what is held."""

    covers: dict[bytes, int]
    new_covers: dict[bytes, int]
    sealed: bytes
    heads: dict[bytes, Head]
    folded: int
    fork: tuple[bytes, int, Evidence | None] | None = None
    # {node: the stamp of its last entry in the new checkpoint} (`folded_stamp`)
    tops: dict[bytes, Hlc] = field(default_factory=dict)
    # {node: its newest stamp among the peer's ops} (the clock follows them)
    seen: dict[bytes, Hlc] = field(default_factory=dict)


@dataclass(slots=True)
class _Rebuilt:
    """A replica rebuilt from the store in a worker thread (`Journal._rebuild`):
    it holds the checkpoint of `covers` and, per node, the log up to `seen`."""

    replica: Replica
    covers: dict[bytes, int]
    seen: dict[bytes, int]


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
        # {node: the newest stamp of its ops held}: restores this node's own
        # clock at start, and a peer's next entry must stamp above it.
        self.tops: dict[bytes, Hlc] = {}
        # Nodes whose next entries this node refuses (see `Refused`).
        self.refused: dict[bytes, Refused] = {}
        # Told the Changes of every local commit, inside the commit (so they
        # must not block): what peers change is reported by `peer.net.sync`.
        self.listeners: list[Callable[[Changes], None]] = []
        # Called after every commit or merge that grew the log (the peer
        # server's long polls wait on this).
        self.grew: list[Callable[[], None]] = []
        # The data dir's space reserve and full episodes (set by the node).
        self.space = Space(None)
        # {node: highest seq held}, kept in step with the store's log.
        self.vv: dict[bytes, int] = store.version_vector()
        # The folded stable prefix (`peer.storage.checkpoint`), if any: replay merges
        # its ops, then the log after `covers`.
        # The checkpoint stays in the store, read when needed (replay, a new
        # fold): 200,000 decoded ops would cost ~100 MiB for the life of the
        # process, the sealed blob ~20 MiB.
        self._tops: dict[bytes, Hlc] | None = None
        # How far back `--at` must stay exact (kept for callers; a format-2
        # checkpoint keeps every op, so folding no longer depends on it).
        self.history_ms = 0
        # The hash of this node's last entry: the next one's `prev`.
        self._own_prev = self.hash_at(identity.node_id, self._next_seq - 1) or GENESIS
        # Nodes proven to have forked their log: node -> last seq still taken.
        self.fork_cuts: dict[bytes, int] = chain.fork_cuts(store.evidence(chain.FORK_KINDS))
        self._proofs: list[tuple[Head, Head]] | None = None
        # How many ops the checkpoint holds (counted by replay and each fold),
        # and how many all folds so far re-encoded (what folding has cost).
        self._folded_ops = 0
        self.folded_ops_written = 0
        # Set while a task enforces forgets off the loop (`enforce_forgets_async`):
        # a `Forget` that arrives then sets `forgets_due` instead of rebuilding.
        self.defer_forgets = False
        self.forgets_due = asyncio.Event()
        # Merges in pieces under way (`apply_in_pieces`): their blocks are stored
        # but not yet referenced by the replica, so collection must wait.
        self.merging = 0
        self._merged = asyncio.Event()
        self._merged.set()

    @property
    def checkpoint(self) -> Checkpoint | None:
        """The stored checkpoint, opened (read and decoded anew at each use)."""
        blob = self.store.get_checkpoint()
        return None if blob is None else open_checkpoint(self.keys, blob, stored_here=True)

    def _stored_logs(self) -> tuple[int, dict[bytes, list[LogEntry]]]:
        """(format, logs) of the stored checkpoint, entries not opened."""
        blob = self.store.get_checkpoint()
        return (FORMAT_VERSION, {}) if blob is None else stored_logs(self.keys, blob)

    # -- start-up --------------------------------------------------------------
    def replay(self, until_ms: int | None = None) -> int:
        """Rebuild the replica from the stored log; return the number of ops.

        With `until_ms`, merge only the ops stamped at or before that wall time
        (unix ms): the state as it was then (`peer.storage.history`)."""
        # Replay builds millions of long-lived objects and no garbage cycles:
        # the cyclic collector's passes over them took a fifth of a
        # 100,000-file restart (1.3 of 6.7 s), for nothing.
        with collector_paused():
            return self._replay(until_ms)

    def _replay(self, until_ms: int | None) -> int:
        batch: list[Op] = []
        count = 0
        tops = self.tops
        for op in self._stored_ops():
            # Folded ops keep their stamps, so `until_ms` filters them as it
            # does entries (history older than the retention is gone anyway).
            if until_ms is not None and op.hlc.wall_ms > until_ms:
                continue
            top = tops.get(op.hlc.node)
            if top is None or op.hlc > top:
                tops[op.hlc.node] = op.hlc
            batch.append(op)
            if len(batch) >= REPLAY_CHUNK:
                self.replica.apply(batch)
                count += len(batch)
                batch = []
        self.replica.apply(batch)
        count += len(batch)
        # A clock is state: go on from this node's own last stamp, however
        # far ahead of the wall clock it is (the wall clock may have been
        # stepped back since), so no stamp repeats and new ops sort last.
        own = tops.get(self.identity.node_id)
        if own is not None:
            self.clock.restore(own)
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
        yield from self._open_stored(self.store.iter_log())

    def _open_stored(self, entries: Iterable[LogEntry]) -> Iterator[Op]:
        """The ops of stored `entries`, each opened once the key epoch it is
        under is known."""
        # An entry of a key epoch not taken yet waits for the rotation that
        # makes it (in a later entry of another node, say): `peer.epochs`.
        waiting: list[LogEntry] = []
        for entry in entries:
            try:
                yield self._open(entry, signed_already=True)
            except EntryOfUnknownEpoch:
                waiting.append(entry)
        while waiting:
            left = []
            for entry in waiting:
                try:
                    yield self._open(entry, signed_already=True)
                except EntryOfUnknownEpoch:
                    left.append(entry)
            if len(left) == len(waiting):
                # Held but unreadable here (no rotation in the log gives their
                # key): left out of the replica, kept in the store.
                log.warning(
                    "%d stored operation(s) are under a key epoch this node does not "
                    "hold; left out (first: %s/%d)",
                    len(left),
                    left[0].node.hex()[:8],
                    left[0].seq,
                )
                return
            waiting = left

    def _open(self, entry: LogEntry, signed_already: bool = False) -> Op:
        # Entries in our store had their signature and canonical encoding
        # checked when they entered it; replay still decrypts each one, whose
        # MAC (under a key derived from the secret) catches any change to the
        # stored bytes.
        try:
            op = decode_op(
                open_entry(self.keys, entry, check_signature=not signed_already),
                node=entry.node,
                check_canonical=not signed_already,
            )
        except MalformedOp as exc:
            raise CorruptEntry(f"entry {entry.node[:4].hex()}/{entry.seq}: {exc}") from exc
        if op.hlc.node != entry.node:
            raise CorruptEntry(f"entry {entry.node[:4].hex()}/{entry.seq} claims another node")
        if isinstance(op, Rotate):
            epochs.learn(self.keys, entry, op)
        return op

    def ensure_member(self, name: str) -> None:
        """Announce this node (and its name) once, or again when the name changes."""
        if self.replica.members().get(self.identity.node_id) != name:
            self.commit(lambda stamp: [Member(stamp(), name)])

    @contextlib.contextmanager
    def _writing(self, freeing: bool = False) -> Iterator[None]:
        """One store transaction; a full disk becomes `NoSpace` (ENOSPC) and
        starts a full episode (`peer.storage.space`), in which only `freeing` writes run."""
        if not freeing:
            self.space.refuse_if_full()
        try:
            with self.store.transaction():
                yield
        except sqlite3.OperationalError as exc:
            if "full" in str(exc):
                self.space.exhausted()
                self.store.shrink_wal()  # give back what the failed write took
                raise NoSpace() from exc
            raise

    def _apply(self, ops: Sequence[Op]) -> Changes:
        """Merge stored `ops` into the replica, then tell who waits for growth."""
        changes = self.replica.apply(ops)
        if any(isinstance(op, Forget) for op in ops):
            changes = self._forgets_arrived() or changes
        self._grown()
        return changes

    # -- local operations ------------------------------------------------------
    def stamp(self) -> Hlc:
        return self.clock.tick(self._now())

    def commit(
        self,
        make: Callable[[Callable[[], Hlc]], Sequence[Op]],
        blocks: Iterable[tuple[bytes, bytes]] = (),
        *,
        freeing: bool = False,
        within: Callable[[], object] | None = None,
    ) -> Changes:
        """Stamp, seal, store and merge the ops `make(stamp)` returns, with `blocks`,
        in one transaction. `freeing` ops (deletes) run on a full disk too: in
        the room the released reserve leaves, retried once after releasing it.
        `within` runs first inside that transaction (more rows that stand or
        fall with the ops, e.g. a new entry's inode number)."""
        # In stamp order, so a node's seqs and stamps grow together (causal
        # stability turns a stable seq into a stamp bound: `peer.storage.gc`).
        ops = sorted(make(self.stamp), key=lambda op: op.hlc)
        if not ops:
            return Changes(frozenset(), frozenset())
        entries = []
        seq = self._next_seq
        prev = self._own_prev
        for op in ops:
            entries.append(
                seal_entry(self.keys, self.identity, seq, encode_op(op, compact=True), prev)
            )
            prev = entry_hash(entries[-1])
            seq += 1
        blocks = list(blocks)
        try:
            with self._writing(freeing):
                if within is not None:
                    within()
                self.store.put_blocks(blocks)
                self.store.append_log(entries)
        except NoSpace:
            if not freeing:
                raise
            with self._writing(freeing):  # the reserve is released now
                if within is not None:
                    within()
                self.store.put_blocks(blocks)
                self.store.append_log(entries)
        self._next_seq = seq
        self._own_prev = prev
        self.vv[self.identity.node_id] = seq - 1
        for entry, op in zip(entries, ops, strict=True):
            if isinstance(op, Rotate):
                epochs.learn(self.keys, entry, op)
        self._raise_tops(ops)
        changes = self._apply(ops)
        self._notify(changes)
        return changes

    # -- remote operations -------------------------------------------------------
    def open_entries(self, entries: Sequence[LogEntry]) -> list[Op]:
        """Verify and decode entries from a peer; `CorruptEntry` if any is bad.

        Pure CPU (signatures, decryption): safe to run in a worker thread.
        Entries of a key epoch made by a rotation among them are opened once
        it is taken; `EntryOfUnknownEpoch` if some stay unreadable."""
        ops: list[Op | None] = [None] * len(entries)
        waiting = list(range(len(entries)))
        while waiting:
            left = []
            for i in waiting:
                try:
                    ops[i] = self._open(entries[i])
                except EntryOfUnknownEpoch:
                    left.append(i)
            if len(left) == len(waiting):
                self._open(entries[left[0]])  # raises: no key for it
            waiting = left
        return [op for op in ops if op is not None]

    def merge_remote(
        self,
        entries: Sequence[LogEntry],
        ops: Sequence[Op] | None = None,
        blocks: Iterable[tuple[bytes, bytes]] = (),
        wanted: Iterable[bytes] = (),
        source: str = "",
    ) -> Changes:
        """Store and merge entries from peers, with the blocks they reference,
        in one transaction. `ops` are the entries opened by `open_entries`
        (opened here if not given). Entries already held are skipped.
        `wanted` are blocks they need that no peer had: recorded in the same
        transaction, to be fetched later (`peer.net.sync`).

        A peer's entry stamped at or below its node's previous one, or too
        far ahead of our clock, is refused with that node's later entries
        (`crdt.clock.refusal`; `source` names the peer in the warning);
        entries of a node must come in seq order."""
        if ops is None:
            ops = self.open_entries(entries)
        cuts = self.cuts()
        own = self.identity.node_id
        now = self._now()
        tops: dict[bytes, Hlc] = {}
        fresh = []
        for e, op in zip(entries, ops, strict=True):
            if (
                e.seq <= self.vv.get(e.node, 0)
                or not self._within(cuts, e.node, e.seq)
                or self._refuses(e.node, e.seq)
            ):
                continue
            if e.node != own:  # our own log (a restored data dir) is taken as it is
                prev = tops.get(e.node)
                if prev is None:
                    prev = self.tops.get(e.node)
                why = refusal(prev, op.hlc, now)
                if why is not None:
                    self._refuse(Refused(e.node, e.seq, op.hlc, why), source, ops)
                    continue
            tops[e.node] = op.hlc
            fresh.append((e, op))
        fresh = self._chained(fresh, source)
        if not fresh:
            return Changes(frozenset(), frozenset())
        with self._writing():
            self.store.put_blocks(blocks)
            self.store.want_blocks(wanted, self._now())
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
        self._raise_tops(op for _, op in fresh)
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
        cuts = self.cuts()
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
        version, held = self._stored_logs()
        if version == 1:
            log.info("not folding the log: the checkpoint is of format 1 (folded before chaining)")
            return 0
        target = {n: s for n, s in new_covers.items() if s > covers.get(n, 0)}
        logs: dict[bytes, Sequence[LogEntry]] = dict(held)
        for node, entries in self._entries_by_node(covers, target).items():
            logs[node] = (*logs.get(node, ()), *entries)
        del held
        try:
            sealed = seal_checkpoint(self.identity, logs)
        except CheckpointTooLarge as exc:
            log.info("not folding the log: the checkpoint would be too large (%s)", exc)
            return 0
        tops = self._last_stamps(logs)
        with self.store.transaction():
            if self.store.covers() != covers:
                return 0
            dropped = self.store.set_checkpoint(sealed, new_covers)
            chain.store_heads(self.store, {n: head_of(e[-1]) for n, e in logs.items() if e})
        folded = sum(len(e) for e in logs.values())
        self._tops = tops
        self._folded_ops = folded
        self.folded_ops_written += folded
        log.info(
            "folded the stable log: entries=%d checkpoint_entries=%d bytes=%d",
            dropped,
            folded,
            len(sealed),
        )
        return dropped

    def _entries_by_node(
        self, low: dict[bytes, int], high: dict[bytes, int]
    ) -> dict[bytes, list[LogEntry]]:
        out: dict[bytes, list[LogEntry]] = {}
        for e in self._entries_between(low, high):
            out.setdefault(e.node, []).append(e)
        return out

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
        self,
        cp: Checkpoint,
        blocks: Iterable[tuple[bytes, bytes]] = (),
        wanted: Iterable[bytes] = (),
        source: str = "",
    ) -> Changes:
        """Merge a peer's checkpoint (opened by `open_checkpoint`) and the blocks
        its heads need: `prepare_adoption`, `install_adoption`, then merge its
        ops into the replica (`Sync` runs the first in a worker thread and
        merges with `apply_in_pieces`, so the loop stays free)."""
        cp = self.within_cuts(cp)
        prepared = self.prepare_adoption(cp, dict(self.vv), source)
        if prepared is None or not self.install_adoption(cp, prepared, blocks, wanted):
            return Changes(frozenset(), frozenset())
        return self._apply(cp.ops)

    def prepare_adoption(
        self, cp: Checkpoint, vv: dict[bytes, int], source: str = ""
    ) -> Adoption | None:
        """The checkpoint this node would keep after adopting `cp` (merged with
        its own and with its log entries the new `covers` reach), sealed; None
        if `cp` covers nothing new. `vv` is this node's vector when asked.
        Reads only the store: safe in a worker thread while the loop runs.

        Where both hold entries of a node, the checkpoint's must be the ones
        held here (equal hashes at the highest seq both hold; the chain makes
        that one comparison enough): otherwise that node forked its log, which
        `install_adoption` keeps as evidence, refusing the checkpoint."""
        covers = self.store.covers()
        version, held_logs = self._stored_logs()
        if version == 1:
            raise CorruptEntry("checkpoint: this node's own is of format 1 and cannot be merged")
        heads = cp.heads()
        for node, seq in cp.covers.items():
            both = min(seq, vv.get(node, 0))
            if both > covers.get(node, 0):
                held = self._head_at(node, both)
            elif len(held_logs.get(node, ())) >= both > 0:
                held = head_of(held_logs[node][both - 1])
            else:
                held = None
            if held is not None and entry_hash(cp.logs[node][both - 1]) != held.hash:
                # (no proof if ours is folded unsigned: the chain binds it)
                ev = chain.proof(held, head_of(cp.logs[node][both - 1]), source)
                return Adoption(covers, {}, b"", {}, 0, (node, both, ev))
        new_covers = dict(covers)
        for node, seq in cp.covers.items():
            new_covers[node] = max(new_covers.get(node, 0), seq)
        if new_covers == covers:
            return None
        reach = {n: min(s, vv.get(n, 0)) for n, s in new_covers.items()}
        logs: dict[bytes, Sequence[LogEntry]] = dict(held_logs)
        for node, entries in cp.logs.items():
            if len(entries) > len(logs.get(node, ())):
                logs[node] = entries
        for node, top in reach.items():
            have = len(logs.get(node, ()))
            if top > have:
                more = self._entries_between({node: have}, {node: top})
                logs[node] = (*logs.get(node, ()), *more)
        if cp.blob and _same_logs(logs, cp.logs):
            # (a fresh node's catch-up: re-encoding and signing 100,000
            # entries is seconds of a worker thread holding the GIL the
            # loop that answers FUSE needs; the folder signed these bytes)
            sealed = cp.blob
        else:
            sealed = seal_checkpoint(self.identity, logs)
        return Adoption(
            covers,
            {n: len(e) for n, e in logs.items() if e},
            sealed,
            {**heads, **{n: head_of(e[-1]) for n, e in logs.items() if e}},
            sum(len(e) for e in logs.values()),
            tops=self._last_stamps(logs),
            seen=_tops(cp.ops),
        )

    def _last_stamps(self, logs: Mapping[bytes, Sequence[LogEntry]]) -> dict[bytes, Hlc]:
        """{node: the stamp of its last entry in `logs`}: what `folded_stamp`
        answers for a checkpoint of these logs. One entry opened per node,
        where a replay-like pass over every op took seconds on the loop (a
        node's stamps rise with its seqs: `commit`, `crdt.clock.refusal`)."""
        return {n: self._open(e[-1], signed_already=True).hlc for n, e in logs.items() if e}

    def install_adoption(
        self,
        cp: Checkpoint,
        prepared: Adoption,
        blocks: Iterable[tuple[bytes, bytes]] = (),
        wanted: Iterable[bytes] = (),
    ) -> bool:
        """Store a prepared adoption with the blocks its heads need, in one
        transaction; False (nothing written) if this node's checkpoint changed
        since it was prepared. A fork found while preparing is kept as evidence
        and refuses the checkpoint (`chain.Forked`). The caller then merges
        `cp.ops` into the replica."""
        if prepared.fork is not None:
            node, seq, ev = prepared.fork
            if ev is not None:
                self.add_evidence(ev)
            raise chain.Forked(node, seq)
        with self._writing():
            if self.store.covers() != prepared.covers:
                return False
            self.store.put_blocks(blocks)
            self.store.want_blocks(wanted, self._now())
            self.store.set_checkpoint(prepared.sealed, prepared.new_covers)
            chain.store_heads(self.store, prepared.heads)
        self._tops = prepared.tops
        self._folded_ops = prepared.folded
        for node, seq in prepared.new_covers.items():
            self.vv[node] = max(self.vv.get(node, 0), seq)
        self._next_seq = max(self._next_seq, self.vv.get(self.identity.node_id, 0) + 1)
        self._own_prev = self.hash_at(self.identity.node_id, self._next_seq - 1) or GENESIS
        # The clock follows the newest of the ops (as observing each in turn
        # would), not a pass over all of them on the loop; a stamp past the
        # forward bound is capped per op, so then each is observed.
        now = self._now()
        newest = max(prepared.seen.values(), default=None)
        if newest is not None and newest.wall_ms <= now + MAX_FORWARD_MS:
            self.clock.observe(newest, now)
        else:
            for op in cp.ops:
                self.clock.observe(op.hlc, now)
        self._raise_stamps(prepared.seen.values())
        return True

    async def wait_merged(self) -> None:
        """Until no merge in pieces is under way."""
        while self.merging:
            await self._merged.wait()

    @contextlib.contextmanager
    def merging_in_pieces(self) -> Iterator[None]:
        """Hold collection off (`wait_merged`) while blocks stored for ops are
        ahead of the replica that will reference them."""
        self.merging += 1
        self._merged.clear()
        try:
            yield
        finally:
            self.merging -= 1
            if not self.merging:
                self._merged.set()

    def store_blocks(self, blocks: Iterable[tuple[bytes, bytes]]) -> None:
        """Store verified blocks from peers ahead of the ops that reference them
        (in `merging_in_pieces`), so they need not wait in memory."""
        with self._writing():
            self.store.put_blocks(blocks)

    async def apply_in_pieces(self, ops: Sequence[Op]) -> Changes:
        """Merge stored `ops` into the replica `MERGE_PIECE_OPS` at a time,
        letting the loop answer FUSE between pieces; then tell who listens."""
        dirs: set[bytes] = set()
        entries: set[bytes] = set()
        # As in replay: no cyclic collection while the replica grows (a full
        # pass over it took ~0.2 s of the loop for 20,000 files, at random points).
        with collector_paused(), self.merging_in_pieces():
            for start in range(0, len(ops), MERGE_PIECE_OPS):
                piece = ops[start : start + MERGE_PIECE_OPS]
                changes = self.replica.apply(piece)
                if any(isinstance(op, Forget) for op in piece):
                    changes = self._forgets_arrived() or changes
                dirs |= changes.dirs
                entries |= changes.entries
                await asyncio.sleep(0)
        changes = Changes(frozenset(dirs), frozenset(entries))
        self._notify(changes)
        self._grown()
        return changes

    def _raise_tops(self, ops: Iterable[Op]) -> None:
        """Note the stamps of ops now held; our own (from a peer: this data dir
        was restored from an old copy) move our clock past them."""
        self._raise_stamps(op.hlc for op in ops)

    def _raise_stamps(self, stamps: Iterable[Hlc]) -> None:
        tops = self.tops
        for hlc in stamps:
            top = tops.get(hlc.node)
            if top is None or hlc > top:
                tops[hlc.node] = hlc
        own = tops.get(self.identity.node_id)
        if own is not None:
            self.clock.restore(own)

    def within_cuts(self, cp: Checkpoint) -> Checkpoint:
        """`cp` without the entries (and their ops) of forgotten or forked
        nodes past their cuts: a peer that folded them before it learnt of
        the cut must not bring them back here."""
        own = self.identity.node_id
        cuts = {n: c for n, c in self.cuts().items() if n != own and cp.covers.get(n, 0) > c}
        if not cuts:
            return cp
        logs = {n: e[: cuts[n]] if n in cuts else e for n, e in cp.logs.items()}
        seen: dict[bytes, int] = {}
        ops = []
        for op in cp.ops:  # each node's ops in seq order, one per entry (`open_checkpoint`)
            node = op.hlc.node
            seen[node] = seen.get(node, 0) + 1
            if node not in cuts or seen[node] <= cuts[node]:
                ops.append(op)
        logs = {n: e for n, e in logs.items() if e}
        return Checkpoint({n: len(e) for n, e in logs.items()}, tuple(ops), logs, cp.folder)

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

    # -- the chain: heads and evidence ---------------------------------------------
    def hash_at(self, node: bytes, seq: int) -> bytes | None:
        """The hash of entry (node, seq) if this node can tell (0: `GENESIS`)."""
        if seq == 0:
            return GENESIS
        head = self._head_at(node, seq)
        return None if head is None else head.hash

    def _head_at(self, node: bytes, seq: int) -> Head | None:
        entry = self.store.entry_at(node, seq)
        if entry is not None:
            return head_of(entry)
        head = chain.load_heads(self.store).get(node)
        return head if head is not None and head.seq == seq else None

    def heads(self) -> dict[bytes, Head]:
        """This node's newest signed head of every node it holds entries of
        (what `/hello` and `/watch` carry)."""
        out: dict[bytes, Head] = {}
        folded = chain.load_heads(self.store)
        for node, seq in self.vv.items():
            entry = self.store.entry_at(node, seq)
            head = head_of(entry) if entry is not None else folded.get(node)
            if head is not None and head.seq == seq:
                out[node] = head
        return out

    def check_heads(self, heads: Iterable[Head], source: str) -> list[Evidence]:
        """Compare a peer's heads with what this node holds at the same seqs;
        keep the contradictions and return those not kept before (heads that
        do not verify are ignored: they prove nothing against their node)."""
        found = []
        for theirs in heads:
            if theirs.seq > self.vv.get(theirs.node, 0):
                continue  # nothing held there to compare (and no lookup for made-up nodes)
            ours = self._head_at(theirs.node, theirs.seq)
            if ours is None or ours.hash == theirs.hash:
                continue
            ev = chain.proof(ours, theirs, source)
            if ev is not None:
                found.append(ev)
        return [ev for ev in found if self.add_evidence(ev)]

    def proofs(self) -> list[tuple[Head, Head]]:
        """The fork proofs this node keeps, to pass on (`chain.proof` checks them)."""
        if self._proofs is None:
            self._proofs = chain.fork_proofs(self.store.evidence(chain.FORK_KINDS))
        return self._proofs

    def add_evidence(self, ev: Evidence) -> bool:
        """Keep `ev`; the first time, say so at WARNING and, for a fork, stop
        taking the node's entries from the fork on (dropping those held)."""
        if not self.store.add_evidence(ev):
            return False
        if ev.node == self.identity.node_id:
            log.warning(
                "this node's own log forked at seq %d (was its data dir restored from an "
                "old copy?): the other nodes no longer take its writes from there; join "
                "again with a fresh --data-dir",
                ev.seq,
            )
        log.warning(
            "node %s lied: %s at seq %d (%s); from=%s; kept as evidence",
            ev.node.hex()[:8],
            ev.kind,
            ev.seq,
            ev.detail,
            ev.source,
        )
        if ev.kind in chain.FORK_KINDS:
            self._proofs = None
            self.fork_cuts = chain.fork_cuts(self.store.evidence(chain.FORK_KINDS))
            changes = self._forgets_arrived()
            if changes is not None:
                self._notify(changes)
                self._grown()
        return True

    def _chained(self, fresh: list[tuple[LogEntry, Op]], source: str) -> list[tuple[LogEntry, Op]]:
        """`fresh` (entries new here) up to, per node, the first that does not
        link onto the entry before it; a break is a fork, kept as evidence."""
        out: list[tuple[LogEntry, Op]] = []
        last: dict[bytes, Head] = {}
        broken: set[bytes] = set()
        for e, op in sorted(fresh, key=lambda pair: (pair[0].node, pair[0].seq)):
            if e.node in broken:
                continue
            before = last.get(e.node)
            if before is None or before.seq != e.seq - 1:
                before = self._head_at(e.node, e.seq - 1) if e.seq > 1 else None
            if chain.links(before, e):
                out.append((e, op))
                last[e.node] = head_of(e)
                continue
            broken.add(e.node)
            ev = chain.proof(before, head_of(e), source) if before is not None else None
            if ev is not None:
                self.add_evidence(ev)
            else:
                log.warning(
                    "refused entry %s/%d: it does not chain (from=%s)",
                    e.node.hex()[:8],
                    e.seq,
                    source,
                )
        return out

    # -- forgotten nodes ---------------------------------------------------------
    def cuts(self) -> dict[bytes, int]:
        """Node -> the last seq of its log that still counts: forgotten nodes'
        cuts (`crdt.ops.Forget`) and, for nodes that forked, the seq before the fork."""
        cuts = self.replica.forgotten()
        for node, seq in self.fork_cuts.items():
            cuts[node] = min(seq, cuts.get(node, seq))
        return cuts

    def accepts(self, node: bytes, seq: int) -> bool:
        """False for an entry of a forgotten node past its cut (see `crdt.ops.Forget`),
        or one this node refuses now (`Refused`)."""
        return self._within(self.cuts(), node, seq) and not self._refuses(node, seq)

    def _refuse(self, refused: Refused, source: str, batch: Sequence[Op]) -> None:
        self.refused[refused.node] = refused
        name = self.replica.members().get(refused.node) or next(
            (op.name for op in batch if isinstance(op, Member) and op.hlc.node == refused.node),
            "?",
        )
        log.warning(
            "refused operations of node %s (%s)%s %s",
            refused.node.hex()[:8],
            name,
            f" from peer {source}" if source else "",
            refused.describe(),
        )

    def _refuses(self, node: bytes, seq: int) -> bool:
        """True if entry (node, seq) is refused now; a refusal for a stamp
        ahead ends once our clock has caught up with it."""
        refused = self.refused.get(node)
        if refused is None or seq < refused.seq:
            return False
        if refused.why == "ahead" and refused.stamp.wall_ms <= self._now() + MAX_AHEAD_MS:
            del self.refused[node]
            log.info("clock caught up: taking operations of node %s again", node.hex()[:8])
            return False
        return True

    def asking_vv(self, theirs: dict[bytes, int]) -> dict[bytes, int]:
        """Our vector as we ask a peer for entries: a refused node's entries
        count as held (up to what the peer has), so the peer sends the others."""
        vv = dict(self.vv)
        for node, refused in list(self.refused.items()):
            if self._refuses(node, refused.seq):
                vv[node] = max(vv.get(node, 0), theirs.get(node, 0))
        return vv

    def _within(self, cuts: dict[bytes, int], node: bytes, seq: int) -> bool:
        cut = cuts.get(node)
        return cut is None or seq <= cut or node == self.identity.node_id

    def capped(self, vv: dict[bytes, int]) -> dict[bytes, int]:
        """`vv` without what this node would refuse (forgotten nodes' tails)."""
        cuts = self.cuts()
        own = self.identity.node_id
        out = {n: min(s, cuts[n]) if n in cuts and n != own else s for n, s in vv.items()}
        for node, refused in list(self.refused.items()):
            if node in out and self._refuses(node, refused.seq):
                out[node] = min(out[node], refused.seq - 1)
        return out

    def enforce_forgets(self) -> Changes | None:
        """Drop entries of forgotten nodes past their cut, if this node holds
        any (it merged them before it learnt of the `Forget`), and rebuild the
        replica from the log without them, so every node ends up with the
        same operations. Returns what changed, or None if nothing was held.
        Synchronous (at start, and without a loop); a running node uses
        `enforce_forgets_async`."""
        if not self._drop_forgotten():
            return None
        self.replica.reset()
        self.replay()
        return self.replica.everything()

    def _forgets_arrived(self) -> Changes | None:
        """A `Forget` or a fork cut arrived: enforce it now, or, while a task
        waits on `forgets_due` (`defer_forgets`), wake it to rebuild off the loop."""
        if self.defer_forgets:
            self.forgets_due.set()
            return None
        return self.enforce_forgets()

    def _drop_forgotten(self) -> bool:
        """Delete the entries past their node's cut (one transaction); whether any were held."""
        own = self.identity.node_id
        covers = self.store.covers()
        over = {
            n: max(cut, covers.get(n, 0))  # what is folded stays (see `peer.storage.chain`)
            for n, cut in self.cuts().items()
            if n != own and self.vv.get(n, 0) > max(cut, covers.get(n, 0))
        }
        if not over:
            return False
        with self.store.transaction():
            dropped = sum(self.store.delete_log_after(n, cut) for n, cut in over.items())
        log.warning(
            "dropped %d operation(s) of node(s) %s written after they were forgotten or forked",
            dropped,
            ",".join(n.hex()[:8] for n in over),
        )
        self.vv = self.store.version_vector()
        return True

    async def enforce_forgets_async(self) -> Changes | None:
        """`enforce_forgets` with the rebuild (a replay of the whole volume) in
        a worker thread, into a new replica, while the loop goes on answering
        FUSE and merging into the old one; what reached the store meanwhile is
        merged into the new one, which then takes the old one's place."""
        if not self._drop_forgotten():
            return None
        while True:
            rebuilt = await asyncio.to_thread(self._rebuild)
            if await self._catch_up(rebuilt):
                break
            log.info("rebuilding the replica again: the checkpoint changed meanwhile")
        # (`tops` and the clock already followed every op now held: they
        # came through `commit`, `merge_remote` or replay)
        self.replica.become(rebuilt.replica)
        changes = self.replica.everything()
        self._grown()
        return changes

    def _rebuild(self) -> _Rebuilt:
        """A new replica of what the store holds (a worker thread: reads only
        the store); with the covers and the seqs it read, to catch up from."""
        covers = self.store.covers()
        replica = Replica()
        seen = dict(covers)
        blob = self.store.get_checkpoint()
        with collector_paused():
            batch: list[Op] = []
            for op in () if blob is None else iter_checkpoint_ops(self.keys, blob):
                batch.append(op)
                if len(batch) >= REPLAY_CHUNK:
                    replica.apply(batch)
                    batch = []

            def read() -> Iterator[LogEntry]:
                for entry in self.store.iter_log():
                    if entry.seq <= covers.get(entry.node, 0):
                        continue  # (folded meanwhile: the covers differ, so it is read again)
                    seen[entry.node] = max(seen.get(entry.node, 0), entry.seq)
                    yield entry

            for op in self._open_stored(read()):  # as replay opens them
                batch.append(op)
                if len(batch) >= REPLAY_CHUNK:
                    replica.apply(batch)
                    batch = []
            replica.apply(batch)
        return _Rebuilt(replica, covers, seen)

    async def _catch_up(self, rebuilt: _Rebuilt) -> bool:
        """Merge into `rebuilt` what the store took since it was read, a piece
        at a time; False if the checkpoint changed meanwhile (read it again).
        Returns with the store and `rebuilt` holding the same entries."""
        while True:
            if self.store.covers() != rebuilt.covers:
                return False
            late = self._entries_between(rebuilt.seen, self.vv)
            if not late:
                return True
            for start in range(0, len(late), MERGE_PIECE_OPS):
                piece = late[start : start + MERGE_PIECE_OPS]
                rebuilt.replica.apply(list(self._open_stored(piece)))
                for e in piece:
                    rebuilt.seen[e.node] = max(rebuilt.seen.get(e.node, 0), e.seq)
                await asyncio.sleep(0)

    def _notify(self, changes: Changes) -> None:
        for listener in self.listeners:
            listener(changes)

    def _grown(self) -> None:
        for callback in self.grew:
            callback()

    def statistics(self) -> JournalStatistics:
        ops, _ = self.replica.counts()
        return JournalStatistics(ops, ops, self._next_seq - 1)


def _same_logs(
    ours: Mapping[bytes, Sequence[LogEntry]], theirs: Mapping[bytes, Sequence[LogEntry]]
) -> bool:
    """Whether `ours` are `theirs`, node by node, the very same entries (what
    `prepare_adoption` took unchanged from a checkpoint)."""
    ours = {n: e for n, e in ours.items() if e}
    theirs = {n: e for n, e in theirs.items() if e}
    return ours.keys() == theirs.keys() and all(ours[n] is theirs[n] for n in ours)
