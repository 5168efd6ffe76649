"""Attacks on a running node's peer port: strangers on the LAN and lying members.

Real nodes in this process (real HTTP on loopback, real SQLite), attacked
with real sockets. A stranger comes from other loopback addresses
(127.0.0.2 and up), as a machine on the LAN would, while the real nodes talk
from 127.0.0.1. Every flood is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from peer.keys import VolumeKeys
from peer.net import gate, wire
from peer.net.auth import HEADER_MAC, PROTOCOL, sign_request, sign_response, wall_ms
from peer.net.sync import MAX_INBOUND
from tests.peer.test_sync import link, make_node, read_file, running, wait_until, write_file

pytestmark = pytest.mark.asyncio


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_idle(port: int, source: str) -> Conn | None:
    """A connection from `source` that sends nothing; None if refused at once."""
    try:
        return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    except OSError:
        return None


def is_open(conn: Conn) -> bool:
    reader, writer = conn
    return not (reader.at_eof() or reader.exception() or writer.transport.is_closing())


def still_open(conns: list[Conn]) -> int:
    return sum(is_open(c) for c in conns)


async def close_all(conns: list[Conn]) -> None:
    for _, w in conns:
        w.transport.abort()
    await asyncio.sleep(0)


async def test_idle_connection_flood_is_capped_and_sync_goes_on(
    tmp_path: Path, keys: VolumeKeys, expect_logs: Callable[..., None]
) -> None:
    expect_logs("connection", logger="peer.sync")
    a, b = make_node(tmp_path, "a", keys), make_node(tmp_path, "b", keys)
    async with running(a, b) as (sa, sb):
        link(sa, sb)
        write_file(a, b"before", b"1")
        await wait_until(lambda: read_file(b, b"before") == b"1", "B to sync before the flood")
        writers: list[Conn] = []
        try:
            # 3,000 idle connections from 12 addresses, 250 at a time.
            sources = [f"127.0.0.{i}" for i in range(2, 14)]
            for round_ in range(12):
                batch = await asyncio.gather(
                    *(open_idle(sa.port, sources[(round_ + i) % 12]) for i in range(250))
                )
                writers += [w for w in batch if w is not None]
            await asyncio.sleep(0.5)
            held = still_open(writers)
            assert held <= gate.MAX_CONNECTIONS, f"the node holds {held} idle connections"
            # The real peers keep syncing throughout.
            t0 = time.monotonic()
            write_file(b, b"during", b"2")
            await wait_until(lambda: read_file(a, b"during") == b"2", "A to sync during the flood")
            write_file(a, b"during-a", b"3")
            await wait_until(lambda: read_file(b, b"during-a") == b"3", "B to sync during it")
            assert time.monotonic() - t0 < 10
            # Silent connections are closed once the idle time has passed.
            await wait_until(
                lambda: still_open(writers) == 0, "idle connections to close", gate.IDLE_S + 5
            )
        finally:
            await close_all(writers)


async def test_half_sent_headers_are_closed_after_the_idle_time(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    a = make_node(tmp_path, "a", keys)
    async with running(a) as (sa,):
        writers = []
        for _i in range(10):
            c = await open_idle(sa.port, "127.0.0.2")
            assert c is not None
            c[1].write(b"GET /hello HTTP/1.1\r\nHost: x\r\n")  # never finished
            writers.append(c)
        t0 = time.monotonic()
        # Trickle one byte every second: it must not keep the connection open.
        while still_open(writers) and time.monotonic() - t0 < gate.IDLE_S + 5:
            for c in writers:
                if is_open(c):
                    c[1].write(b"X")
            await asyncio.sleep(1)
        assert still_open(writers) == 0
        assert time.monotonic() - t0 < gate.IDLE_S + 3
        await close_all(writers)


def _send_head(port: int, source: str, length: int, body_part: int) -> socket.socket:
    """A POST /log with forged authentication headers and a declared length,
    of whose body only `body_part` bytes are sent."""
    node = os.urandom(32).hex()
    auth = sign_request(os.urandom(32), "POST", "/log", node, b"x" * length, time_ms=wall_ms())
    head = "".join(f"{k}: {v}\r\n" for k, v in auth.headers().items())
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    data = (
        f"POST /log HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n{head}\r\n".encode()
        + b"x" * body_part
    )
    with contextlib.suppress(OSError):
        sock.send(data)
    return sock


async def test_held_half_sent_bodies_do_not_grow_memory(
    tmp_path: Path, keys: VolumeKeys, expect_logs: Callable[..., None]
) -> None:
    expect_logs("refused a peer request", logger="peer.sync")
    a = make_node(tmp_path, "a", keys)
    async with running(a) as (sa,):
        await asyncio.sleep(0.2)
        before = rss_mib()
        socks = []
        for i in range(40):
            socks.append(
                await asyncio.to_thread(
                    _send_head,
                    sa.port,
                    f"127.0.0.{2 + i % 4}",
                    wire.MAX_REQUEST_BYTES,
                    wire.MAX_REQUEST_BYTES - 1000,
                )
            )
            await asyncio.sleep(0.01)
        await asyncio.sleep(1.0)
        grown = rss_mib() - before
        for s in socks:
            s.close()
        assert grown < 30, f"40 held bodies grew the node by {grown:.0f} MiB"
        assert sa.refused >= 40


async def test_an_authenticated_body_sent_too_slowly_is_cut_off(
    tmp_path: Path,
    keys: VolumeKeys,
    monkeypatch: pytest.MonkeyPatch,
    expect_logs: Callable[..., None],
) -> None:
    expect_logs("refused a peer request", logger="peer.sync")
    monkeypatch.setattr(gate, "BODY_S", 1.0)
    a = make_node(tmp_path, "a", keys)
    async with running(a) as (sa,):
        body = wire.encode_log_request(wire.LogRequest({}, 1000))
        node = os.urandom(32).hex()
        auth = sign_request(keys.peers, "POST", "/log", node, body, time_ms=wall_ms())
        head = "".join(f"{k}: {v}\r\n" for k, v in auth.headers().items())
        reader, writer = await asyncio.open_connection("127.0.0.1", sa.port)
        writer.write(
            f"POST /log HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode()
            + body[:-1]
        )
        t0 = time.monotonic()
        status = await asyncio.wait_for(reader.readline(), 5)
        assert status.startswith(b"HTTP/1.1 401"), status
        assert time.monotonic() - t0 < 3
        writer.close()


async def test_chunked_and_oversized_bodies_are_refused_before_reading(
    tmp_path: Path, keys: VolumeKeys, expect_logs: Callable[..., None]
) -> None:
    expect_logs("refused a peer request", logger="peer.sync")
    a = make_node(tmp_path, "a", keys)
    async with running(a) as (sa,):
        body = b"x" * 100
        node = os.urandom(32).hex()
        for extra in (
            "Transfer-Encoding: chunked\r\n",
            f"Content-Length: {wire.MAX_REQUEST_BYTES + 1}\r\n",
        ):
            auth = sign_request(keys.peers, "POST", "/log", node, body, time_ms=wall_ms())
            head = "".join(f"{k}: {v}\r\n" for k, v in auth.headers().items())
            reader, writer = await asyncio.open_connection("127.0.0.1", sa.port)
            writer.write(f"POST /log HTTP/1.1\r\nHost: x\r\n{extra}{head}\r\n".encode())
            status = await asyncio.wait_for(reader.readline(), 5)
            assert status.startswith(b"HTTP/1.1 401"), (extra, status)
            writer.close()


async def test_a_malformed_request_flood_logs_a_few_lines(
    tmp_path: Path,
    keys: VolumeKeys,
    caplog: pytest.LogCaptureFixture,
    expect_logs: Callable[..., None],
) -> None:
    expect_logs("refused a", logger="peer.sync")
    a = make_node(tmp_path, "a", keys)
    caplog.set_level(logging.INFO)
    async with running(a) as (sa,):
        junk = [
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(40),  # TLS hello
            b"GET / HTTP/1.1\r\nHost: \x00\x01\r\n\r\n",
            b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
            b"POST /log HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
            b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n",  # well formed, unauthenticated
        ]

        async def one(i: int) -> None:
            with contextlib.suppress(OSError, TimeoutError):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", sa.port, local_addr=(f"127.0.{1 + i // 250}.{2 + i % 250}", 0)
                )
                writer.write(junk[i % len(junk)])
                await asyncio.wait_for(reader.read(), 5)
                writer.close()

        for start in range(0, 1500, 100):
            await asyncio.gather(*(one(i) for i in range(start, start + 100)))
        assert sa.refused >= 300
        loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(loud) <= 3, [r.getMessage()[:120] for r in loud]
        assert not any(r.exc_info for r in caplog.records), "a traceback was logged"


async def test_failed_accepts_are_summarised_not_logged_each(
    tmp_path: Path,
    keys: VolumeKeys,
    caplog: pytest.LogCaptureFixture,
    expect_logs: Callable[..., None],
) -> None:
    """Out of file descriptors, asyncio's accept fails; that must not log an
    ERROR traceback per attempt."""
    expect_logs("cannot accept connections", logger="peer.sync")
    a = make_node(tmp_path, "a", keys)
    async with running(a) as (sa,):
        loop = asyncio.get_running_loop()
        handler = loop.get_exception_handler()
        assert handler is not None
        with caplog.at_level(logging.INFO):
            for _ in range(200):
                handler(
                    loop,
                    {
                        "message": "socket.accept() out of system resource",
                        "exception": OSError(24, "Too many open files"),
                    },
                )
        loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(loud) <= 1
        assert not any(r.exc_info for r in caplog.records)
        assert sa.strangers.total >= 200
    # The loop's own handler is back once the node stops.
    assert loop.get_exception_handler() is not handler


# -- members -----------------------------------------------------------------------


async def _signed(
    session: aiohttp.ClientSession, keys: VolumeKeys, port: int, path: str, node: str
) -> tuple[int, bytes]:
    auth = sign_request(keys.peers, "GET", path, node, b"", time_ms=wall_ms())
    async with session.get(f"http://127.0.0.1:{port}{path}", headers=auth.headers()) as resp:
        return resp.status, await resp.read()


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


async def test_hello_with_many_ports_adds_one_link_that_expires(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    a = make_node(tmp_path, "a", keys)
    async with running(a) as (sa,), aiohttp.ClientSession() as session:
        liar = os.urandom(32).hex()
        for port in _free_ports(200):
            status, _ = await _signed(session, keys, sa.port, f"/hello?port={port}", liar)
            assert status == 200
        inbound = [k for k, v in sa.links.items() if v.source == "inbound"]
        assert len(inbound) <= 1, f"{len(inbound)} links for one node id"
        # Nothing answers there as that node: the link goes.
        await wait_until(
            lambda: not any(v.source == "inbound" for v in sa.links.values()),
            "the inbound link to expire",
        )
        # Many node ids: capped.
        for port in _free_ports(MAX_INBOUND + 40):
            await _signed(session, keys, sa.port, f"/hello?port={port}", os.urandom(32).hex())
        assert sum(v.source == "inbound" for v in sa.links.values()) <= MAX_INBOUND


@contextlib.asynccontextmanager
async def half_broken_member(keys: VolumeKeys, hellos: list[float]) -> AsyncIterator[int]:
    """A member whose /hello answers (claiming entries we lack) and whose
    every other answer is a 500, all properly signed."""
    node = os.urandom(32)

    async def handle(request: web.Request) -> web.Response:
        nonce = bytes.fromhex(request.headers["X-Dfs-Nonce"])
        if request.path == "/hello":
            hellos.append(time.monotonic())
            body = wire.encode_hello(wire.Hello(PROTOCOL, node, "liar", {node: 5}, {}))
            status = 200
        else:
            body = wire.encode_error("broken")
            status = 500
        resp = web.Response(status=status, body=body)
        resp.headers[HEADER_MAC] = sign_response(keys.peers, nonce, status, body)
        return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def test_a_peer_whose_hello_works_but_nothing_else_is_backed_off(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    a = make_node(tmp_path, "a", keys)
    hellos: list[float] = []
    async with running(a) as (sa,), half_broken_member(keys, hellos) as port:
        sa.add_peer("127.0.0.1", port, "static")
        await asyncio.sleep(6)
        assert len(hellos) <= 8, f"{len(hellos)} hellos in 6 s"


async def test_watch_wait_must_be_a_finite_number(tmp_path: Path, keys: VolumeKeys) -> None:
    a = make_node(tmp_path, "a", keys)
    async with running(a) as (sa,), aiohttp.ClientSession() as session:
        node = os.urandom(32).hex()
        for wait in ("nan", "inf", "-inf", "-1", "1e999"):
            status, _ = await asyncio.wait_for(
                _signed(session, keys, sa.port, f"/watch?since=x&wait={wait}", node), 5
            )
            assert status == 400, wait


async def _signed_on(conn: Conn, keys: VolumeKeys, path: str) -> int:
    """A signed GET on an open keep-alive connection; its status."""
    reader, writer = conn
    auth = sign_request(keys.peers, "GET", path, os.urandom(32).hex(), b"", time_ms=wall_ms())
    head = "".join(f"{k}: {v}\r\n" for k, v in auth.headers().items())
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode())
    status = int((await asyncio.wait_for(reader.readline(), 5)).split()[1])
    length = 0
    while (line := await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def test_a_proven_connection_is_never_pushed_out_by_strangers(
    tmp_path: Path, keys: VolumeKeys, expect_logs: Callable[..., None]
) -> None:
    expect_logs("connection", logger="peer.sync")
    a = make_node(tmp_path, "a", keys)
    async with running(a) as (sa,):
        peer = await open_idle(sa.port, "127.0.0.2")
        assert peer is not None
        assert await _signed_on(peer, keys, "/hello") == 200
        # Strangers from the same address and from others, far past both caps.
        sources = ["127.0.0.2"] + [f"127.0.0.{i}" for i in range(3, 20)]
        strangers = [
            c
            for c in await asyncio.gather(
                *(open_idle(sa.port, sources[i % len(sources)]) for i in range(600))
            )
            if c is not None
        ]
        await asyncio.sleep(0.5)
        assert is_open(peer)
        assert await _signed_on(peer, keys, "/hello") == 200
        await close_all([*strangers, peer])
