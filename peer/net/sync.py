"""Sync: pull peers' log suffixes and the blocks they reference, and serve ours.

Invariant: a remote operation enters this node only together with every block
the merged state will show because of it (the block maps of its file's heads
afterwards), verified (signature and MAC of the entry; decryption and id of
each block), in one store transaction (`Journal.merge_remote`). So a reader
never meets a block that has not arrived yet, and any peer that has an
operation can serve the blocks of what it shows. Blocks only superseded
versions reference (history) are fetched when some peer still has them and
skipped otherwise: after collection (`peer.storage.gc`) peers legitimately lack the
blocks of superseded, stable versions past the retention, and answer without
them.

How it flows: each peer address gets a `Link`, a task that says hello, pulls
whatever the peer has and we lack, then long-polls the peer's `/watch`, which
answers the moment the peer's log grows (the push) or after `WATCH_S` (the
periodic anti-entropy). Errors end the round and the link retries with
capped exponential backoff. Pulls are serialized (one at a time per node), so
three peers offering the same operations cost one download, not three.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import aiohttp

from crdt.content import Contents, Version
from crdt.merge import Changes
from crdt.ops import BLOCK_SIZE, TRASH, Move, Op, Write
from fuse.errors import NoSpace
from peer import pacing
from peer.errors import CorruptBlock, CorruptEntry
from peer.identity import NodeIdentity
from peer.keys import VolumeKeys
from peer.metrics import Metrics
from peer.net import wire
from peer.net.auth import AuthFailed, wall_ms
from peer.net.client import (
    EpochRefused,
    PeerClient,
    PeerError,
    ProtocolMismatch,
    SelfConnection,
)
from peer.net.fetching import FETCH_CONCURRENCY, Fetching
from peer.net.gate import CLIENT_KEEPALIVE_S, Summary
from peer.net.server import MAX_WATCH_S, serving
from peer.net.serving import Pairing, Serving
from peer.pacing import pace
from peer.sealing import EntryOfUnknownEpoch, Head, LogEntry
from peer.storage import chain
from peer.storage.blocks import Blocks
from peer.storage.checkpoint import ForgedCheckpoint, covered, open_checkpoint
from peer.storage.gc import Stability, Thinning
from peer.storage.journal import MERGE_PIECE_OPS, Journal

log = logging.getLogger("peer.sync")

WATCH_S = 20.0
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0
# A pulled batch is merged in pieces whose missing blocks fit in this many
# bytes, so memory stays bounded however large the files are.
MERGE_BLOCK_BYTES = 64 * 1024 * 1024
# A merge that fetched at least this many blocks (32 MiB) gives the freed heap back after.
BULK_BLOCKS = 256
# Files whose versions `Sync._needed_async` reads from the replica between yields.
NEEDED_PIECE = 2000
# Entries of a pulled batch opened ahead, in a worker thread, while the loop
# merges the ones before (`Sync._open_and_merge`): ~50 ms of opening each.
OPEN_PIECE = 512
# Links to addresses peers asked us to sync back with (`/hello?port=N`): at
# most this many, one per node id, dropped unless the address answers as that
# node, or when it has not answered for INBOUND_EXPIRE_S.
MAX_INBOUND = 64
INBOUND_EXPIRE_S = 600.0


@dataclass(frozen=True, slots=True)
class PeerStatistics:
    id: str | None
    name: str | None
    address: str
    source: str
    connected: bool
    version_vector: dict[str, int]
    last_seen: float | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class SyncStatistics:
    listen: str
    version_vector: dict[str, int]
    peers: list[PeerStatistics]
    operations_behind: int
    blocks_missing: int
    bytes_missing: int
    blocks_wanted: int
    operations_received: int
    blocks_received: int
    bytes_received: int
    refused_requests: int


def _hexvv(vv: dict[bytes, int]) -> dict[str, int]:
    return {node.hex(): seq for node, seq in sorted(vv.items())}


def _behind(theirs: dict[bytes, int], ours: dict[bytes, int]) -> int:
    return sum(max(0, seq - ours.get(node, 0)) for node, seq in theirs.items())


def referenced_blocks(ops: Iterable[Op]) -> set[bytes]:
    """The ids of the blocks `ops` reference."""
    return {bid for op in ops if isinstance(op, Write) for _, bid in op.blocks if bid is not None}


@dataclass(eq=False)
class Link:
    """One peer address and what we know of the node behind it."""

    host: str
    port: int
    source: str
    node_id: bytes | None = None
    name: str | None = None
    connected: bool = False
    vv: dict[bytes, int] = field(default_factory=dict)
    last_seen: float | None = None
    last_error: str | None = None
    is_self: bool = False
    task: asyncio.Task[None] | None = None
    client: PeerClient | None = None
    expect: bytes | None = None  # an inbound link: the node id that asked for it

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def label(self) -> str:
        """How metrics name the peer: its short id, its address until known."""
        return self.node_id[:4].hex() if self.node_id is not None else self.address

    def responsive(self) -> bool:
        """Connected, and heard from within a long poll's time (a partition
        leaves a poll hanging, not failed, until its timeout)."""
        recent = self.last_seen is not None and time.time() - self.last_seen < WATCH_S + 5
        return self.connected and recent

    def statistics(self) -> PeerStatistics:
        return PeerStatistics(
            id=self.node_id.hex() if self.node_id else None,
            name=self.name,
            address=self.address,
            source=self.source,
            connected=self.responsive(),
            version_vector=_hexvv(self.vv),
            last_seen=self.last_seen,
            last_error=self.last_error,
        )


class Sync(Fetching, Serving):
    """This node's side of the network: the peer server and one `Link` per peer."""

    def __init__(
        self,
        journal: Journal,
        blocks: Blocks,
        keys: VolumeKeys,
        identity: NodeIdentity,
        name: str,
        on_remote: Callable[[Changes], Awaitable[None]],
    ) -> None:
        self.journal = journal
        self.store = journal.store
        self.blocks = blocks
        self.keys = keys
        self.identity = identity
        self.name = name
        self.on_remote = on_remote
        self.links: dict[tuple[str, int], Link] = {}
        self.listen = ""
        self.port = 0
        self._closing = False
        self.metrics = Metrics()  # the node shares its own (see peer.metrics)
        self.bytes_in = 0
        self.ops_in = 0
        self.blocks_in = 0
        self.refused = 0
        # The clock retention's choices read (the collector's: tests freeze both).
        self.now_ms: Callable[[], int] = wall_ms
        self._missing_blocks = 0
        self._missing_bytes = 0
        self._session: aiohttp.ClientSession | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._pull_lock = asyncio.Lock()
        self._grew = asyncio.Event()
        # What strangers cause at the peer port: one log line per interval.
        self.strangers = Summary(log)
        self._inflight: dict[bytes, asyncio.Future[bytes | None]] = {}
        # Wanted blocks (kept in the store): when each may be asked for
        # again (monotonic time) and the delay that led there.
        self._want_next: dict[bytes, tuple[float, float]] = {}
        self._want_wake = asyncio.Event()
        self.on_peers_changed: Callable[[], None] | None = None
        # Called after a bulk merge (a checkpoint) freed its transient memory.
        self.after_bulk: Callable[[], None] | None = None
        # What this node knows of every member's version vector (set by the node).
        self.stability: Stability | None = None
        self._gossip_version = 0
        # The gossip version each calling member's last hello or long poll was
        # answered with (`Serving.wait_log_differs`); one small int per member.
        self._gossip_answered: dict[str, int] = {}
        # Fetch the blocks of superseded versions too (history for --at and
        # restore); a node that keeps no history (`--keep-history 0`) skips them.
        self.fetch_history = True
        # This node's retention (thinning, keep ms): history blocks are fetched
        # only for the versions it keeps (None: every version the ops list).
        self.retention: tuple[Thinning, int] | None = None
        # Serves `/pair/*` without the volume MAC (set by the node: peer.invitations).
        self.pairing: Pairing | None = None
        journal.grew.append(self._log_grew)

    # -- lifetime ------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def running(
        self, host: str, port: int, sock: socket.socket | None = None
    ) -> AsyncIterator[Sync]:
        """Serve peers on host:port (or on `sock`, bound there already) and run
        links until the block exits.

        Raises OSError (e.g. EADDRINUSE) before anything starts if the port
        cannot be bound."""
        async with contextlib.AsyncExitStack() as stack:
            bound = await stack.enter_async_context(serving(self, host, port, sock))
            # Wake long polls so the server can stop: the event of now, not the
            # one of this line (`_log_grew` replaces it each time the log grows).
            stack.callback(self._log_grew)
            stack.callback(setattr, self, "_closing", True)
            shown = f"[{host}]" if ":" in host else host
            self.listen = f"{shown}:{bound}"
            self.port = bound
            log.info("serving peers: listen=%s", self.listen)
            connector = aiohttp.TCPConnector(
                limit=64,
                limit_per_host=FETCH_CONCURRENCY + 2,
                keepalive_timeout=CLIENT_KEEPALIVE_S,
            )
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                asyncio.TaskGroup() as tasks,
            ):
                self._session = session
                self._tasks = tasks
                wanted = tasks.create_task(self._retry_wanted(), name="wanted blocks")
                try:
                    for link in self.links.values():
                        self._start(link)
                    yield self
                finally:
                    wanted.cancel()
                    for link in self.links.values():
                        if link.task is not None:
                            link.task.cancel()
                    self._tasks = None

    def add_peer(self, host: str, port: int, source: str) -> None:
        key = (host, port)
        if key in self.links:
            return
        link = Link(host, port, source)
        self.links[key] = link
        log.info("peer address added: address=%s source=%s", link.address, source)
        if self._tasks is not None:
            self._start(link)
        self._peers_changed()

    def add_inbound(self, host: str, port: int, node: bytes) -> None:
        """Node `node` said hello and serves peers on host:port: sync back with
        it, unless a link already reaches it. One such link per node id (a new
        port replaces the old), at most `MAX_INBOUND`; `_run_link` drops it
        unless the address answers a hello as `node`."""
        if (host, port) in self.links:
            return
        for key, link in list(self.links.items()):
            if link.node_id == node and link.connected:
                return
            if link.source == "inbound" and link.expect == node:
                self._drop(key, link)
        if sum(link.source == "inbound" for link in self.links.values()) >= MAX_INBOUND:
            return
        self.add_peer(host, port, "inbound")
        self.links[(host, port)].expect = node

    def _drop(self, key: tuple[str, int], link: Link) -> None:
        if self.links.get(key) is link:
            del self.links[key]
        if link.task is not None and link.task is not asyncio.current_task():
            link.task.cancel()
        self._peers_changed()

    def remove_peer(self, host: str, port: int) -> None:
        link = self.links.get((host, port))
        if link is None or link.source != "mdns":
            return  # static and remembered peers stay
        del self.links[(host, port)]
        log.info("peer gone: address=%s", link.address)
        if link.task is not None:
            link.task.cancel()
        self._peers_changed()

    def _peers_changed(self) -> None:
        if self.on_peers_changed is not None:
            self.on_peers_changed()

    def _start(self, link: Link) -> None:
        assert self._tasks is not None and self._session is not None
        link.client = PeerClient(self._session, link.host, link.port, self)
        link.task = self._tasks.create_task(self._run_link(link), name=f"link {link.address}")

    # -- one peer ------------------------------------------------------------------
    async def _run_link(self, link: Link) -> None:
        backoff = BACKOFF_MIN_S
        client = link.client
        assert client is not None
        while True:
            try:
                hello = await client.hello()
                if hello.node == self.identity.node_id:
                    raise SelfConnection(link.address)
                if link.expect is not None and hello.node != link.expect:
                    log.info("inbound address %s is not the node that named it", link.address)
                    self._drop((link.host, link.port), link)
                    return
                if link.node_id != hello.node or not link.connected:
                    log.info(
                        "peer connected: address=%s node=%s name=%s",
                        link.address,
                        hello.node.hex()[:8],
                        hello.name,
                    )
                link.node_id, link.name, link.vv = hello.node, hello.name, hello.vv
                link.connected, link.last_error = True, None
                link.last_seen = time.time()
                self._learn(hello.node, hello.vv, hello.known)
                await self._compare_chains(link, hello.heads, hello.forks)
                self._want_next.clear()  # a peer that may have wanted blocks
                self._want_wake.set()
                self._peers_changed()
                while True:
                    await self._pull(link)
                    since = wire.vv_digest(link.vv)
                    watched = await client.watch(since, min(WATCH_S, MAX_WATCH_S))
                    link.vv = watched.vv
                    link.last_seen = time.time()
                    self._learn(hello.node, watched.vv, watched.known)
                    await self._compare_chains(link, watched.heads, watched.forks)
                    # Only a whole round resets the backoff: a peer whose hello
                    # works but whose other answers fail is not hammered.
                    backoff = BACKOFF_MIN_S
            except asyncio.CancelledError:
                link.connected = False
                raise
            except SelfConnection:
                link.is_self, link.connected = True, False
                log.info("address %s is this node: not syncing with it", link.address)
                return
            except ProtocolMismatch as exc:
                self._link_failed(link, f"incompatible peer: {exc}", logging.WARNING)
                backoff = BACKOFF_MAX_S * 6
            except EpochRefused as exc:
                self._link_failed(link, f"refused: {exc}", logging.WARNING)
                backoff = BACKOFF_MAX_S
            except AuthFailed as exc:
                if "401" in str(exc) and self.keys.current is not self.keys.base:
                    # Likely a member that was away and holds no later key
                    # epoch yet: it catches up when it calls us (`peer.epochs`).
                    self._link_failed(
                        link,
                        f"refused ({exc}): the peer may not hold key epoch "
                        f"{self.keys.current.number} yet",
                        logging.INFO,
                    )
                else:
                    hint = (
                        ": the peer does not share this volume's secret"
                        if "401" in str(exc)
                        else ""
                    )
                    self._link_failed(link, f"authentication failed ({exc}){hint}", logging.WARNING)
                    backoff = BACKOFF_MAX_S * 6
            except (CorruptEntry, CorruptBlock, wire.BadMessage) as exc:
                self._link_failed(link, f"peer sent bad data: {exc}", logging.WARNING)
            except (aiohttp.ClientError, TimeoutError, OSError, PeerError, NoSpace) as exc:
                # NoSpace: a full disk, said once per episode by `peer.storage.space`.
                self._link_failed(link, f"{type(exc).__name__}: {exc}", logging.INFO)
            except Exception as exc:
                # A bug, or a state we cannot store (a full disk, a gap a peer's
                # data would leave): this peer's round ends, the node goes on.
                log.exception("sync with %s failed", link.address)
                self._link_failed(link, f"{type(exc).__name__}: {exc}", logging.ERROR)
                backoff = BACKOFF_MAX_S
            if link.expect is not None and (
                link.last_seen is None or time.time() - link.last_seen > INBOUND_EXPIRE_S
            ):
                # An inbound address that never answered as its node, or has
                # not for long: forget it (the node names it again at its hello).
                self._drop((link.host, link.port), link)
                return
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def attach(self, stability: Stability) -> None:
        """Learn and pass on members' version vectors through `stability`."""
        self.stability = stability
        stability.grew.append(self._gossip_grew)

    def _learn(self, node: bytes, vv: dict[bytes, int], known: wire.Gossip) -> None:
        if self.stability is not None:
            self.stability.learn(node, vv)
            self.stability.learn_gossip(known)

    def _gossip_grew(self) -> None:
        self._gossip_version += 1
        self._log_grew()

    async def _compare_chains(self, link: Link, heads: list[Head], forks: list[wire.Proof]) -> None:
        """Check a peer's heads against ours and take its fork proofs
        (`peer.storage.chain`). Where heads differ, the fork may lie lower: ask the
        peer for that node's entries and keep the first that differs."""
        journal = self.journal
        for a, b in forks:
            cut = journal.fork_cuts.get(a.node)
            if cut is not None and cut <= min(a.seq, b.seq) - 1:
                continue  # nothing this proof could add (and two signature checks saved)
            ev = chain.proof(a, b, link.address)
            if ev is not None:
                journal.add_evidence(ev)
        for ev in journal.check_heads(heads, link.address):
            await self._locate_fork(link, ev.node)

    async def _locate_fork(self, link: Link, node: bytes) -> None:
        client = link.client
        assert client is not None
        low = self.store.covers().get(node, 0)
        resp = await client.log({**link.vv, node: low})
        for e in resp.entries:
            if e.node != node:
                continue
            ours = self.store.entry_at(node, e.seq)
            if ours is None:
                break
            ev = chain.proof(chain.head_of(ours), chain.head_of(e), link.address)
            if ev is not None:
                self.journal.add_evidence(ev)
                break

    def gossip(self) -> wire.Gossip:
        return self.stability.gossip() if self.stability is not None else {}

    def _link_failed(self, link: Link, reason: str, level: int) -> None:
        first = link.connected or link.last_error != reason
        link.connected = False
        link.last_error = reason
        if first:
            log.log(level, "peer unreachable: address=%s reason=%s", link.address, reason)
        self._peers_changed()

    async def _pull(self, link: Link) -> None:
        """Pull everything `link`'s peer has and we lack."""
        client = link.client
        assert client is not None
        journal = self.journal
        async with self._pull_lock:
            while _behind(journal.capped(link.vv), journal.vv) > 0:
                resp = await client.log(journal.asking_vv(link.vv))
                progressed, stuck = False, False
                if resp.checkpoint is not None:
                    before = dict(journal.vv)
                    covered_now = await self._adopt(link, resp.checkpoint)
                    progressed = journal.vv != before
                    # It will be sent again: what it covers past a cut is refused here.
                    stuck = not covered_now and not progressed
                entries = [
                    e
                    for e in resp.entries
                    if e.seq > journal.vv.get(e.node, 0) and journal.accepts(e.node, e.seq)
                ]
                if not entries:
                    if progressed or (not resp.entries and resp.more and not stuck):
                        continue
                    return
                await self._open_and_merge(link, entries)
                link.last_seen = time.time()
                for node in {e.node for e in entries}:
                    refused = journal.refused.get(node)
                    if refused is not None:
                        link.last_error = f"refused operations of node {node.hex()[:8]} " + (
                            refused.describe()
                        )
                if not resp.more and _behind(journal.capped(link.vv), journal.vv) == 0:
                    return

    async def _open_and_merge(self, link: Link, entries: list[LogEntry]) -> None:
        """Verify, open and merge a pulled batch, `OPEN_PIECE` entries at a
        time: a worker thread opens the next piece (signatures and decryption,
        ~0.1 ms an entry) while the loop fetches the blocks of this one and
        merges it, where the whole batch was opened first (~0.45 s for 4,000
        entries with nothing fetched meanwhile). A piece is merged as a
        smaller batch would be: in order, each node's entries in seq order."""
        client = link.client
        assert client is not None
        start = 0
        opening = _opening(self.journal, entries[:OPEN_PIECE])
        try:
            while start < len(entries):
                piece = entries[start : start + OPEN_PIECE]
                try:
                    ops = await opening
                except EntryOfUnknownEpoch:
                    # A rotation this node has not taken yet (it was away, or
                    # its entry comes later in the batch): the peer hands it
                    # over, then the rest opens at once, as one piece.
                    await client.catch_up()
                    piece = entries[start:]
                    ops = await asyncio.to_thread(self.journal.open_entries, piece)
                end = start + len(piece)
                if end < len(entries):
                    opening = _opening(self.journal, entries[end : end + OPEN_PIECE])
                await self._merge(link, piece, ops)
                start = end
        finally:
            if not opening.done():
                opening.cancel()  # (its thread ends on its own; nothing waits for it)

    async def _adopt(self, link: Link, blob: bytes) -> bool:
        """Verify a peer's checkpoint, fetch the blocks its heads need, merge it;
        whether this node's vector now covers it (the peer will not send it again).

        No cyclic collection meanwhile (`pacing.collector_paused`): a full
        pass over the millions of objects a large checkpoint opens into held
        the GIL for up to 100 ms at a time, at random points."""
        with pacing.collector_paused():
            return await self._adopt_paused(link, blob)

    async def _adopt_paused(self, link: Link, blob: bytes) -> bool:
        try:
            cp = await pacing.to_thread(open_checkpoint, self.journal.keys, blob)
        except ForgedCheckpoint as exc:
            self.journal.add_evidence(
                chain.forged_checkpoint(exc.folder, exc.detail, link.address, blob)
            )
            raise
        covers = cp.covers  # what the peer compares our vector with
        cp = self.journal.within_cuts(cp)
        if covered(self.journal.vv, cp.covers):
            return covered(self.journal.vv, covers)  # what it folds arrived meanwhile
        ops = cp.ops
        required, optional = await self._needed_async(ops)
        # A checkpoint's blocks can be the whole volume: they go to the store as
        # they arrive, not into memory, and collection waits until the ops
        # that reference them are merged.
        with self.journal.merging_in_pieces():
            fetched, lost = await self._fetch(
                list(required), prefer=link, optional=list(optional), store=True
            )
            # Merging the two checkpoints and sealing the result reads only the
            # store: a worker thread, so the loop goes on answering FUSE.
            prepared = await pacing.to_thread(
                self.journal.prepare_adoption, cp, dict(self.journal.vv), link.address
            )
            with self.store.checkpoint_deferred():  # (the WAL copied beside the loop)
                installed = prepared is not None and self.journal.install_adoption(
                    cp, prepared, wanted=lost
                )
            await asyncio.to_thread(self.store.checkpoint_wal)
            if not installed:
                return covered(self.journal.vv, covers)  # covered meanwhile
            self._now_wanted(lost, link)
            # The replica takes the ops a piece at a time: the loop goes on answering FUSE.
            changes = await self.journal.apply_in_pieces(ops)
        self.metrics.ops_received.labels(link.label).inc(len(ops))  # old: no merge delay
        self.ops_in += len(ops)
        self.blocks_in += len(fetched)
        log.info(
            "merged a checkpoint: from=%s ops=%d blocks=%d", link.address, len(ops), len(fetched)
        )
        del cp, ops, fetched
        if self.after_bulk is not None:
            # (malloc_trim over a heap that held a whole volume: tens of ms)
            await asyncio.to_thread(self.after_bulk)
        await self.on_remote(changes)
        return covered(self.journal.vv, covers)

    def _needed(self, ops: Sequence[Op]) -> tuple[set[bytes], set[bytes]]:
        """(required, optional): the blocks merging `ops` needs that this node lacks.

        Required: the block maps of the heads of every file `ops` write or
        delete, in the state after the merge. Optional: the other blocks `ops`
        list (superseded versions: history a peer may have collected), only of
        the versions this node's retention keeps (`retention`)."""
        files, fresh = _written(ops)
        contents = self.journal.replica.contents
        held = {e: [contents.versions[h] for h in contents.of(e)] for e in files}
        return self._needed_given(ops, held, fresh)

    async def _needed_async(self, ops: Sequence[Op]) -> tuple[set[bytes], set[bytes]]:
        """`_needed` for a checkpoint's ops (a whole volume): what reads only
        `ops` and the store runs in a worker thread; the replica's versions of
        the files they write are read on the loop a piece at a time (the loop
        changes the replica meanwhile, so no thread reads it)."""
        files, fresh = await pacing.to_thread(_written, ops)
        contents = self.journal.replica.contents
        held: dict[bytes, list[Version]] = {}
        for i, entry in enumerate(files):
            if i and not i % NEEDED_PIECE:
                await asyncio.sleep(0)  # let FUSE requests in between pieces
            held[entry] = [contents.versions[h] for h in contents.of(entry)]
        return await pacing.to_thread(self._needed_given, ops, held, fresh)

    def _needed_given(
        self, ops: Sequence[Op], held_versions: dict[bytes, list[Version]], fresh: list[Version]
    ) -> tuple[set[bytes], set[bytes]]:
        """`_needed` with the replica's versions of each file `ops` write
        (`held_versions`) and the versions `ops` add (`fresh`) read already:
        reads only these and the store, so a worker thread may run it."""
        files = held_versions.keys()
        after = Contents()
        for versions in held_versions.values():
            for version in versions:
                after.add(version)
        for version in fresh:
            pace()
            after.add(version)
        required: set[bytes] = set()
        for entry in files:
            pace()
            for head in after.heads(entry):
                if not after.versions[head].tombstone:
                    required.update(after.block_map(head).values())
        optional: set[bytes] = set()
        if self.fetch_history and self.retention is None:
            optional = referenced_blocks(ops) - required
        elif self.fetch_history and self.retention is not None:
            # Only versions the collector here would keep (staggered versioning):
            # the rest it would delete at its next collection.
            thinning, keep_ms = self.retention
            now = self.now_ms()
            for entry in files:
                for h in sorted(thinning.history_kept(after, entry, now, keep_ms)):
                    optional.update(after.block_map(h).values())
            optional = (optional & referenced_blocks(ops)) - required
        held = self.store.has_blocks(required | optional)
        # Blocks already wanted are asked for by `_retry_wanted`, not again here.
        held.update(self.store.wanted_blocks())
        return required - held, optional - held

    async def _merge(self, link: Link, entries: list[LogEntry], ops: list[Op]) -> None:
        """Fetch the blocks `entries` need and merge them, a bounded piece at a time.

        The blocks go to the store as they arrive, not into memory; collection
        waits until the ops that reference them are merged."""
        before = self.blocks_in
        with self.journal.merging_in_pieces():
            await self._merge_pieces(link, entries, ops)
        if self.blocks_in - before >= BULK_BLOCKS and self.after_bulk is not None:
            # Blocks came in answers of a few MiB, each copied a few times and
            # opened in worker threads: glibc keeps the freed heap (20-30 MiB
            # after a 208 MiB catch-up) unless asked to give it back.
            await asyncio.to_thread(self.after_bulk)

    async def _merge_pieces(self, link: Link, entries: list[LogEntry], ops: list[Op]) -> None:
        required, optional = self._needed(ops)
        start = 0
        while start < len(entries):
            end = start
            want: set[bytes] = set()
            while end < len(entries):
                if end - start >= MERGE_PIECE_OPS:
                    break  # a piece the loop merges without keeping FUSE waiting long
                refs = [b for b in referenced_blocks([ops[end]]) if b in required or b in optional]
                missing = [b for b in refs if b not in want]
                if want and (len(want) + len(missing)) * BLOCK_SIZE > MERGE_BLOCK_BYTES:
                    break
                want.update(missing)
                end += 1
            if end == len(entries):
                want |= required  # heads' blocks from versions held before this batch
            must = want & required
            required -= want
            optional -= want
            self._missing_blocks = len(want)
            self._missing_bytes = BLOCK_SIZE * len(want)
            try:
                fetched, lost = await self._fetch(
                    list(must), prefer=link, optional=list(want - must), store=True
                )
            finally:
                self._missing_blocks = self._missing_bytes = 0
            # Degrade, never halt: operations whose blocks no peer has merge
            # anyway; the blocks are wanted, and only reads of them fail.
            changes = self.journal.merge_remote(
                entries[start:end], ops[start:end], wanted=lost, source=link.address
            )
            self._now_wanted(lost, link)
            self.metrics.merged(link.label, [op.hlc for op in ops[start:end]], wall_ms())
            self.ops_in += end - start
            self.blocks_in += len(fetched)
            log.debug("merged: from=%s ops=%d blocks=%d", link.address, end - start, len(fetched))
            await self.on_remote(changes)
            await asyncio.sleep(0)  # let FUSE requests in between pieces
            start = end

    # -- status --------------------------------------------------------------------
    def statistics(self) -> SyncStatistics:
        ours = self.journal.vv
        behind = max(
            (
                _behind(self.journal.capped(link.vv), ours)
                for link in self.links.values()
                if link.connected
            ),
            default=0,
        )
        return SyncStatistics(
            listen=self.listen,
            version_vector=_hexvv(ours),
            peers=[link.statistics() for link in self.links.values() if not link.is_self],
            operations_behind=behind,
            blocks_missing=self._missing_blocks,
            bytes_missing=self._missing_bytes,
            blocks_wanted=len(self.store.wanted_blocks()),
            operations_received=self.ops_in,
            blocks_received=self.blocks_in,
            bytes_received=self.bytes_in,
            refused_requests=self.refused,
        )


def _written(ops: Sequence[Op]) -> tuple[list[bytes], list[Version]]:
    """The files `ops` write or delete (in first-seen order) and the versions
    they add: what `Sync._needed` starts from; reads only `ops`."""
    files: dict[bytes, None] = {}
    fresh: list[Version] = []
    for op in ops:
        pace()
        if isinstance(op, Write):
            files[op.entry] = None
            fresh.append(Version(op.hlc, op.entry, op.bases, op.size, op.blocks, False))
        elif isinstance(op, Move) and op.parent == TRASH:
            files[op.entry] = None
            fresh.append(Version(op.hlc, op.entry, op.seen, 0, (), tombstone=True))
    return list(files), fresh


def _opening(journal: Journal, entries: list[LogEntry]) -> asyncio.Future[list[Op]]:
    """`journal.open_entries(entries)` under way in a worker thread; whatever
    it raises is kept for whoever awaits it (and not reported if nobody does)."""
    future = asyncio.ensure_future(asyncio.to_thread(journal.open_entries, entries))
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    return future
