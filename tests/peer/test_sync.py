"""Sync between nodes in one process: real HTTP on loopback, real SQLite, no FUSE.

Each `Node` here is the real composition root (store, journal, volume, sync),
driven through its Volume as the FUSE adapter would drive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from crdt.ops import BLOCK_SIZE
from fuse.errors import Retry
from fuse.protocol import Caller
from peer.fs.volume import ROOT_INODE
from peer.identity import load_or_create
from peer.keys import VolumeKeys
from peer.net import wire
from peer.net.auth import PROTOCOL, sign_request, wall_ms
from peer.net.sync import BULK_BLOCKS, Sync
from peer.node import Node, NodeConfig
from peer.secret import new_secret

pytestmark = pytest.mark.asyncio

CALLER = Caller(uid=0, gid=0, pid=0, umask=0o022)
O_RDWR = os.O_RDWR


def make_node(tmp: Path, name: str, keys: VolumeKeys) -> Node:
    data = tmp / f"{name}-data"
    data.mkdir()
    config = NodeConfig(mountpoint=tmp / f"{name}-mnt", data_dir=data, name=name, mdns=False)
    node = Node(config, keys, load_or_create(data))
    node.start()
    return node


@contextlib.asynccontextmanager
async def running(*nodes: Node) -> AsyncIterator[list[Sync]]:
    async with contextlib.AsyncExitStack() as stack:
        syncs = [await stack.enter_async_context(n.sync.running("127.0.0.1", 0)) for n in nodes]
        yield syncs
    for n in nodes:
        n.close()


def link(a: Sync, b: Sync) -> None:
    """Tell each of two running nodes about the other, as static peers."""
    a.add_peer("127.0.0.1", b.port, "static")
    b.add_peer("127.0.0.1", a.port, "static")


async def wait_until(condition: Callable[[], bool], what: str, limit_s: float = 10.0) -> None:
    """Poll `condition` (state changed by other tasks) until true, or fail naming `what`."""
    deadline = asyncio.get_running_loop().time() + limit_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {limit_s:.0f}s waiting for {what}")
        await asyncio.sleep(0.01)


def write_file(node: Node, name: bytes, data: bytes) -> None:
    vol = node.volume
    fh, _ = vol.create(ROOT_INODE, name, 0o644, O_RDWR, CALLER)
    vol.write(fh, 0, data)
    vol.release(fh)


def list_names(node: Node) -> list[bytes]:
    """The names in the volume's root, as a program listing it sees them."""
    fh = node.volume.opendir(ROOT_INODE, CALLER)
    try:
        return sorted(name for name, _ in node.volume.readdir(fh, 0))
    finally:
        node.volume.releasedir(fh)


def read_file(node: Node, name: bytes) -> bytes | None:
    vol = node.volume
    try:
        attrs = vol.lookup(ROOT_INODE, name)
    except Exception:
        return None
    fh = vol.open(attrs.inode, os.O_RDONLY, CALLER)
    try:
        return vol.read(fh, 0, attrs.size)
    finally:
        vol.release(fh)


async def test_a_write_on_one_node_appears_on_the_other(tmp_path: Path, keys: VolumeKeys) -> None:
    a, b = make_node(tmp_path, "a", keys), make_node(tmp_path, "b", keys)
    async with running(a, b) as (sa, sb):
        link(sb, sa)
        payload = os.urandom(300_000)  # three blocks
        write_file(a, b"hello.bin", payload)
        await wait_until(lambda: read_file(b, b"hello.bin") == payload, "B to see A's file")
        write_file(b, b"back.txt", b"from b")
        await wait_until(lambda: read_file(a, b"back.txt") == b"from b", "A to see B's file")
        assert a.journal.vv == b.journal.vv
        stats = sb.statistics()
        assert stats.operations_received > 0
        assert stats.blocks_received >= 3
        assert [p.connected for p in stats.peers] == [True]
        assert stats.peers[0].id == a.identity.node_id.hex()


async def test_a_catch_up_of_many_blocks_gives_the_freed_heap_back(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    """Blocks arrive in 8 MiB answers, copied and opened in worker threads;
    glibc keeps that heap unless asked (20-30 MiB after a 208 MiB catch-up).
    A merge that fetched many blocks gives it back; a small one does not pay."""
    a, b = make_node(tmp_path, "a", keys), make_node(tmp_path, "b", keys)
    given_back: list[int] = []
    async with running(a, b) as (sa, sb):
        sb.after_bulk = lambda: given_back.append(sb.blocks_in)
        write_file(a, b"small.txt", b"a few bytes")
        link(sb, sa)
        await wait_until(lambda: read_file(b, b"small.txt") == b"a few bytes", "the small file")
        assert given_back == []
        payload = os.urandom(BULK_BLOCKS * BLOCK_SIZE)
        write_file(a, b"big.bin", payload)
        await wait_until(lambda: bool(given_back), "the heap given back after the catch-up")
        assert read_file(b, b"big.bin") == payload
        assert given_back[-1] >= BULK_BLOCKS


async def test_a_node_stops_at_once_while_a_peer_long_polls_it(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    """Stopping wakes the long polls waiting on this node, after its log grew
    too; the server does not sit out its shutdown timeout for them."""
    a, b = make_node(tmp_path, "a", keys), make_node(tmp_path, "b", keys)
    try:
        async with contextlib.AsyncExitStack() as stack:
            sa = await stack.enter_async_context(a.sync.running("127.0.0.1", 0))
            async with b.sync.running("127.0.0.1", 0) as sb:
                link(sa, sb)
                write_file(b, b"f", b"grown")  # the log grows: a new wake-up event
                await wait_until(lambda: read_file(a, b"f") == b"grown", "A to have it")
                await asyncio.sleep(0.3)  # A's next long poll is waiting on B
                started = asyncio.get_running_loop().time()
            stopped = asyncio.get_running_loop().time() - started
            assert stopped < 1.0, f"B took {stopped:.1f}s to stop"
    finally:
        a.close()
        b.close()


async def test_a_peer_with_another_secret_gets_nothing_and_changes_nothing(
    tmp_path: Path, keys: VolumeKeys, expect_logs: Callable[..., None]
) -> None:
    expect_logs("refused a peer request", logger="peer.sync")
    expect_logs("authentication failed", logger="peer.sync")
    a = make_node(tmp_path, "a", keys)
    outsider = make_node(tmp_path, "x", VolumeKeys.from_root(new_secret()))
    async with running(a, outsider) as (sa, sx):
        write_file(a, b"secret.txt", b"private")
        write_file(outsider, b"junk.txt", b"junk")
        before = dict(a.journal.vv)
        link(sx, sa)
        await wait_until(lambda: sa.refused >= 1 and sx.refused >= 1, "both to refuse")
        await wait_until(
            lambda: all(p.last_error for p in sa.statistics().peers), "A to give up on X"
        )
        assert a.journal.vv == before
        assert read_file(outsider, b"secret.txt") is None
        assert read_file(a, b"junk.txt") is None


async def _raw(
    session: aiohttp.ClientSession, port: int, method: str, path: str, **kw: object
) -> tuple[int, bytes]:
    async with session.request(method, f"http://127.0.0.1:{port}{path}", **kw) as resp:  # type: ignore[arg-type]
        return resp.status, await resp.read()


async def test_unauthenticated_forged_replayed_and_malformed_requests_are_refused(
    tmp_path: Path, keys: VolumeKeys, expect_logs: Callable[..., None]
) -> None:
    expect_logs("refused a peer request", logger="peer.sync")
    expect_logs("speaks protocol", logger="peer.server")
    a = make_node(tmp_path, "a", keys)
    async with running(a) as (sa,), aiohttp.ClientSession() as session:
        write_file(a, b"f", b"data")
        vv = dict(a.journal.vv)
        port = sa.port
        # No authentication at all, on a real path and on a made-up one.
        for method, path in (("GET", "/hello"), ("POST", "/log"), ("GET", "/nothing")):
            status, body = await _raw(session, port, method, path)
            assert (status, body) == (401, b"")
        # Forged: the right shape, the wrong key.
        node = os.urandom(32).hex()
        forged = sign_request(os.urandom(32), "GET", "/hello", node, b"", time_ms=wall_ms())
        status, body = await _raw(session, port, "GET", "/hello", headers=forged.headers())
        assert (status, body) == (401, b"")
        # Genuine once, then replayed byte for byte.
        good = sign_request(keys.peers, "GET", "/hello", node, b"", time_ms=wall_ms())
        status, body = await _raw(session, port, "GET", "/hello", headers=good.headers())
        assert status == 200
        assert wire.decode_hello(body).node == a.identity.node_id
        status, body = await _raw(session, port, "GET", "/hello", headers=good.headers())
        assert (status, body) == (401, b"")
        # A body swapped under a genuine signature.
        req = wire.encode_log_request(wire.LogRequest({}, 1000))
        auth = sign_request(keys.peers, "POST", "/log", node, req, time_ms=wall_ms())
        status, _ = await _raw(session, port, "POST", "/log", headers=auth.headers(), data=b"\xa0")
        assert status == 401
        # Authenticated but malformed bodies: 400, and the node goes on.
        for junk in (b"", b"\xff\xff", wire.encode({"vv": "x", "max_bytes": 1}), os.urandom(64)):
            auth = sign_request(keys.peers, "POST", "/log", node, junk, time_ms=wall_ms())
            status, _ = await _raw(session, port, "POST", "/log", headers=auth.headers(), data=junk)
            assert status == 400
        # Another protocol version: a clear refusal.
        auth = sign_request(
            keys.peers, "GET", "/hello", node, b"", time_ms=wall_ms(), protocol=PROTOCOL + 1
        )
        status, body = await _raw(session, port, "GET", "/hello", headers=auth.headers())
        assert status == 409
        assert b"protocol" in body
        assert a.journal.vv == vv
        assert read_file(a, b"f") == b"data"
        assert sa.refused >= 6


async def test_skewed_clocks_are_corrected_not_refused(tmp_path: Path, keys: VolumeKeys) -> None:
    a, b = make_node(tmp_path, "a", keys), make_node(tmp_path, "b", keys)
    async with running(a, b) as (sa, sb):
        write_file(a, b"f", b"skewed")
        sb.add_peer("127.0.0.1", sa.port, "static")
        link = next(iter(sb.links.values()))
        assert link.client is not None
        link.client.offset_ms = -3_600_000  # B believes it is an hour earlier
        await wait_until(lambda: read_file(b, b"f") == b"skewed", "B to sync despite skew")
        assert abs(link.client.offset_ms) < 60_000


async def test_a_corrupt_block_is_detected_and_replaced_from_a_peer(
    tmp_path: Path, keys: VolumeKeys, expect_logs: Callable[..., None]
) -> None:
    expect_logs("corrupt block", logging.ERROR, logger="peer.blocks")
    expect_logs("asking peers", logger="peer.volume")
    a, b = make_node(tmp_path, "a", keys), make_node(tmp_path, "b", keys)
    async with running(a, b) as (sa, sb):
        sb.add_peer("127.0.0.1", sa.port, "static")
        payload = os.urandom(200_000)
        write_file(a, b"f", payload)
        await wait_until(lambda: read_file(b, b"f") == payload, "B to have the file")
        # Damage one of B's stored blocks (flip a byte of its ciphertext).
        conn = b.store._conn
        bid, sealed = conn.execute("SELECT id, sealed FROM blocks LIMIT 1").fetchone()
        damaged = bytearray(sealed)
        damaged[len(damaged) // 2] ^= 0x01
        with b.store.transaction():
            conn.execute("UPDATE blocks SET sealed = ? WHERE id = ?", (bytes(damaged), bid))
        b.blocks.cache = type(b.blocks.cache)()  # forget the plaintext B cached
        with pytest.raises(Retry) as caught:
            read_file(b, b"f")
        assert await caught.value.wait()
        assert read_file(b, b"f") == payload
        assert (
            hashlib.sha256(b.store.get_block(bid) or b"").digest()
            != hashlib.sha256(bytes(damaged)).digest()
        )


async def test_bytes_on_the_wire_hold_no_plaintext_name_or_content(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    a, b = make_node(tmp_path, "a", keys), make_node(tmp_path, "b", keys)
    wire_bytes = bytearray()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                wire_bytes.extend(data)
                writer.write(data)
                await writer.drain()
        writer.close()

    async with running(a, b) as (sa, sb):

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", sa.port)
            async with asyncio.TaskGroup() as group:
                group.create_task(pipe(reader, up_writer))
                group.create_task(pipe(up_reader, writer))

        proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
        port = proxy.sockets[0].getsockname()[1]
        sb.add_peer("127.0.0.1", port, "static")
        name = b"quarterly-plan-" + os.urandom(4).hex().encode() + b".txt"
        content = b"THE PLAINTEXT CONTENT OF A SECRET FILE. " * 2000
        write_file(a, name, content)
        await wait_until(lambda: read_file(b, name) == content, "B to get the file")
        proxy.close()  # its connections end when the nodes stop
        assert len(wire_bytes) > len(content) // 2, "the capture saw no sync traffic"
        for secret in (name, name.hex().encode(), b"PLAINTEXT CONTENT", b"quarterly-plan"):
            assert secret not in wire_bytes, f"{secret!r} travelled in plaintext"


async def test_a_peer_named_on_one_side_only_syncs_both_ways(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    a, b = make_node(tmp_path, "a", keys), make_node(tmp_path, "b", keys)
    async with running(a, b) as (sa, sb):
        sb.add_peer("127.0.0.1", sa.port, "static")  # A is told nothing about B
        write_file(b, b"from-b", b"B wrote this")
        await wait_until(lambda: read_file(a, b"from-b") == b"B wrote this", "A to pull from B")
        assert [link.source for link in sa.links.values()] == ["inbound"]
