"""A running node: opens the data dir, replays the log, mounts, serves status.

Invariant: nothing on disk is created or changed until every check a user can
fail (mountpoint, FUSE device, secret, data dir lock) has passed; and whatever
was mounted is unmounted, and whatever was buffered is flushed, on every way
out (SIGINT, SIGTERM, an error).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import json
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cbor2
from aiohttp import web

from crdt.merge import Changes, Replica
from peer.auth import PROTOCOL
from peer.blocks import Blocks
from peer.errors import (
    DataDirLocked,
    ListenFailed,
    MountpointBusy,
    MountpointMissing,
    MountpointNotDirectory,
    MountpointNotEmpty,
    MountRefused,
    NoFuseDevice,
    PortInUse,
    WrongSecret,
)
from peer.identity import NodeIdentity, load_or_create
from peer.journal import Journal
from peer.keys import VolumeKeys
from peer.sealing import check_opens, make_check
from peer.store import Store
from peer.sync import PeerStatistics, Sync
from peer.volume import Volume

if TYPE_CHECKING:
    from fuse.adapter import FuseOperations

log = logging.getLogger(__name__)

DB_NAME = "volume.db"
CHECK_NAME = "volume.check"
LOCK_NAME = "lock"
CONTROL_NAME = "control.sock"
FUSE_DEVICE = Path("/dev/fuse")


def default_data_home() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "dfs-peer"


def default_data_dir(keys: VolumeKeys) -> Path:
    return default_data_home() / keys.tag_hex


DEFAULT_PORT = 7654
REMEMBERED_PEERS = "peers"
PROGRESS_EVERY_S = 1.0


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


class Node:
    """The parts of one node, wired together (the composition root)."""

    def __init__(self, config: NodeConfig, keys: VolumeKeys, identity: NodeIdentity) -> None:
        self.config = config
        self.keys = keys
        self.identity = identity
        self.store = Store.open(config.data_dir / DB_NAME)
        self.replica = Replica()
        self.journal = Journal(self.store, keys, identity, self.replica)
        self.blocks = Blocks(self.store, keys)
        self.volume = Volume(
            self.journal, self.blocks, read_only=config.read_only, data_dir=config.data_dir
        )
        self.started = time.monotonic()
        self.operations: FuseOperations | None = None
        self.sync = Sync(
            self.journal, self.blocks, keys, identity, config.name, self._remote_changed
        )
        self.sync.on_peers_changed = self._remember_peers
        self.volume.refetch = self.sync.refetch

    async def _remote_changed(self, changes: Changes) -> None:
        """Make the kernel forget what peers' operations changed."""
        if self.operations is None:
            return
        inodes, names = self.volume.remote_changed(changes)
        await self.operations.invalidate(inodes, names)

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
        count = self.journal.replay()
        log.info("replayed ops=%d seconds=%.2f", count, time.monotonic() - t0)
        if not self.config.read_only:
            self.journal.ensure_member(self.config.name)

    def close(self) -> None:
        try:
            if not self.config.read_only:
                self.volume.flush_all()
            self.store.sync()
        finally:
            self.store.close()

    def statistics(self) -> NodeStatus:
        ops, entries = self.replica.counts()
        stats = self.store.stats()
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
            peers=net.peers,
            sync={
                "operations_behind": net.operations_behind,
                "blocks_missing": net.blocks_missing,
                "bytes_missing": net.bytes_missing,
                "operations_received": net.operations_received,
                "blocks_received": net.blocks_received,
                "bytes_received": net.bytes_received,
                "refused_requests": net.refused_requests,
            },
        )


NODE_KEY: web.AppKey[Node] = web.AppKey("node", Node)


async def _status(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    return web.json_response(asdict(node.statistics()))


def make_control_app(node: Node) -> web.Application:
    """The local control API (a unix socket in the data dir, mode 0600)."""
    app = web.Application()
    app[NODE_KEY] = node
    app.router.add_get("/status", _status)
    return app


@contextlib.asynccontextmanager
async def control_server(node: Node) -> AsyncIterator[Path]:
    path = node.config.data_dir / CONTROL_NAME
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # left by a node that died; the data dir lock says it is ours
    runner = web.AppRunner(make_control_app(node), access_log=None)
    await runner.setup()
    site = web.UnixSite(runner, str(path))
    await site.start()
    os.chmod(path, 0o600)
    try:
        yield path
    finally:
        await runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def run(config: NodeConfig, keys: VolumeKeys, announce: bool = True) -> None:
    """Run a node in the foreground until SIGINT/SIGTERM; unmounts on every way out."""
    # imported here so `init` and `status` work without libfuse
    from fuse.adapter import FuseOperations
    from fuse.mount import MountFailed, serve, terminate

    check_fuse_device()
    check_mountpoint(config.mountpoint)
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with data_dir_lock(config.data_dir):
        existed = check_secret(config.data_dir, keys)
        identity = load_or_create(config.data_dir)
        if not existed:
            write_check(config.data_dir, keys)
        node = Node(config, keys, identity)
        try:
            node.start()
            operations = FuseOperations(node.volume)
            node.operations = operations
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, terminate)

            def ready() -> None:
                if announce:
                    print(
                        f"dfs-peer: node {identity.short} ({config.name}) mounted volume "
                        f"{keys.tag_hex} at {config.mountpoint}; Ctrl-C to stop",
                        flush=True,
                    )

            async with (
                peer_network(node) as _,
                control_server(node),
                asyncio.TaskGroup() as tasks,
            ):
                progress = tasks.create_task(show_progress(node, announce))
                try:
                    await serve(
                        operations,
                        str(config.mountpoint),
                        read_only=config.read_only,
                        debug_fuse=config.debug_fuse,
                        ready=ready,
                    )
                except MountFailed as exc:
                    raise MountRefused(path=config.mountpoint, reason=str(exc)) from exc
                finally:
                    progress.cancel()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        finally:
            node.close()
    log.info("node stopped cleanly")


@contextlib.asynccontextmanager
async def peer_network(node: Node) -> AsyncIterator[Sync]:
    """Serve peers, connect to static and remembered ones, discover the rest."""
    config = node.config
    address = f"{config.listen_host}:{config.listen_port}"
    async with contextlib.AsyncExitStack() as stack:
        try:
            sync = await stack.enter_async_context(
                node.sync.running(config.listen_host, config.listen_port)
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

    host = node.config.listen_host
    discovery = Discovery(
        volume_tag=node.keys.tag_hex,
        node_id=node.identity.node_id.hex(),
        name=node.config.name,
        port=sync.port,
        protocol=PROTOCOL,
        mdns=True,
        addresses=[host] if _is_ip(host) and host not in ("0.0.0.0", "::") else None,
        on_found=lambda peer: sync.add_peer(peer.host, peer.port, peer.source),
        on_lost=lambda peer: sync.remove_peer(peer.host, peer.port),
    )
    await discovery.start()
    try:
        yield
    finally:
        await discovery.close()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def show_progress(node: Node, announce: bool) -> None:
    """While this node is behind its peers, print how far, once a second."""
    behind_before = False
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        net = node.sync.statistics()
        behind = net.operations_behind > 0 or net.blocks_missing > 0
        if behind and announce:
            print(
                f"dfs-peer: catching up: {net.operations_behind} operations, "
                f"{net.blocks_missing} blocks ({net.bytes_missing / 2**20:.1f} MiB) to go",
                flush=True,
            )
        elif behind_before and announce:
            print("dfs-peer: up to date with the peers", flush=True)
        behind_before = behind


def default_name() -> str:
    return socket.gethostname().split(".")[0] or "node"


async def query_status(data_dir: Path) -> dict[str, object]:
    """Ask the node running on `data_dir` for its status."""
    import aiohttp

    path = data_dir / CONTROL_NAME
    connector = aiohttp.UnixConnector(path=str(path))
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        session.get("http://node/status") as resp,
    ):
        resp.raise_for_status()
        data: dict[str, object] = json.loads(await resp.text())
        return data
