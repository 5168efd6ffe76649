"""A running node: opens the data dir, replays the log, mounts, serves status.

Invariant: nothing on disk is created or changed until every check a user can
fail (mountpoint, FUSE device, secret, data dir lock) has passed; and whatever
was mounted is unmounted, and whatever was buffered is flushed, on every way
out (SIGINT, SIGTERM, an error).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import signal
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cbor2

from crdt.merge import Changes, Replica
from fuse.errors import NoSpace
from peer import epochs, metrics, removal, running, service, statuspage
from peer.control import _advertised, control_server
from peer.errors import (
    DataDirLocked,
    ListenFailed,
    LostOnExit,
    MountpointBusy,
    MountpointMissing,
    MountpointNotDirectory,
    MountpointNotEmpty,
    MountRefused,
    NoFuseDevice,
    PortInUse,
    WrongSecret,
)
from peer.fs.volume import Volume
from peer.identity import NodeIdentity, load_or_create
from peer.keys import VolumeKeys
from peer.net import gate, invitations
from peer.net.auth import PROTOCOL
from peer.net.sync import PeerStatistics, Sync
from peer.progress import CatchUp
from peer.sealing import check_opens, make_check
from peer.storage import gc, history
from peer.storage.blocks import Blocks
from peer.storage.journal import Journal
from peer.storage.space import Space
from peer.storage.store import Evidence, ReadOnlyStore, Store, StoreStats

if TYPE_CHECKING:
    from fuse.adapter import FuseOperations

log = logging.getLogger(__name__)

DB_NAME = "volume.db"
CHECK_NAME = "volume.check"
LOCK_NAME = "lock"
FUSE_DEVICE = Path("/dev/fuse")


def default_data_home() -> Path:
    return running.data_home()


def default_data_dir(keys: VolumeKeys) -> Path:
    return default_data_home() / keys.tag_hex


DEFAULT_PORT = 7654
REMEMBERED_PEERS = "peers"
PROGRESS_EVERY_S = 1.0
# Directories or entries of a merge's changes the volume looks at between yields.
REMOTE_CHANGED_PIECE = 5000


@dataclass(frozen=True, slots=True)
class NodeConfig:
    mountpoint: Path
    data_dir: Path
    name: str
    read_only: bool = False
    debug_fuse: bool = False
    listen_host: str = "0.0.0.0"
    listen_port: int = DEFAULT_PORT
    peers: tuple[tuple[str, int], ...] = ()
    mdns: bool = True
    # How long old versions stay restorable (`--keep-history`; GC keeps them).
    keep_history_s: float = history.DEFAULT_KEEP_HISTORY_S
    # How history thins out with age (`--thin-history`; () keeps every version).
    thin_history: tuple[tuple[int, int], ...] = gc.DEFAULT_TIERS
    # `--at`: show the volume as it was at this unix time (ms), read-only.
    at_ms: int | None = None
    # The status page and /metrics on 127.0.0.1 (0: any free port; None: none).
    page_port: int | None = 0


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """What `dfs-peer status` shows."""

    node_id: str
    short_id: str
    name: str
    volume: str
    mountpoint: str
    data_dir: str
    read_only: bool
    files: int
    operations: int
    own_operations: int
    blocks: int
    block_bytes: int
    store_bytes: int
    cache_bytes: int
    cache_hits: int
    cache_misses: int
    uptime_s: float
    listen: str
    version_vector: dict[str, int]
    peers: list[PeerStatistics]
    sync: dict[str, int]
    # Blocks the merged state needs that no peer had yet: reads of what they
    # hold fail with EIO until they arrive (asked for again in the background).
    blocks_wanted: int
    # Nodes whose operations this node refuses (a stamp not above that node's
    # previous one, or too far ahead of this node's clock): node id -> why.
    entries_refused: dict[str, str]
    # Causal stability and collection: what is stable, who holds it back.
    gc: dict[str, Any]
    # What members signed that contradicts itself (`peer.storage.chain`), oldest first.
    lies: list[dict[str, Any]]
    # The local status page (without its token; `dfs-peer open` adds it), or "".
    page: str = ""
    # While behind the peers: forward-only progress (see `peer.progress`).
    catching_up: dict[str, Any] | None = None
    # Conflict copies shown now, with the versions they came from.
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    # The key epoch this node writes under and the removed nodes (`peer.epochs`).
    keys: dict[str, Any] = field(default_factory=dict)


def _pieces(changes: Changes, size: int) -> Iterator[Changes]:
    """`changes` as consecutive pieces of at most `size` directories or entries
    (names are left out: `Volume.remote_changed` does not read them); at least one."""
    dirs, entries = list(changes.dirs), list(changes.entries)
    yield Changes(frozenset(dirs[:size]), frozenset(entries[:size]))
    for start in range(size, max(len(dirs), len(entries)), size):
        yield Changes(
            frozenset(dirs[start : start + size]), frozenset(entries[start : start + size])
        )


def give_back_memory() -> None:
    """Return the heap replay freed to the system (glibc keeps it otherwise:
    ~25 MiB of a 100,000-file restart's transient decoding)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def check_mountpoint(path: Path) -> None:
    """Refuse a mountpoint that is missing, not a directory, mounted or not empty."""
    if not path.exists():
        raise MountpointMissing(path=path)
    if not path.is_dir():
        raise MountpointNotDirectory(path=path)
    if os.path.ismount(path):
        raise MountpointBusy(path=path)
    with os.scandir(path) as it:
        if any(True for _ in it):
            raise MountpointNotEmpty(path=path)


def check_fuse_device() -> None:
    if not FUSE_DEVICE.exists():
        raise NoFuseDevice()


@contextlib.contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the data dir: one node per data dir."""
    fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataDirLocked(data_dir=data_dir) from None
        yield
    finally:
        os.close(fd)


def check_secret(data_dir: Path, keys: VolumeKeys) -> bool:
    """True if the data dir holds a volume (whose check `keys` must open)."""
    check = data_dir / CHECK_NAME
    if not check.exists():
        if (data_dir / DB_NAME).exists():
            raise WrongSecret(data_dir=data_dir)
        return False
    if not check_opens(keys, check.read_bytes()):
        raise WrongSecret(data_dir=data_dir)
    return True


def write_check(data_dir: Path, keys: VolumeKeys) -> None:
    tmp = data_dir / (CHECK_NAME + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, make_check(keys))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, data_dir / CHECK_NAME)


def secure_data_dir(data_dir: Path) -> None:
    """Owner only, always: the data dir 0700 and every file in it 0600, also
    when an older version or another umask left them readable by others."""
    os.chmod(data_dir, 0o700)
    with os.scandir(data_dir) as it:
        for entry in it:
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mode & 0o077:
                os.chmod(entry.path, 0o600)


class Node:
    """The parts of one node, wired together (the composition root)."""

    def __init__(self, config: NodeConfig, keys: VolumeKeys, identity: NodeIdentity) -> None:
        self.config = config
        self.keys = keys
        self.identity = identity
        self.space = Space(config.data_dir)
        # Buffered writes a shutdown could not flush for lack of space: (files, bytes).
        self.lost = (0, 0)
        if config.at_ms is not None:
            self.store = ReadOnlyStore.open(config.data_dir / DB_NAME)
        else:
            secure_data_dir(config.data_dir)
            self.space.start()  # before the store opens: it may need the reserve's room
            self.store = Store.open(config.data_dir / DB_NAME)
        self.replica = Replica()
        epochs.bind(keys, identity, config.data_dir)
        self.journal = Journal(self.store, keys, identity, self.replica)
        self.journal.space = self.space
        self.blocks = Blocks(self.store, keys)
        self.volume = Volume(
            self.journal, self.blocks, read_only=config.read_only, data_dir=config.data_dir
        )
        self.started = time.monotonic()
        self.catch_up = CatchUp()
        self.page_url = ""
        self.operations: FuseOperations | None = None
        self.sync = Sync(
            self.journal, self.blocks, keys, identity, config.name, self._remote_changed
        )
        self.sync.on_peers_changed = self._remember_peers
        self.sync.after_bulk = give_back_memory
        self.volume.refetch = self.sync.refetch
        self.stability = gc.Stability(self.journal)
        self.sync.attach(self.stability)
        self.sync.fetch_history = config.keep_history_s > 0
        thinning = gc.Thinning(config.thin_history)
        self.sync.retention = (thinning, round(config.keep_history_s * 1000))
        self.collector = gc.Collector(
            self.stability, self.volume, config.keep_history_s, thinning=thinning
        )
        # Names the kernel holds that a local commit changed behind its back
        # (a sibling's `~hex` suffix): invalidated by `invalidate_local`, never
        # inside the request handler that committed (that can deadlock).
        self._stale_names: asyncio.Queue[list[tuple[int, bytes]]] = asyncio.Queue()
        self.journal.listeners.append(self._local_changed)
        # Open pairing invitations (`dfs-peer invite`); None without the root.
        self.invitations: invitations.Invitations | None = None
        self.metrics = self.sync.metrics
        self.metrics.read_gauges_with(self._gauges)

    def allow_invitations(self, root: bytes) -> None:
        """Let `dfs-peer invite` hand `root` to machines that prove a one-time code."""
        self.invitations = invitations.Invitations(
            root,
            self.identity.node_id,
            self.config.name,
            epoch_secrets=lambda: epochs.secrets_to_hand_over(self.keys),
        )
        self.sync.pairing = self.invitations

    def _gauges(self) -> metrics.Gauges:
        """What /metrics reports as gauges; cheap (no table scans): scraped often."""
        net = self.sync.statistics()
        store_bytes = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                store_bytes += os.stat(f"{self.config.data_dir / DB_NAME}{suffix}").st_size
        return metrics.Gauges(
            operations=self.replica.counts()[0],
            operations_behind=net.operations_behind,
            # Blocks that no peer had when their operations merged.
            blocks_wanted=net.blocks_wanted,
            store_bytes=store_bytes,
            peers_known=len(net.peers),
            peers_connected=sum(1 for p in net.peers if p.connected),
            members_holding_back=len(self.stability.held_back_by()),
            collection_runs=self.collector.runs,
            collection_freed_bytes=self.collector.bytes_freed,
        )

    async def _remote_changed(self, changes: Changes) -> None:
        """Make the kernel forget what peers' operations changed."""
        if self.operations is None:
            return
        # A checkpoint's merge changes every entry of the volume: looked at a
        # piece at a time, so FUSE requests get in between (a later piece sees
        # a later replica, whose own changes invalidate again after it).
        inodes: set[int] = set()
        names: list[tuple[int, bytes]] = []
        for i, piece in enumerate(_pieces(changes, REMOTE_CHANGED_PIECE)):
            if i:
                await asyncio.sleep(0)
            more_inodes, more_names = self.volume.remote_changed(piece)
            inodes.update(more_inodes)
            names.extend(more_names)
        await self.operations.invalidate(sorted(inodes), names)

    def _local_changed(self, changes: Changes) -> None:
        if self.operations is None:
            return
        names = self.volume.local_changed(changes)
        if names:
            self._stale_names.put_nowait(names)

    async def enforce_forgets(self) -> None:
        """Enforce each `Forget` (or fork cut) that arrives while the node runs,
        rebuilding the replica off the loop (`Journal.enforce_forgets_async`);
        then make the kernel forget what it cached."""
        self.journal.defer_forgets = True
        try:
            while True:
                await self.journal.forgets_due.wait()
                self.journal.forgets_due.clear()
                changes = await self.journal.enforce_forgets_async()
                if changes is not None:
                    await self._remote_changed(changes)
        finally:
            self.journal.defer_forgets = False

    async def invalidate_local(self) -> None:
        """Make the kernel forget the names local commits changed, as they come."""
        while True:
            names = await self._stale_names.get()
            if self.operations is not None:
                await self.operations.invalidate((), names)

    def remembered_peers(self) -> list[tuple[str, int]]:
        raw = self.store.get_meta(REMEMBERED_PEERS)
        if raw is None:
            return []
        try:
            items = cbor2.loads(raw)
            return [(str(h), int(p)) for h, p in items]
        except (ValueError, TypeError, cbor2.CBORDecodeError):
            log.warning("ignoring a malformed list of remembered peers")
            return []

    def _remember_peers(self) -> None:
        """Keep the addresses of peers that answered us, for the next start."""
        known = {
            (link.host, link.port)
            for link in self.sync.links.values()
            if link.node_id is not None and not link.is_self
        }
        old = set(self.remembered_peers())
        if known <= old:
            return
        with self.store.transaction():
            self.store.set_meta(REMEMBERED_PEERS, cbor2.dumps(sorted(known | old)))

    def start(self) -> None:
        t0 = time.monotonic()
        count = self.journal.replay(until_ms=self.config.at_ms)
        give_back_memory()
        log.info("replayed ops=%d seconds=%.2f", count, time.monotonic() - t0)
        if self.config.at_ms is None:
            self.journal.enforce_forgets()  # a crash may have come between Forget and purge
            if self.identity.node_id in self.replica.forgotten():
                log.warning(gc.FORGOTTEN_WARNING)
        if not self.config.read_only:
            self.journal.ensure_member(self.config.name)

    def forget(self, text: str) -> dict[str, Any]:
        """Record that the member `text` names is gone for good (`dfs-peer forget`)."""
        if self.config.read_only:
            raise gc.ForgetReadOnly(data_dir=self.config.data_dir)
        node = gc.resolve_member(self.stability, text)
        cut = gc.forget_cut(self.stability, node)
        name = self.replica.members().get(node, "?")
        self.journal.commit(lambda stamp: [gc.Forget(stamp(), node, cut)])
        done = node in self.replica.forgotten()
        votes, needed = gc.forget_tally(self.replica, node)
        log.info(
            "voted to forget member node=%s name=%s upto=%d votes=%d needed=%d forgotten=%s",
            node.hex()[:8],
            name,
            cut,
            votes,
            needed,
            done,
        )
        return {
            "id": node.hex(),
            "name": name,
            "upto": cut,
            "forgotten": done,
            "votes": votes,
            "needed": needed,
        }

    def close(self) -> None:
        """Flush what can be flushed and close the store. On a full disk, what
        could not be flushed is dropped and counted in `lost`; the rest is kept."""
        try:
            if not self.config.read_only:
                self.lost = self.volume.flush_all()
            if self.config.at_ms is None:
                try:
                    self.stability.persist()
                except (NoSpace, sqlite3.OperationalError) as exc:
                    # Members' progress is learnt again from them; nothing is lost.
                    log.info("cannot save members' progress: %s", exc)
            self.store.sync()
        finally:
            self.store.close()

    async def statistics_async(self) -> NodeStatus:
        """`statistics`, with what it reads from the store read in a worker
        thread first: each SQLite call lets another thread take the GIL, and
        while a catch-up works in one, a status request that made them on the
        loop held the mount's answers for ~5 ms per call (100 ms in all)."""
        stats, evidence = await asyncio.to_thread(
            lambda: (self.store.stats(), self.store.evidence(proofs=False))
        )
        return self.statistics(stats, evidence)

    def statistics(
        self, stats: StoreStats | None = None, evidence: list[Evidence] | None = None
    ) -> NodeStatus:
        ops, entries = self.replica.counts()
        stats = self.store.stats() if stats is None else stats
        cache = self.blocks.cache.statistics()
        net = self.sync.statistics()
        return NodeStatus(
            node_id=self.identity.node_id.hex(),
            short_id=self.identity.short,
            name=self.config.name,
            volume=self.keys.tag_hex,
            mountpoint=str(self.config.mountpoint),
            data_dir=str(self.config.data_dir),
            read_only=self.config.read_only,
            files=entries,
            operations=ops,
            own_operations=self.journal.statistics().own_seq,
            blocks=stats.blocks,
            block_bytes=stats.block_bytes,
            store_bytes=stats.db_bytes,
            cache_bytes=cache.bytes,
            cache_hits=cache.hits,
            cache_misses=cache.misses,
            uptime_s=round(time.monotonic() - self.started, 3),
            listen=net.listen,
            version_vector=net.version_vector,
            keys=epochs.describe(self.keys, self.replica.members()),
            peers=net.peers,
            # The counters; the rest of the snapshot has fields of its own above.
            sync={
                f.name: getattr(net, f.name)
                for f in fields(net)
                if f.name not in ("listen", "version_vector", "peers", "blocks_wanted")
            },
            blocks_wanted=net.blocks_wanted,
            entries_refused={
                node.hex(): refused.describe() for node, refused in self.journal.refused.items()
            },
            gc=self.collector.status(),
            page=self.page_url,
            catching_up=asdict(self.catch_up.last) if self.catch_up.last is not None else None,
            conflicts=history.conflicts(self.replica),
            lies=self.lies(evidence),
        )

    def lies(self, evidence: list[Evidence] | None = None) -> list[dict[str, Any]]:
        """The evidence this node keeps of members that lied (`peer.storage.chain`)."""
        names = self.replica.members()
        if evidence is None:
            evidence = self.store.evidence(proofs=False)
        return [
            {
                "node": ev.node.hex(),
                "name": names.get(ev.node),
                "seq": ev.seq,
                "kind": ev.kind,
                "detail": ev.detail,
                "from": ev.source,
                "seen": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ev.seen_ms / 1000)),
            }
            for ev in evidence
        ]


async def run(
    config: NodeConfig,
    keys: VolumeKeys,
    announce: bool = True,
    on_ready: Callable[[], None] | None = None,
    root: bytes | None = None,
) -> None:
    """Run a node in the foreground until SIGINT/SIGTERM; unmounts on every way out.

    Once the mount answers, `on_ready` is called and a service manager that
    started us (systemd, `Type=notify`) is told READY=1. With the volume
    `root`, the node can invite new machines (`dfs-peer invite`)."""
    if config.at_ms is not None:
        await run_at(config, keys, announce, on_ready)
        return
    check_fuse_device()
    check_mountpoint(config.mountpoint)
    # The peer port is a check a user can fail too (in use): bound before the
    # data dir is touched, so a refused start creates and changes nothing.
    os.umask(0o077)  # whatever this node creates in its data dir is its own
    gate.raise_descriptor_limit()  # room for peers, within the connection caps
    peer_sock = bind_peer_port(config.listen_host, config.listen_port)
    page_sock = None
    try:
        if config.page_port is not None:
            try:
                page_sock = statuspage.bind_local(config.page_port)
            except ListenFailed as exc:
                if config.page_port:
                    raise
                # No loopback to listen on: the node is worth more than its page.
                log.warning("no status page: %s", exc.message())
        config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except BaseException:
        peer_sock.close()
        if page_sock is not None:
            page_sock.close()
        raise
    with (
        contextlib.closing(peer_sock),
        contextlib.ExitStack() as closing,
        data_dir_lock(config.data_dir),
    ):
        if page_sock is not None:
            closing.enter_context(contextlib.closing(page_sock))
        existed = check_secret(config.data_dir, keys)
        identity = load_or_create(config.data_dir)
        if not existed:
            write_check(config.data_dir, keys)
        node = Node(config, keys, identity)
        if root is not None:
            node.allow_invitations(root)
        try:
            node.start()
            async with (
                peer_network(node, peer_sock) as _,
                control_server(node),
                contextlib.AsyncExitStack() as page,
                asyncio.TaskGroup() as tasks,
            ):
                if page_sock is not None:
                    await page.enter_async_context(statuspage.page_server(node, page_sock))
                progress = tasks.create_task(show_progress(node, announce))
                collecting = tasks.create_task(node.collector.run_periodically())
                invalidating = tasks.create_task(node.invalidate_local())
                forgetting = tasks.create_task(node.enforce_forgets())
                watching = tasks.create_task(removal.watch_epochs(node))
                try:
                    await serve_mount(
                        node,
                        on_ready=on_ready,
                        read_only=config.read_only,
                        ready_line=(
                            f"dfs-peer: node {identity.short} ({config.name}) mounted volume "
                            f"{keys.tag_hex} at {config.mountpoint}; Ctrl-C to stop"
                        )
                        if announce
                        else None,
                    )
                finally:
                    progress.cancel()
                    collecting.cancel()
                    invalidating.cancel()
                    forgetting.cancel()
                    watching.cancel()
        finally:
            node.close()
    if node.lost[0]:
        raise LostOnExit(files=node.lost[0], mib=f"{node.lost[1] / 2**20:.1f}")
    log.info("node stopped cleanly")


async def run_at(
    config: NodeConfig,
    keys: VolumeKeys,
    announce: bool = True,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Mount the volume as it was at `config.at_ms`, read-only, until SIGINT/SIGTERM.

    Beside or instead of the live node of the same data dir: it takes no
    lock, opens the store read-only, writes nothing there (no member op, no
    inode rows, no control socket) and neither serves nor asks peers."""
    assert config.at_ms is not None
    if not config.read_only:
        raise history.AtNeedsReadOnly()
    check_fuse_device()
    check_mountpoint(config.mountpoint)
    if not (config.data_dir / DB_NAME).exists() or not check_secret(config.data_dir, keys):
        raise history.NoVolumeHere(data_dir=config.data_dir)
    identity = load_or_create(config.data_dir)  # exists: a store without one is refused above
    node = Node(config, keys, identity)
    try:
        node.start()
        await serve_mount(
            node,
            on_ready=on_ready,
            read_only=True,
            ready_line=(
                f"dfs-peer: volume {keys.tag_hex} as it was at "
                f"{history.format_time(config.at_ms)} mounted read-only at "
                f"{config.mountpoint}; Ctrl-C to stop"
            )
            if announce
            else None,
        )
    finally:
        node.close()
    log.info("node stopped cleanly")


async def serve_mount(
    node: Node,
    *,
    read_only: bool,
    ready_line: str | None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Mount `node`'s volume and serve it until SIGINT/SIGTERM or an unmount;
    prints `ready_line` once the mount exists, then, once it answers, calls
    `on_ready` and tells systemd READY=1."""
    # imported here so `init` and `status` work without libfuse
    from fuse.adapter import FuseOperations
    from fuse.mount import MountFailed, serve, terminate

    node.operations = FuseOperations(node.volume)
    node.operations.on_request = node.metrics.fuse_request
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, terminate)

    answering: set[asyncio.Task[None]] = set()  # a strong reference while it runs

    async def tell_when_answering() -> None:
        if await service.wait_answers(node.config.mountpoint):
            service.notify(f"READY=1\nSTATUS=mounted at {node.config.mountpoint}")

    def ready() -> None:
        if ready_line is not None:
            print(ready_line, flush=True)
        if on_ready is not None:
            on_ready()
        task = loop.create_task(tell_when_answering())
        answering.add(task)
        task.add_done_callback(answering.discard)

    try:
        await serve(
            node.operations,
            str(node.config.mountpoint),
            read_only=read_only,
            debug_fuse=node.config.debug_fuse,
            ready=ready,
        )
    except MountFailed as exc:
        raise MountRefused(path=node.config.mountpoint, reason=str(exc)) from exc
    finally:
        service.notify("STOPPING=1")
        for task in answering:
            task.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def bind_peer_port(host: str, port: int) -> socket.socket:
    """A listening socket on host:port for the peer server; `PortInUse` or
    `ListenFailed` (one line for the user) if it cannot be had."""
    address = f"{host}:{port}"
    try:
        family, kind, proto, _, where = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, IndexError) as exc:
        detail = getattr(exc, "strerror", None) or str(exc)
        raise ListenFailed(address=address, detail=detail) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(where)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(address=address) from None
        raise ListenFailed(address=address, detail=exc.strerror or str(exc)) from None
    return sock


@contextlib.asynccontextmanager
async def peer_network(node: Node, sock: socket.socket | None = None) -> AsyncIterator[Sync]:
    """Serve peers (on `sock` if bound already), connect to static and
    remembered ones, discover the rest."""
    config = node.config
    address = f"{config.listen_host}:{config.listen_port}"
    async with contextlib.AsyncExitStack() as stack:
        try:
            sync = await stack.enter_async_context(
                node.sync.running(config.listen_host, config.listen_port, sock)
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(address=address) from None
            raise ListenFailed(address=address, detail=exc.strerror or str(exc)) from None
        for host, port in config.peers:
            sync.add_peer(host, port, "static")
        for host, port in node.remembered_peers():
            sync.add_peer(host, port, "remembered")
        if config.mdns:
            await stack.enter_async_context(mdns(node, sync))
        yield sync


@contextlib.asynccontextmanager
async def mdns(node: Node, sync: Sync) -> AsyncIterator[None]:
    from discovery import Discovery

    discovery = Discovery(
        volume_tag=node.keys.tag_hex,
        node_id=node.identity.node_id.hex(),
        name=node.config.name,
        port=sync.port,
        protocol=PROTOCOL,
        mdns=True,
        addresses=_advertised(node.config.listen_host),
        on_found=lambda peer: sync.add_peer(peer.host, peer.port, peer.source),
        on_lost=lambda peer: sync.remove_peer(peer.host, peer.port),
    )
    await discovery.start()
    try:
        yield
    finally:
        await discovery.close()


async def show_progress(node: Node, announce: bool) -> None:
    """While this node is behind its peers, print how far, once a second
    (only forward: see `peer.progress`)."""
    shown = ""
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        net = node.sync.statistics()
        was_active = node.catch_up.active
        now = node.catch_up.update(
            time.monotonic(),
            operations_received=net.operations_received,
            blocks_received=net.blocks_received,
            bytes_received=net.bytes_received,
            operations_behind=net.operations_behind,
            blocks_missing=net.blocks_missing,
        )
        if not announce:
            continue
        if now is not None:
            line = now.line()
            if line != shown:
                print(f"dfs-peer: {line}", flush=True)
                shown = line
        elif was_active:
            print("dfs-peer: up to date with the peers", flush=True)
            shown = ""


def default_name() -> str:
    return socket.gethostname().split(".")[0] or "node"
