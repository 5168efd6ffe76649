"""A fuzzer of the peer protocol, against a running node's server on loopback.

The node (store, journal, sync, its HTTP server behind the gate) runs in a
thread of its own; hypothesis sends it requests over real sockets: raw bytes,
well-formed HTTP without the secret, and requests signed with the secret whose
paths, queries and bodies are random or mutated. Whatever comes: the node
answers (never a 500), changes nothing it holds, logs no ERROR, and its
memory stays bounded. The budget is fixed (examples per test), also in CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peer.keys import VolumeKeys
from peer.net import wire
from peer.net.auth import HEADER_MAC, sign_request, verify_response, wall_ms
from peer.node import Node
from peer.secret import new_secret
from tests.peer.test_hostile import rss_mib
from tests.peer.test_sync import make_node, write_file

BUDGET = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
PATHS = ["/hello", "/log", "/blocks", "/watch", "/", "/nothing", "/hello/", "/LOG"]
MEMORY_BOUND_MIB = 80


@dataclass
class Running:
    node: Node
    keys: VolumeKeys
    port: int
    loop: asyncio.AbstractEventLoop
    rss_start: float

    def state(self) -> tuple[object, ...]:
        """What the node holds; the fuzzer must change none of it."""

        async def read() -> tuple[object, ...]:
            stats = self.node.store.stats()
            return (
                dict(self.node.journal.vv),
                self.node.replica.counts(),
                stats.blocks,
                stats.block_bytes,
            )

        return asyncio.run_coroutine_threadsafe(read(), self.loop).result(10)


@pytest.fixture(scope="module")
def running_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    keys = VolumeKeys.from_root(new_secret())
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    node = make_node(tmp, "a", keys)
    write_file(node, b"kept.txt", b"what the fuzzer must not change")
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()
    port: list[int] = []

    async def serve() -> None:
        async with node.sync.running("127.0.0.1", 0) as sync:
            port.append(sync.port)
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10), "the node did not start"
    try:
        yield Running(node, keys, port[0], loop, rss_mib())
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        node.close()


@pytest.fixture
def fuzzed(running_node: Running, caplog: pytest.LogCaptureFixture) -> Iterator[Running]:
    """The running node; after the test: nothing changed, nothing logged at
    ERROR, memory bounded."""
    before = running_node.state()
    caplog.set_level(logging.INFO)
    # Each test gets the node's one summary line, spent or not by the one before.
    running_node.node.sync.strangers.restart()
    yield running_node
    assert running_node.state() == before, "the fuzzer changed the node's state"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage()[:200] for r in errors]
    grown = rss_mib() - running_node.rss_start
    assert grown < MEMORY_BOUND_MIB, f"the node grew by {grown:.0f} MiB"
    # And it still answers a genuine peer.
    status, _ = signed(running_node, "GET", "/hello", b"")
    assert status == 200


@pytest.fixture
def refused(expect_logs: Callable[..., None]) -> None:
    """The test sends what the node refuses, and it says so (once)."""
    expect_logs("refused", logger="peer.sync")


def request(port: int, method: str, path: str, headers: dict[str, str], body: bytes) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=35)
    try:
        conn.request(method, path, body=body or None, headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (ConnectionError, http.client.HTTPException):
        return -1  # the node closed on us: allowed, as long as it lives on
    finally:
        conn.close()


def signed(run: Running, method: str, path: str, body: bytes) -> tuple[int, bytes]:
    node = os.urandom(32).hex()
    auth = sign_request(run.keys.peers, method, path, node, body, time_ms=wall_ms())
    conn = http.client.HTTPConnection("127.0.0.1", run.port, timeout=35)
    try:
        headers = {**auth.headers(), "Content-Length": str(len(body))}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 401:
            verify_response(
                run.keys.peers, auth.nonce, resp.status, data, resp.getheader(HEADER_MAC)
            )
        return resp.status, data
    finally:
        conn.close()


text = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)
query = st.dictionaries(
    st.sampled_from(["wait", "since", "port", "x"]),
    st.one_of(
        text,
        st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e999", "65536", "0x10"]),
        st.floats(allow_nan=True).map(str),
    ),
    max_size=3,
)


def with_query(path: str, q: dict[str, str]) -> str:
    from urllib.parse import quote

    if "wait" in q:  # a long poll that really waits would only use up the budget
        q = {**q, "since": q.get("since", "") + "x"}
    return path + ("?" + "&".join(f"{k}={quote(v)}" for k, v in q.items()) if q else "")


@BUDGET
@given(data=st.binary(max_size=4096))
def test_raw_bytes_never_crash_the_node(fuzzed: Running, refused: None, data: bytes) -> None:
    with (
        socket.create_connection(("127.0.0.1", fuzzed.port), timeout=5) as sock,
        contextlib.suppress(OSError),
    ):
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(65536)
    # And one well-formed stranger's request, which the node refuses (and says so once).
    assert request(fuzzed.port, "GET", "/hello", {}, b"") == 401


@BUDGET
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]),
    path=st.sampled_from(PATHS),
    q=query,
    headers=st.dictionaries(
        st.sampled_from(
            ["X-Dfs-Node", "X-Dfs-Time", "X-Dfs-Nonce", "X-Dfs-Protocol", "X-Dfs-Mac", "X-Dfs-Body"]
        ),
        st.one_of(text, st.binary(min_size=16, max_size=32).map(bytes.hex)),
    ),
    body=st.binary(max_size=2048),
)
def test_requests_without_the_secret_get_a_bare_401(
    fuzzed: Running,
    refused: None,
    method: str,
    path: str,
    q: dict[str, str],
    headers: dict[str, str],
    body: bytes,
) -> None:
    status = request(fuzzed.port, method, with_query(path, q), headers, body)
    assert status in (401, 400, -1), status


cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.binary(max_size=40) | text,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(text | st.integers(), inner, max_size=4)
    ),
    max_leaves=12,
)


def mutated_requests() -> st.SearchStrategy[tuple[str, str, bytes]]:
    vv = st.dictionaries(st.binary(min_size=0, max_size=40), st.integers(), max_size=4)
    log_body = st.builds(
        lambda v, m: wire.encode({"vv": v, "max_bytes": m}),
        vv,
        st.integers(min_value=-(2**70), max_value=2**70),
    )
    blocks_body = st.lists(st.binary(max_size=40), max_size=300).map(
        lambda ids: wire.encode({"ids": ids})
    )
    junk = st.one_of(st.binary(max_size=2048), cbor_values.map(cbor2.dumps))
    return st.one_of(
        st.tuples(st.just("POST"), st.just("/log"), st.one_of(log_body, junk)),
        st.tuples(st.just("POST"), st.just("/blocks"), st.one_of(blocks_body, junk)),
        st.tuples(
            st.sampled_from(["GET", "POST", "PUT"]),
            st.sampled_from(PATHS),
            junk,
        ),
    )


@BUDGET
@given(req=mutated_requests(), q=query)
def test_signed_requests_with_bad_content_are_refused_not_crashed(
    fuzzed: Running, req: tuple[str, str, bytes], q: dict[str, str]
) -> None:
    method, path, body = req
    q = {k: v for k, v in q.items() if k != "port"}  # no links to random ports
    status, _ = signed(fuzzed, method, with_query(path, q), body)
    assert status in (200, 400, 404, 405), status
