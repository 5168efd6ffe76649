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
import ipaddress
import json
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cbor2
from aiohttp import web

from crdt.merge import Changes, Replica
from peer import gc, history
from peer.auth import PROTOCOL
from peer.blocks import Blocks
from peer.errors import (
    DataDirLocked,
    DfsError,
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
from peer.store import ReadOnlyStore, Store
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
    # How long old versions stay restorable (`--keep-history`; GC keeps them).
    keep_history_s: float = history.DEFAULT_KEEP_HISTORY_S
    # `--at`: show the volume as it was at this unix time (ms), read-only.
    at_ms: int | None = None


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
    # Causal stability and collection: what is stable, who holds it back.
    gc: dict[str, Any]


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


class Node:
    """The parts of one node, wired together (the composition root)."""

    def __init__(self, config: NodeConfig, keys: VolumeKeys, identity: NodeIdentity) -> None:
        self.config = config
        self.keys = keys
        self.identity = identity
        if config.at_ms is not None:
            self.store = ReadOnlyStore.open(config.data_dir / DB_NAME)
        else:
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
        self.sync.after_bulk = give_back_memory
        self.volume.refetch = self.sync.refetch
        self.stability = gc.Stability(self.journal)
        self.sync.attach(self.stability)
        self.sync.fetch_history = config.keep_history_s > 0
        self.collector = gc.Collector(self.stability, self.volume, config.keep_history_s)

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
        log.info("forgot member node=%s name=%s upto=%d", node.hex()[:8], name, cut)
        return {"id": node.hex(), "name": name, "upto": cut}

    def close(self) -> None:
        try:
            if not self.config.read_only:
                self.volume.flush_all()
            if self.config.at_ms is None:
                self.stability.persist()
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
            # The counters; the rest of the snapshot has fields of its own above.
            sync={
                f.name: getattr(net, f.name)
                for f in fields(net)
                if f.name not in ("listen", "version_vector", "peers")
            },
            gc=self.collector.status(),
        )


NODE_KEY: web.AppKey[Node] = web.AppKey("node", Node)


async def _status(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    return web.json_response(asdict(node.statistics()))


def _refused(exc: DfsError, status: int = 400) -> web.Response:
    return web.json_response({"error": exc.message()}, status=status)


def _asked_path(node: Node, body: Mapping[str, Any]) -> bytes:
    """The volume path a client named (see `history.volume_path`)."""
    return history.volume_path(
        str(body.get("path", "")), str(body.get("cwd", "/")), str(node.config.mountpoint)
    )


async def _past(node: Node, at_ms: int) -> Replica:
    # A full replay of the log: in a thread, so the mount keeps answering.
    return await asyncio.to_thread(history.replica_at, node.store, node.keys, node.identity, at_ms)


async def _history(request: web.Request) -> web.Response:
    """GET /history?path=P&cwd=D[&at_ms=T]: the versions of a file."""
    node = request.app[NODE_KEY]
    query = request.query
    try:
        path = _asked_path(node, query)
        at_ms = int(query["at_ms"]) if "at_ms" in query else None
        past = await _past(node, at_ms) if at_ms is not None else None
        versions = history.history(node.replica, path, node.store.has_blocks, past, at_ms)
    except DfsError as exc:
        return _refused(exc, 404)
    except ValueError:
        return web.json_response({"error": "at_ms must be an integer"}, status=400)
    return web.json_response(
        {"path": history.show_path(path), "versions": [v.to_json() for v in versions]}
    )


async def _restore(request: web.Request) -> web.Response:
    """POST /restore {path, cwd, at_ms}: bring back the content a file had then."""
    node = request.app[NODE_KEY]
    try:
        body = await request.json()
        at_ms = int(body["at_ms"])
    except (ValueError, KeyError, TypeError):
        return web.json_response({"error": "expected JSON {path, cwd, at_ms}"}, status=400)
    try:
        if node.config.read_only:
            raise history.NodeReadOnly(data_dir=node.config.data_dir)
        path = _asked_path(node, body)
        past = await _past(node, at_ms)
        node.volume.flush_all()  # the restore must see what was written here
        plan = history.plan_restore(node.replica, past, path, at_ms, node.store.has_blocks)
        changes = node.journal.commit(plan.make)
    except DfsError as exc:
        return _refused(exc, 409)
    log.info(
        "restored path=%s version=%s created=%s",
        history.show_path(path),
        plan.version.short() if plan.version else "-",
        plan.created,
    )
    # The kernel caches of this node's own mount must drop the old content too.
    await node._remote_changed(changes)
    return web.json_response(plan.to_json())


async def _gc(request: web.Request) -> web.Response:
    """POST /gc: collect now; what was freed and what holds collection back."""
    node = request.app[NODE_KEY]
    node.volume.flush_all()  # buffered writes pin old versions; publish them first
    result = await node.collector.collect_async(force=True)
    return web.json_response(
        {
            **asdict(result),
            "held_back_by": [asdict(m) for m in node.stability.held_back_by()],
            "keep_history_s": node.config.keep_history_s,
        }
    )


async def _forget(request: web.Request) -> web.Response:
    """POST /forget {node}: a member is gone for good."""
    node = request.app[NODE_KEY]
    try:
        body = await request.json()
        text = str(body["node"])
    except (ValueError, KeyError, TypeError):
        return web.json_response({"error": "expected JSON {node}"}, status=400)
    try:
        done = node.forget(text)
    except DfsError as exc:
        return _refused(exc, 409)
    return web.json_response(done)


def make_control_app(node: Node) -> web.Application:
    """The local control API (a unix socket in the data dir, mode 0600)."""
    app = web.Application()
    app[NODE_KEY] = node
    app.router.add_get("/status", _status)
    app.router.add_get("/history", _history)
    app.router.add_post("/restore", _restore)
    app.router.add_post("/gc", _gc)
    app.router.add_post("/forget", _forget)
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
    if config.at_ms is not None:
        await run_at(config, keys, announce)
        return
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
            async with (
                peer_network(node) as _,
                control_server(node),
                asyncio.TaskGroup() as tasks,
            ):
                progress = tasks.create_task(show_progress(node, announce))
                collecting = tasks.create_task(node.collector.run_periodically())
                try:
                    await serve_mount(
                        node,
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
        finally:
            node.close()
    log.info("node stopped cleanly")


async def run_at(config: NodeConfig, keys: VolumeKeys, announce: bool = True) -> None:
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


async def serve_mount(node: Node, *, read_only: bool, ready_line: str | None) -> None:
    """Mount `node`'s volume and serve it until SIGINT/SIGTERM or an unmount;
    prints `ready_line` once the mount exists."""
    # imported here so `init` and `status` work without libfuse
    from fuse.adapter import FuseOperations
    from fuse.mount import MountFailed, serve, terminate

    node.operations = FuseOperations(node.volume)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, terminate)

    def ready() -> None:
        if ready_line is not None:
            print(ready_line, flush=True)

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
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


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


def _advertised(host: str) -> list[str] | None:
    """The address to advertise: the one we listen on if it is one IP address;
    None (every address of this host) for a wildcard or a host name."""
    with contextlib.suppress(ValueError):
        if not ipaddress.ip_address(host).is_unspecified:
            return [host]
    return None


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


async def ask_node(
    data_dir: Path,
    method: str,
    path: str,
    *,
    params: dict[str, str] | None = None,
    body: dict[str, object] | None = None,
    timeout_s: float = 120,
) -> dict[str, Any]:
    """Call the control API of the node running on `data_dir`; a refusal
    becomes `NodeAnswered` with the node's message; OSError if none runs."""
    import aiohttp

    connector = aiohttp.UnixConnector(path=str(data_dir / CONTROL_NAME))
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        session.request(method, f"http://node{path}", params=params, json=body) as resp,
    ):
        text = await resp.text()
        try:
            data: dict[str, Any] = json.loads(text)
        except ValueError:
            data = {"error": text.strip() or f"HTTP {resp.status}"}
        if resp.status >= 400:
            raise history.NodeAnswered(message=str(data.get("error") or f"HTTP {resp.status}"))
        return data


async def query_status(data_dir: Path) -> dict[str, Any]:
    """Ask the node running on `data_dir` for its status."""
    return await ask_node(data_dir, "GET", "/status", timeout_s=10)
