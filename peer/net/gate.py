"""The peer port's gate: who may hold a connection, for how long, and how loudly.

Invariant: a party without the secret can hold at most `MAX_PER_SOURCE`
connections from one address and, with every address it has, push out only
connections that never carried an authenticated request: a connection that
did (a real peer's) is never evicted for a stranger's. The node holds at most
`MAX_CONNECTIONS` peer connections in all, so its file descriptors cannot be
used up from the network. Whatever strangers cause (refused requests,
malformed HTTP, failed `accept()`) costs at most one log line per
`LOG_INTERVAL_S`, node-wide, summarising the rest as counts.

Timeouts (aiohttp's keep-alive timer, set by `Sync.running` to `IDLE_S`):
a connection closes when no complete request arrives within `IDLE_S` of its
opening or of its previous answer, however slowly the bytes trickle in; a
request body must arrive within `BODY_S` once its authenticated headers did.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

log = logging.getLogger("peer.gate")

MAX_CONNECTIONS = 256
MAX_PER_SOURCE = 32
# No complete request within this long after a connection opened or was
# last answered: it is closed (silent and half-sent connections, idle keep-alive).
IDLE_S = 10.0
# An authenticated request's body must arrive within this long.
BODY_S = 20.0
# Clients drop pooled connections sooner than the server does, so a request is
# never sent on a connection the server is closing.
CLIENT_KEEPALIVE_S = IDLE_S / 2
LOG_INTERVAL_S = 60.0

ACCEPT_FAILED = "socket.accept() out of system resource"


def raise_descriptor_limit(want: int = 8192) -> int:
    """Raise this process's soft limit on open files towards `want` (within
    the hard limit); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(limit: int = MAX_CONNECTIONS) -> int:
    """`limit`, or half the descriptors this process may open if that is less:
    peer connections must never use up the descriptors the store, the mount,
    the control socket and the node's own requests need."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return limit
    return max(8, min(limit, soft // 2))


class Summary:
    """At most one log line per interval, counting what it did not print.

    The first event in an interval is logged at once (with the counts of the
    previous interval's suppressed ones); the rest only count."""

    def __init__(
        self,
        logger: logging.Logger,
        level: int = logging.WARNING,
        interval_s: float = LOG_INTERVAL_S,
    ) -> None:
        self.logger = logger
        self.level = level
        self.interval_s = interval_s
        self._last = float("-inf")
        self._quiet: Counter[str] = Counter()
        self.total = 0

    def restart(self) -> None:
        """Start a new interval: the next event is logged at once."""
        self._last = float("-inf")

    def note(self, kind: str, message: str, *args: object) -> None:
        """An event of `kind`; logs `message % args` if this interval has not logged yet."""
        self.total += 1
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._quiet[kind] += 1
            return
        self._last = now
        line = message % args if args else message
        if self._quiet:
            counts = ", ".join(f"{k}={n}" for k, n in sorted(self._quiet.items()))
            line += f" (and since the last such line: {counts})"
            self._quiet.clear()
        self.logger.log(self.level, "%s", line)


class ServerLog(logging.Logger):
    """The logger handed to aiohttp's connection handler: what it would log
    about malformed HTTP (a traceback each) becomes one summarised line per
    interval."""

    def __init__(self, summary: Summary) -> None:
        super().__init__("peer.gate.http", logging.WARNING)
        self.summary = summary

    def handle(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        reason = f"{type(exc).__name__}: {exc}" if exc is not None else record.getMessage()
        self.summary.note(
            "malformed",
            "refused a malformed HTTP request: %s (a client that is not a dfs-peer node)",
            (reason.splitlines() or ["?"])[0][:200],
        )


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, summary: Summary) -> Callable[[], None]:
    """Failed `accept()` calls (EMFILE, ENFILE, ENOBUFS) cost one summarised
    line per interval instead of an ERROR traceback each; asyncio retries
    the accept by itself a second later. Returns what restores the loop."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if str(context.get("message", "")).startswith(ACCEPT_FAILED):
            exc = context.get("exception")
            summary.note(
                "accept_failed",
                "cannot accept connections: %s (too many open connections or files)",
                exc,
            )
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    return lambda: loop.set_exception_handler(previous)


class _Gated(asyncio.Protocol):
    """One peer connection: admitted (or refused) by the gate, then every
    protocol event goes to aiohttp's own handler."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.BaseTransport | None = None
        self.source = "?"
        self.proven = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.source = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if not self.gate._admit(self):
            assert isinstance(transport, asyncio.Transport)
            transport.abort()
            return
        assert self.gate.make_inner is not None
        self.inner = self.gate.make_inner()
        self.gate._by_inner[self.inner] = self
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gate._drop(self)
        if self.inner is not None:
            self.gate._by_inner.pop(self.inner, None)
            self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def close(self) -> None:
        if self.transport is not None:
            assert isinstance(self.transport, asyncio.Transport)
            self.transport.abort()


class Gate:
    """Admission of connections to the peer port (see the module docstring)."""

    def __init__(
        self,
        summary: Summary,
        max_connections: int = MAX_CONNECTIONS,
        max_per_source: int = MAX_PER_SOURCE,
    ) -> None:
        # aiohttp's protocol factory (its `Server`), set once the runner is set up.
        self.make_inner: Callable[[], asyncio.Protocol] | None = None
        self.summary = summary
        self.max_connections = max_connections
        self.max_per_source = max_per_source
        self._open: set[_Gated] = set()
        self._per_source: Counter[str] = Counter()
        # Connections that have not authenticated a request yet, oldest first.
        self._unproven: OrderedDict[_Gated, None] = OrderedDict()
        self._by_inner: dict[object, _Gated] = {}
        self.refused = 0
        self.evicted = 0

    def protocol(self) -> asyncio.Protocol:
        """The protocol factory for `loop.create_server`."""
        return _Gated(self)

    def _admit(self, conn: _Gated) -> bool:
        over_source = self._per_source[conn.source] >= self.max_per_source
        over_total = len(self._open) >= self.max_connections
        victim: _Gated | None = None
        if over_source:
            victim = next((c for c in self._unproven if c.source == conn.source), None)
        elif over_total:
            victim = next(iter(self._unproven), None)
        full = (over_source or over_total) and victim is None
        if full:
            self.refused += 1
            self.summary.note(
                "connections_refused",
                "refused a connection: from=%s (%d open, %d from there: at the limit)",
                conn.source,
                len(self._open),
                self._per_source[conn.source],
            )
            return False
        if victim is not None:
            self.evicted += 1
            self.summary.note(
                "connections_evicted",
                "too many connections: closed one that never authenticated: from=%s",
                victim.source,
            )
            self._drop(victim)
            victim.close()
        self._open.add(conn)
        self._per_source[conn.source] += 1
        self._unproven[conn] = None
        return True

    def _drop(self, conn: _Gated) -> None:
        if conn in self._open:
            self._open.discard(conn)
            self._per_source[conn.source] -= 1
            if self._per_source[conn.source] <= 0:
                del self._per_source[conn.source]
        self._unproven.pop(conn, None)

    def prove(self, inner: object) -> None:
        """The connection whose aiohttp handler is `inner` carried an
        authenticated request: a stranger can no longer push it out."""
        conn = self._by_inner.get(inner)
        if conn is not None:
            conn.proven = True
            self._unproven.pop(conn, None)

    def statistics(self) -> dict[str, int]:
        return {
            "open": len(self._open),
            "unproven": len(self._unproven),
            "refused": self.refused,
            "evicted": self.evicted,
        }
